import numpy as np
import pytest

from memory.policies import FullPolicy
from streamer.models import load_model
from streamer.runner import Runner
from video_io.preprocess import VisionPreset

# 56 x 112 frames at exactly that many pixels: a 4 x 8 patch grid, 8 tokens per frame pair.
TEST_PRESET = VisionPreset(min_pixels=56 * 112, max_pixels=56 * 112)


@pytest.fixture(scope="session")
def tiny_runner() -> Runner:
    return Runner(load_model("tiny-random", device="cpu", dtype="float32"), preset=TEST_PRESET)


def random_frames(count: int, seed: int = 0, size=(56, 112)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def stream(runner: Runner, frames: list[np.ndarray], chunk_frames: int, policy=None):
    """A memory of `frames` ingested `chunk_frames` at a time (default policy: keep everything)."""
    memory = runner.new_memory()
    policy = policy or FullPolicy()
    for start in range(0, len(frames), chunk_frames):
        runner.ingest(memory, frames[start:start + chunk_frames], policy)
    return memory
