"""The batched vision tower (streamer.engine.vision) against the stock transformers tower."""

import pytest
import torch

from conftest import random_frames
from streamer.engine import vision
from streamer.engine.models import load_model
from video_io.preprocess import VisionPreset, preprocess_frames


def stock_and_batched(model_name: str, frames: int, size: tuple[int, int]):
    model = load_model(model_name, device="cpu", dtype="float32").model
    visual = model.model.visual
    height, width = size
    patches = preprocess_frames(random_frames(frames, seed=frames, size=size),
                                VisionPreset(min_pixels=height * width, max_pixels=height * width))
    with torch.inference_mode():
        stock = visual(patches.pixel_values, grid_thw=torch.tensor([patches.grid_thw]))
        stock = stock.pooler_output if hasattr(stock, "pooler_output") else stock
        batched = vision.encode_pairs(visual, patches.pixel_values, patches.grid_thw)
    return stock, batched


@pytest.mark.parametrize("model_name", ["tiny-random", "builtin", "tiny-random-qwen2.5-vl"])
# Qwen2.5-VL's tiny tower has windows of 4 x 4 patches: 56 x 56 is one, 84 x 140 has windows cut by the edge
@pytest.mark.parametrize("frames,size",
                         [(2, (56, 56)), (6, (56, 112)), (8, (112, 56)), (4, (112, 168)), (4, (84, 140))])
def test_batched_tower_equals_the_stock_tower(model_name, frames, size):
    stock, batched = stock_and_batched(model_name, frames, size)
    assert batched.shape == stock.shape
    torch.testing.assert_close(batched, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny-random", "tiny-random-qwen2.5-vl"])
def test_score_cap_splits_the_batch_without_changing_the_result(monkeypatch, model_name):
    whole = stock_and_batched(model_name, 10, (56, 112))[1]
    monkeypatch.setattr(vision, "MAX_SCORES", 1)  # one frame pair per attention call
    stock, sliced = stock_and_batched(model_name, 10, (56, 112))
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sliced, stock, rtol=1e-5, atol=1e-5)
