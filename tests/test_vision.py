"""The batched vision tower (streamer.engine.vision) against the stock transformers tower."""

from dataclasses import replace

import pytest
import torch

from conftest import random_frames
from streamer.engine import vision
from streamer.engine.models import family_of, load_model
from video_io.preprocess import preprocess_frames


def stock_and_batched(model_name: str, frames: int, size: tuple[int, int]):
    model = load_model(model_name, device="cpu", dtype="float32").model
    visual = model.model.visual
    height, width = size
    preset = replace(family_of(model).preset, min_pixels=height * width, max_pixels=height * width)
    patches = preprocess_frames(random_frames(frames, seed=frames, size=size), preset)
    with torch.inference_mode():
        stock = visual(patches.pixel_values, grid_thw=torch.tensor([patches.grid_thw]))
        shape = family_of(model).vision(model.config.vision_config)
        batched = vision.encode_pairs(visual, shape, patches.pixel_values, patches.grid_thw)
    if not hasattr(stock, "pooler_output"):
        return [stock], [batched[0]]
    # Qwen3-VL's DeepStack features are outputs of the tower too
    return [stock.pooler_output, *getattr(stock, "deepstack_features", [])], [batched[0], *batched[1]]


MODELS = ["tiny-random", "builtin", "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl"]


@pytest.mark.parametrize("model_name", MODELS)
# Qwen2.5-VL's tiny tower has windows of 4 x 4 patches: 56 x 56 is one, 84 x 140 has windows cut by the edge;
# Qwen3-VL's frames are resized to multiples of 32 (64 x 64 .. 96 x 160), its 4 x 4 position table resampled
# down to 2 x 2 patches as well as up
@pytest.mark.parametrize("frames,size",
                         [(2, (56, 56)), (6, (56, 112)), (8, (112, 56)), (4, (112, 168)), (4, (84, 140)),
                          (2, (32, 32))])
def test_batched_tower_equals_the_stock_tower(model_name, frames, size):
    stock, batched = stock_and_batched(model_name, frames, size)
    assert len(batched) == len(stock) == (3 if model_name == "tiny-random-qwen3-vl" else 1)
    for ours, theirs in zip(batched, stock):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny-random", "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl"])
def test_score_cap_splits_the_batch_without_changing_the_result(monkeypatch, model_name):
    whole = stock_and_batched(model_name, 10, (56, 112))[1]
    monkeypatch.setattr(vision, "MAX_SCORES", 1)  # one frame pair per attention call
    stock, sliced = stock_and_batched(model_name, 10, (56, 112))
    for ours, before, theirs in zip(sliced, whole, stock):
        torch.testing.assert_close(ours, before, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
