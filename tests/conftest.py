import os

import numpy as np
import pytest
import torch

from memory.baselines import FullPolicy
from streamer.engine.models import load_model
from streamer.engine.positions import text_positions
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.engine.view import MemoryView
from video_io.preprocess import VisionPreset
from video_io.synthetic import write_video

# 56 x 112 frames at exactly that many pixels: a 4 x 8 patch grid, 8 tokens per frame pair.
TEST_PRESET = VisionPreset(min_pixels=56 * 112, max_pixels=56 * 112)


# one tiny model per supported family; FAMILY_FPS is not an integer, so that Qwen2.5-VL's temporal
# positions (1.6 per frame pair) floor to uneven steps
FAMILY_MODELS = ("tiny-random", "tiny-random-qwen2.5-vl")
FAMILY_FPS = 2.5


@pytest.fixture(scope="session")
def tiny_runner() -> Runner:
    return Runner(load_model("tiny-random", device="cpu", dtype="float32"), preset=TEST_PRESET)


@pytest.fixture(scope="session", params=FAMILY_MODELS)
def family_runner(request, tiny_runner) -> Runner:
    if request.param == "tiny-random":
        return tiny_runner
    return Runner(load_model(request.param, device="cpu", dtype="float32"), preset=TEST_PRESET)


def random_frames(count: int, seed: int = 0, size=(56, 112)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def stream(runner: Runner, frames: list[np.ndarray], chunk_frames: int, policy=None, budget=None, fps=None):
    """A memory of `frames` ingested `chunk_frames` at a time (default policy: keep everything)."""
    return ingest_video(runner, frames, policy or FullPolicy(), chunk_frames, runner.new_memory(budget=budget),
                        fps=fps)


@torch.inference_mode()
def question_logits(runner: Runner, memory, question: str) -> torch.Tensor:
    """Float32 logits at every position of the question suffix after the memory: [suffix_len, vocab]."""
    ids = runner.suffix_ids(question)
    view = MemoryView(memory.context(), extra=len(ids))
    hidden = runner.forward_layers(runner.embed_tokens(ids), text_positions(memory.next_position, len(ids)), view)
    return runner.logits(hidden)[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A folder with a short clip (24 frames of 112 x 56 at 8 fps) and a corrupt file, for server-side reads."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "clip.mp4", 24, fps=8.0, size=(112, 56))
    (root / "corrupt.mp4").write_bytes(os.urandom(4000))
    return root
