import http.server
import os
import threading
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch

from memory.baselines import FullPolicy
from streamer.engine.models import FAMILIES, load_model
from streamer.engine.positions import text_positions
from streamer.engine.runner import Runner
from streamer.engine.stream import ingest_video
from streamer.engine.view import MemoryView
from video_io.preprocess import VisionPreset
from video_io.synthetic import index_frame, write_video

# 56 x 112 frames at exactly that many pixels: a 4 x 8 patch grid, 8 tokens per frame pair.
TEST_PRESET = VisionPreset(min_pixels=56 * 112, max_pixels=56 * 112)


def family_test_preset(runner_or_model) -> VisionPreset:
    """The 4 x 8 patch grid in the family's own patch size and normalisation (Qwen3-VL: 64 x 128 pixels, so
    the 56 x 112 test frames are resized)."""
    model = getattr(runner_or_model, "model", runner_or_model)
    preset = FAMILIES[model.config.model_type].preset
    pixels = 4 * 8 * preset.patch_size ** 2
    return replace(preset, min_pixels=pixels, max_pixels=pixels)


# one tiny model per supported family; FAMILY_FPS is not an integer, so that Qwen2.5-VL's temporal
# positions (1.6 per frame pair) floor to uneven steps and Qwen3-VL's times are not whole tenths
FAMILY_MODELS = ("tiny-random", "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl")
FAMILY_FPS = 2.5


@pytest.fixture(scope="session")
def tiny_runner() -> Runner:
    return Runner(load_model("tiny-random", device="cpu", dtype="float32"), preset=TEST_PRESET)


@pytest.fixture(scope="session")
def qwen3_runner() -> Runner:
    loaded = load_model("tiny-random-qwen3-vl", device="cpu", dtype="float32")
    return Runner(loaded, preset=family_test_preset(loaded.model))


@pytest.fixture(scope="session", params=FAMILY_MODELS)
def family_runner(request, tiny_runner, qwen3_runner) -> Runner:
    if request.param == "tiny-random":
        return tiny_runner
    if request.param == "tiny-random-qwen3-vl":
        return qwen3_runner
    loaded = load_model(request.param, device="cpu", dtype="float32")
    return Runner(loaded, preset=family_test_preset(loaded.model))


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


@contextmanager
def live_http(parts: list[bytes], then: str):
    """A loopback HTTP source: connection i sends parts[i] (MPEG-TS bytes), then `then`: "stall" (holds the
    connection open, sending nothing) or "close". URL of the stream."""
    stop = threading.Event()
    connections = iter(parts)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = next(connections, b"")
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            if then == "stall":
                stop.wait(30)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/live.ts"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def ts_parts(tmp_path, count=2, frames=24):
    size, parts = (112, 112), []
    for part in range(count):
        path = tmp_path / f"part{part}.ts"
        write_video(path, frames, fps=8.0, size=size, content=lambda i, p=part: index_frame(p * frames + i, size))
        parts.append(path.read_bytes())
    return parts


class Stopped(Exception):
    """A run interrupted by stop_at's log function."""


def stop_at(prefix: str):
    """A log function that interrupts a run (raises Stopped) at its first line starting with `prefix`."""
    def log(line: str) -> None:
        if line.startswith(prefix):
            raise Stopped
    return log
