"""Tests of video_io: exact frame reading, sampling, sources, errors and Qwen2-VL preprocessing."""

import ast
import importlib.util
import io
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import live_http, ts_parts
from PIL import Image

from video_io.errors import (
    NoFramesError,
    NotAVideoError,
    NoVideoStreamError,
    UnreadableStreamError,
    VideoError,
    VideoNotFoundError,
)
from video_io.images import decode_image, encode_image
from video_io.preprocess import VIDEOMME_PRESET, VisionPreset, pixels_for_tokens, preprocess_frames, smart_resize
from video_io.readers import iter_frames, probe, read_frames
from video_io.sampling import Sampling, fps_indices, uniform_indices
from video_io.sources import FileSource, StreamSource
from video_io.synthetic import decode_index, demo_frame, index_frame, write_video
from video_io.preprocess import CLIP_MEAN, CLIP_STD, QWEN3_PRESET

FPS, NUM_FRAMES, GOP, SIZE = 8.0, 60, 12, (112, 112)
BACKENDS = ["pyav", "decord"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """60 index-coded frames at 8 fps, keyframe every 12 frames, with B-frames (libx264)."""
    path = tmp_path_factory.mktemp("video") / "index.mp4"
    write_video(path, NUM_FRAMES, fps=FPS, size=SIZE, gop=GOP)
    return path


@pytest.fixture(scope="module")
def one_second_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, 8, fps=8.0, size=(64, 64), gop=4)
    return path


def keyframe_indices(path: Path) -> list[int]:
    """Presentation-order indices of the keyframes, straight from PyAV's packets."""
    with av.open(str(path)) as container:
        packets = sorted((p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size)
    return [i for i, (_, key) in enumerate(packets) if key]


def noisy_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """Demo content plus noise: sharp edges and texture, where resize and colour paths differ most."""
    noise = np.random.default_rng(i).integers(-40, 40, (size[1], size[0], 3))
    return np.clip(demo_frame(i, size).astype(int) + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- synthetic video


def test_synthetic_video_has_keyframes_only_every_gop(video):
    assert keyframe_indices(video) == list(range(0, NUM_FRAMES, GOP))


def test_index_codes_survive_encoding(video):
    frames = read_frames(video, range(NUM_FRAMES))
    assert [decode_index(f.image) for f in frames] == list(range(NUM_FRAMES))


def test_index_frame_roundtrip_and_range():
    for i in [0, 1, 1000, 2**16 - 1]:
        assert decode_index(index_frame(i, (96, 64))) == i
    with pytest.raises(ValueError, match="0..65535"):
        index_frame(2**16, SIZE)


def test_write_video_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", 2, size=(113, 112))


# ---------------------------------------------------------------- exact frame reading

_rng = np.random.default_rng(0)
INDEX_SETS = {
    # right after a keyframe, right before the next one, and the last frame
    "keyframe_neighbours": [1, 11, 13, 23, 25, 35, 47, 59],
    "sparse": [5, 29, 53],
    "dense": list(range(14, 23)),
    "single_last": [59],
    **{f"random{n}": sorted(_rng.choice(NUM_FRAMES, size=n, replace=False).tolist()) for n in (4, 9, 20)},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indices", INDEX_SETS.values(), ids=INDEX_SETS.keys())
def test_reads_exact_frames(video, backend, indices):
    # a reader returning the keyframe before each target would fail: every set has non-keyframes
    assert set(indices) - set(keyframe_indices(video))
    frames = read_frames(video, indices, backend=backend)
    assert [f.index for f in frames] == indices
    assert [decode_index(f.image) for f in frames] == indices
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (SIZE[1], SIZE[0], 3)
        assert f.ts == pytest.approx(f.index / FPS, abs=1e-3)


def test_backends_agree(tmp_path):
    # textured content: pixel differences between the backends' YUV->RGB paths would show here.
    # Measured with av 18.1 / decord 0.6.0: identical (both use swscale's default conversion);
    # the contract allows +-2 levels for other FFmpeg builds.
    path = tmp_path / "noisy.mp4"
    write_video(path, 24, size=(160, 120), gop=8, content=lambda i: noisy_frame(i, (160, 120)))
    indices = [0, 3, 7, 9, 15, 22, 23]
    by_pyav, by_decord = read_frames(path, indices), read_frames(path, indices, backend="decord")
    diff = max(np.abs(a.image.astype(int) - b.image.astype(int)).max() for a, b in zip(by_pyav, by_decord))
    assert diff <= 2
    assert [a.ts for a in by_pyav] == pytest.approx([b.ts for b in by_decord], abs=1e-3)


def test_iter_frames_is_lazy_and_matches_read_frames(video):
    frames = iter_frames(video, [2, 30])
    assert not isinstance(frames, list)
    assert [f.index for f in frames] == [2, 30]


@pytest.mark.parametrize("indices", [[3, 1], [2, 2], [-1], [NUM_FRAMES]])
def test_bad_indices_raise_at_call(video, indices):
    with pytest.raises(ValueError, match="sorted and unique|must lie in"):
        iter_frames(video, indices)


def test_unknown_backend(video):
    with pytest.raises(ValueError, match="unknown backend"):
        iter_frames(video, [0], backend="opencv")


def test_missing_decord_says_how_to_install(video, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'video-streamer\[decord\]'"):
        iter_frames(video, [0], backend="decord")


def test_probe(video):
    info = probe(video)
    assert (info.num_frames, info.fps, info.width, info.height) == (NUM_FRAMES, FPS, *SIZE)
    assert info.duration == pytest.approx(NUM_FRAMES / FPS)
    assert info.path == str(video)


# ---------------------------------------------------------------- errors


@pytest.fixture
def audio_only(tmp_path) -> Path:
    path = tmp_path / "speech.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture
def zero_frames(tmp_path) -> Path:
    # mp4 drops a track without samples; avi keeps the (empty) video stream
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return path


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: p, VideoNotFoundError),
        (lambda p: p.write_text("not a video\n" * 20) and p, NotAVideoError),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(20000)) and p, NotAVideoError),
    ],
    ids=["missing", "text_file", "random_bytes"],
)
def test_file_errors(tmp_path, make, error):
    path = make(tmp_path / "clip.mp4")
    for call in (lambda: probe(path), lambda: read_frames(path, [0]), lambda: FileSource(path, Sampling(4))):
        with pytest.raises(error, match="clip.mp4"):
            call()


def test_audio_only_file(audio_only):
    with pytest.raises(NoVideoStreamError, match=r"speech\.wav.*audio"):
        probe(audio_only)


def test_zero_frame_video(zero_frames):
    with pytest.raises(NoFramesError, match="no frames"):
        probe(zero_frames)


def test_errors_share_a_base():
    errors = [VideoNotFoundError, NotAVideoError, NoVideoStreamError, NoFramesError, UnreadableStreamError]
    assert all(issubclass(error, VideoError) for error in errors)


# ---------------------------------------------------------------- sampling


def test_uniform_384_of_1000():
    indices = uniform_indices(1000, 384)
    assert len(indices) == 384 and all(b > a for a, b in zip(indices, indices[1:]))
    assert indices == [int((i + 0.5) * 1000 / 384) for i in range(384)]
    assert (indices[0], indices[-1]) == (1, 998)


def test_uniform_edge_cases():
    assert uniform_indices(10, 10) == list(range(10))
    assert uniform_indices(10, 25) == list(range(10))
    assert uniform_indices(101, 1) == [50]
    assert uniform_indices(7, 2) == [1, 5]
    with pytest.raises(ValueError):
        uniform_indices(10, 0)
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


def cfr(frames: int, fps: float) -> list[float]:
    """The frame times of a constant-rate video."""
    return [i / fps for i in range(frames)]


def test_fps_indices():
    assert fps_indices(cfr(60, 8.0), 2.0, None) == list(range(0, 60, 4))
    # 30 fps source at 7 fps: nearest frame to k/7 s is round(k * 30 / 7)
    assert fps_indices(cfr(100, 30.0), 7.0, None) == [
        0, 4, 9, 13, 17, 21, 26, 30, 34, 39, 43, 47, 51, 56, 60, 64, 69, 73, 77, 81, 86, 90, 94, 99
    ]
    # faster than the source: every frame once, no duplicates
    assert fps_indices(cfr(20, 8.0), 30.0, None) == list(range(20))
    # within max_frames: unchanged; above: uniform over the whole video
    assert fps_indices(cfr(60, 8.0), 2.0, 15) == list(range(0, 60, 4))
    assert fps_indices(cfr(60, 8.0), 2.0, 10) == uniform_indices(60, 10)
    # a huge rate costs what the frames cost, not one step per 1/fps of video time
    started = time.monotonic()
    assert fps_indices(cfr(3600 * 30, 30.0), 1e9, None) == list(range(3600 * 30))
    assert fps_indices(cfr(60, 8.0), 1e9, 4) == uniform_indices(60, 4)
    assert time.monotonic() - started < 5
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="finite"):
            fps_indices(cfr(60, 8.0), bad, None)


def test_sampling():
    assert Sampling(frames=6).indices(cfr(60, 8.0)) == uniform_indices(60, 6)
    assert Sampling(frames=6, max_frames=4).indices(cfr(60, 8.0)) == uniform_indices(60, 4)
    assert Sampling(fps=1.0).indices(cfr(60, 8.0)) == list(range(0, 60, 8))
    assert Sampling(fps=4.0, max_frames=5).indices(cfr(60, 8.0)) == uniform_indices(60, 5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"frames": 4, "fps": 1.0}, {"frames": 0}, {"fps": 0.0}, {"fps": -2.0}, {"fps": float("nan")},
     {"fps": float("inf")}, {"frames": 4, "max_frames": 0}],
    ids=["neither", "both", "zero_frames", "zero_fps", "negative_fps", "nan_fps", "inf_fps", "zero_max_frames"],
)
def test_sampling_validation(kwargs):
    with pytest.raises(ValueError, match="Sampling"):
        Sampling(**kwargs)


def test_sampling_revalidates_after_mutation():
    sampling = Sampling(frames=4)
    sampling.fps = 2.0
    with pytest.raises(ValueError, match="exactly one"):
        sampling.indices(cfr(60, 8.0))


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_source(video, backend):
    source = FileSource(video, Sampling(frames=7), backend=backend)
    assert len(source) == 7 and source.info.num_frames == NUM_FRAMES
    frames = list(source)
    assert [f.index for f in frames] == uniform_indices(NUM_FRAMES, 7)
    assert [decode_index(f.image) for f in frames] == uniform_indices(NUM_FRAMES, 7)


def test_file_source_fps(video):
    source = FileSource(video, Sampling(fps=2.0))
    assert [decode_index(f.image) for f in source] == list(range(0, NUM_FRAMES, 4))
    assert source.sampled_fps == pytest.approx(len(source) / (NUM_FRAMES / FPS))  # frames over the duration


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file_url"])
def test_stream_source_reads_everything_in_order(video, as_url):
    url = f"file:{video}" if as_url else video
    frames = list(StreamSource(url, realtime=False))
    assert [f.index for f in frames] == list(range(NUM_FRAMES))
    assert [decode_index(f.image) for f in frames] == list(range(NUM_FRAMES))
    assert [f.ts for f in frames] == pytest.approx([i / FPS for i in range(NUM_FRAMES)], abs=1e-3)


def test_stream_source_fps_and_max_frames(video):
    frames = list(StreamSource(video, fps=2.0, realtime=False))
    assert [decode_index(f.image) for f in frames] == list(range(0, NUM_FRAMES, 4))
    frames = list(StreamSource(video, fps=3.0, max_frames=5, realtime=False))
    # at most one frame per 1/3 s: the first frame at or after each k/3 s (frames every 1/8 s)
    assert [f.index for f in frames] == [0, 3, 6, 8, 11]


def test_stream_source_realtime_paces(one_second_clip):
    start = time.monotonic()
    frames = list(StreamSource(one_second_clip, realtime=True))
    elapsed = time.monotonic() - start
    assert len(frames) == 8
    assert 0.8 <= elapsed < 1.6  # last frame is due at 7/8 s


def test_stream_source_time_goes_on_across_a_discontinuity(tmp_path, caplog):
    """Two MPEG-TS recordings back to back, as a restarted publisher sends them: the second's timestamps
    start again where the first's did. Stream time goes on one frame after the first's last frame, and
    the jump is logged once (it was 2 s back, and the server refused those frames' ts)."""
    size = (112, 112)
    first, second, joined = tmp_path / "first.ts", tmp_path / "second.ts", tmp_path / "joined.ts"
    write_video(first, 16, fps=8.0, size=size)
    write_video(second, 16, fps=8.0, size=size, content=lambda i: index_frame(16 + i, size))
    joined.write_bytes(first.read_bytes() + second.read_bytes() + second.read_bytes())
    source = StreamSource(joined, realtime=False)
    with caplog.at_level("WARNING", logger="video_io.sources"):
        frames = list(source)
    assert [decode_index(f.image) for f in frames] == list(range(32)) + list(range(16, 32))
    ts = [f.ts for f in frames]
    assert ts == pytest.approx([i / 8 for i in range(48)], abs=1e-3)
    assert source.discontinuities == 2 and caplog.text.count("jumped") == 1


@pytest.mark.parametrize("then", ["stall", "close"])
def test_a_source_that_stalls_or_dies_breaks_off(tmp_path, then):
    """Not a normal end: the frames that came are read, then UnreadableStreamError (a stall after the read
    timeout; a connection dropped mid-stream at once)."""
    [part] = ts_parts(tmp_path, count=1)
    with live_http([part], then=then) as url:
        source = StreamSource(url, realtime=False, read_timeout=1.0)
        frames = []
        started = time.monotonic()
        with pytest.raises(UnreadableStreamError, match="broke off after .* frames"):
            for frame in source:
                frames.append(frame)
        assert time.monotonic() - started < 10
    assert len(frames) >= 12 and source.frames == len(frames)  # what arrived before the stall was read


@pytest.mark.parametrize("then", ["stall", "close"])
def test_a_source_that_broke_off_is_opened_again_and_time_goes_on(tmp_path, then, caplog):
    parts = ts_parts(tmp_path)
    with live_http(parts, then=then) as url, caplog.at_level("WARNING", logger="video_io.sources"):
        source = StreamSource(url, realtime=False, read_timeout=1.0, reconnect=2)
        with pytest.raises(UnreadableStreamError, match="2 reconnects"):
            frames = []
            for frame in source:
                frames.append(frame)
    indices = [decode_index(f.image) for f in frames]
    assert indices[:12] == list(range(12)) and 24 in indices and indices == sorted(indices)
    ts = [f.ts for f in frames]
    assert all(b > a for a, b in zip(ts, ts[1:]))
    assert source.reconnects == 2 and "opening it again" in caplog.text


@pytest.mark.parametrize("url", ["/nonexistent/dir/clip.mp4", "http://127.0.0.1:9/clip.mp4"])
def test_stream_source_bad_url(url):
    with pytest.raises(UnreadableStreamError, match=url):
        StreamSource(url, open_timeout=2.0)


def test_stream_source_audio_only(audio_only):
    with pytest.raises(NoVideoStreamError):
        StreamSource(audio_only)


# ---------------------------------------------------------------- encoded images


def rgb(value: int, h: int = 8, w: int = 12) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_decode_image_png_and_jpeg():
    image = demo_frame(3, (64, 48))  # smooth content, so JPEG's loss stays small
    png = decode_image(encode(image, "PNG"))
    jpeg = decode_image(encode(image, "JPEG", quality=95))
    grey = decode_image(encode(Image.fromarray(image).convert("L"), "PNG"))  # greyscale -> RGB
    assert np.array_equal(png, image) and png.dtype == np.uint8
    assert jpeg.shape == image.shape and np.abs(jpeg.astype(int) - image).mean() < 3
    assert grey.shape == image.shape and np.array_equal(grey[..., 0], grey[..., 2])
    assert np.array_equal(decode_image(encode_image(image, "PNG")), image)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01garbage" * 50, "not a JPEG or PNG"),
        (encode(rgb(5, 32, 32), "GIF"), "not a JPEG or PNG"),
        (encode(noisy_frame(0, (64, 64)), "PNG")[:300], "corrupt|truncated"),
        (encode(noisy_frame(0, (64, 64)), "JPEG")[:300], "corrupt|truncated"),
    ],
    ids=["garbage", "gif", "truncated_png", "truncated_jpeg"],
)
def test_decode_image_rejects_bad_bytes(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data)


# ---------------------------------------------------------------- preprocessing


def test_pixels_for_tokens():
    assert pixels_for_tokens(144) == 144 * 28 * 28 == VIDEOMME_PRESET.min_pixels == VIDEOMME_PRESET.max_pixels


@pytest.mark.parametrize(
    ("height", "width", "min_pixels", "max_pixels", "expected"),
    [
        (224, 224, 56 * 56, 28 * 28 * 1280, (224, 224)),  # already multiples, within budget
        (10, 10, 56 * 56, 28 * 28 * 1280, (56, 56)),  # rounds to 0, scaled up to min_pixels
        (100, 150, 56 * 56, 28 * 28 * 1280, (112, 140)),  # nearest multiples
        (1080, 1920, 128 * 784, 768 * 784, (560, 1008)),  # default video preset, scaled down
        (90, 160, 128 * 784, 768 * 784, (252, 448)),  # default video preset, scaled up
        (720, 1280, 144 * 784, 144 * 784, (252, 448)),  # VideoMME 16:9
        (480, 640, 144 * 784, 144 * 784, (280, 364)),  # VideoMME 4:3 downscaled: 130 tokens
        (240, 320, 144 * 784, 144 * 784, (308, 392)),  # VideoMME 4:3 upscaled: 154 tokens
        (28, 5600, 56 * 56, 28 * 28 * 1280, (28, 5600)),  # aspect 200 is still allowed
    ],
)
def test_smart_resize_table(height, width, min_pixels, max_pixels, expected):
    assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def _transformers_smart_resize():
    """transformers' smart_resize, compiled from its source file: importing the module needs torchvision."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        pytest.skip("transformers is not installed")
    source = Path(spec.origin).parent / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py"
    tree = ast.parse(source.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    namespace = {"math": math}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["smart_resize"]


def test_smart_resize_matches_transformers_source():
    reference = _transformers_smart_resize()
    sizes = [(h, w) for h in range(8, 2200, 97) for w in range(8, 4000, 131) if max(h, w) / min(h, w) <= 200]
    budgets = [(56 * 56, 28 * 28 * 1280), (128 * 784, 768 * 784), (144 * 784, 144 * 784), (4 * 784, 16 * 784)]
    for min_pixels, max_pixels in budgets:
        for h, w in sizes:
            expected = reference(h, w, 28, min_pixels, max_pixels)
            assert smart_resize(h, w, 28, min_pixels, max_pixels) == expected, (h, w, min_pixels, max_pixels)


@pytest.mark.parametrize(
    ("height", "width", "tokens"),
    [
        (720, 1280, 144),  # 16:9 -> 9 x 16 blocks of 28 px
        (1080, 1920, 144),
        (360, 640, 144),
        (1280, 720, 144),  # portrait 9:16
        (480, 640, 130),  # 4:3 downscaled: floor to 10 x 13 blocks, fewer than 144
        (240, 320, 154),  # 4:3 upscaled: ceil to 11 x 14 blocks, more than 144
        (480, 854, 128),  # "16:9" SD that is not exactly 16:9: 8 x 16 blocks
    ],
)
def test_videomme_preset_tokens_per_frame_pair(height, width, tokens):
    """min = max = 144*28*28 gives exactly 144 tokens only when the sides split into 9 x 16 blocks.

    Otherwise rounding to multiples of 28 lands below (downscaling floors) or above (upscaling ceils).
    """
    budget = VIDEOMME_PRESET.max_pixels
    resized_height, resized_width = smart_resize(height, width, 28, min_pixels=budget, max_pixels=budget)
    grid_h, grid_w = resized_height // 14, resized_width // 14
    assert grid_h * grid_w // 4 == tokens


def test_preprocess_videomme_16_9():
    frames = [noisy_frame(i, (640, 360)) for i in range(4)]
    patches = preprocess_frames(frames, VIDEOMME_PRESET)
    assert patches.grid_thw == (2, 18, 32)
    assert patches.num_tokens == 2 * 144
    assert patches.pixel_values.shape == (2 * 18 * 32, 3 * 2 * 14 * 14)
    assert patches.pixel_values.dtype == torch.float32


def _normalised(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float64, rescaled and CLIP-normalised."""
    return ((frame / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_patch_order_matches_explicit_loops():
    # 56 x 56 stays 56 x 56 (no resize): 4 x 4 patches of 14 px, one 2 x 2 merge block per quadrant
    preset = VisionPreset(min_pixels=56 * 56, max_pixels=56 * 56)
    frames = [np.random.default_rng(t).integers(0, 256, (56, 56, 3), dtype=np.uint8) for t in range(4)]
    patches = preprocess_frames(frames, preset)
    assert patches.grid_thw == (2, 4, 4)
    p, m = 14, 2
    rows = []
    for t in range(2):
        pair = [_normalised(frames[2 * t + k]) for k in range(2)]
        for block_row in range(2):
            for block_col in range(2):
                for r in range(m):
                    for c in range(m):
                        y, x = (block_row * m + r) * p, (block_col * m + c) * p
                        # one row: channel, then frame of the pair, then the 14 x 14 pixels
                        patch = [[f[ch, y : y + p, x : x + p] for f in pair] for ch in range(3)]
                        rows.append(np.array(patch).ravel())
    np.testing.assert_allclose(patches.pixel_values.numpy(), np.stack(rows), atol=1e-5)


def test_odd_frame_count_repeats_last_frame():
    preset = VisionPreset(min_pixels=56 * 56, max_pixels=56 * 56)
    frames = [noisy_frame(i, (56, 56)) for i in range(3)]
    padded = preprocess_frames(frames, preset)
    assert padded.grid_thw == (2, 4, 4)
    assert torch.equal(padded.pixel_values, preprocess_frames(frames + frames[-1:], preset).pixel_values)


@pytest.mark.parametrize("preset, mean, std", [
    (VisionPreset(min_pixels=56 * 56, max_pixels=56 * 56), CLIP_MEAN, CLIP_STD),
    # Qwen3-VL: 16-pixel patches (64 x 64 frames: 4 x 4 patches), mean and std 0.5
    (replace(QWEN3_PRESET, min_pixels=64 * 64, max_pixels=64 * 64), (0.5,) * 3, (0.5,) * 3),
])
def test_normalisation_values(preset, mean, std):
    side = 4 * preset.patch_size
    frame = np.empty((side, side, 3), np.uint8)
    frame[...] = (0, 128, 255)
    patches = preprocess_frames([frame, frame], preset)
    assert patches.grid_thw == (1, 4, 4) and patches.pixel_values.shape[1] == 3 * 2 * preset.patch_size ** 2
    values = patches.pixel_values.view(16, 3, -1)  # (rows, channel, rest)
    for channel, value in enumerate((0, 128, 255)):
        expected = (value / 255 - mean[channel]) / std[channel]
        np.testing.assert_allclose(values[:, channel].numpy(), expected, atol=1e-6)


def test_resize_is_torch_native_uint8_bicubic_antialias():
    # torchvision's CPU resize hands the uint8 tensor to interpolate; a float resize + round would
    # differ by several levels on this textured frame
    frames = [noisy_frame(i, (160, 90)) for i in range(2)]
    patches = preprocess_frames(frames)
    assert patches.grid_thw == (1, 18, 32)  # the default preset scales 90x160 up to 252x448
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        video, size=(252, 448), mode="bicubic", align_corners=False, antialias=True
    )
    assert resized.dtype == torch.uint8  # supported natively by this torch
    expected = np.stack([_normalised(frame.permute(1, 2, 0).numpy()) for frame in resized])  # (t, ch, y, x)
    # undo the patch order: (block row, block col, r, c, ch, t, y, x) -> (t, ch, y, x)
    ours = patches.pixel_values.view(18 // 2, 32 // 2, 2, 2, 3, 2, 14, 14)
    ours = ours.permute(5, 4, 0, 2, 6, 1, 3, 7).reshape(2, 3, 252, 448)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [rgb(0, 56, 56), rgb(0, 56, 84)],
        [np.zeros((56, 56, 3), np.float32)] * 2,
        [np.zeros((56, 56), np.uint8)] * 2,
    ],
    ids=["empty", "mixed_sizes", "float", "gray"],
)
def test_preprocess_rejects_bad_frames(frames):
    with pytest.raises(ValueError):
        preprocess_frames(frames)


@pytest.mark.parametrize(
    ("preset", "size", "num_frames"),
    [(VisionPreset(), (160, 90), 3), (VIDEOMME_PRESET, (640, 360), 2), (VisionPreset(), (1280, 720), 2)],
    ids=["default_upscale_odd", "videomme_downscale", "default_downscale"],
)
def test_matches_transformers_video_processor(preset, size, num_frames):
    pytest.importorskip("torchvision", reason="transformers' Qwen2VLVideoProcessor needs torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = [noisy_frame(i, size) for i in range(num_frames)]
    processor = Qwen2VLVideoProcessor()
    kwargs = {}
    if "cap_pixels_per_frame" in getattr(processor.valid_kwargs, "__annotations__", {}):
        kwargs["cap_pixels_per_frame"] = False  # newer versions: keep the plain per-frame budget
    expected = processor(
        videos=[np.stack(frames)],  # one (T, H, W, 3) uint8 video
        do_sample_frames=False,
        size={"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels},
        return_tensors="pt",
        **kwargs,
    )
    ours = preprocess_frames(frames, preset)
    assert expected["video_grid_thw"].tolist() == [list(ours.grid_thw)]
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values_videos"], atol=1e-5, rtol=0)


def test_matches_qwen_vl_utils_smart_resize():
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils", reason="qwen_vl_utils needs torchvision")
    # usual video sizes; the two differ only in degenerate cases (a side rounding to 0 or below one factor)
    sizes = [(720, 1280), (1080, 1920), (480, 640), (240, 320), (1280, 720), (360, 480), (2160, 3840)]
    for height, width in sizes:
        for low, high in [(128, 768), (144, 144)]:
            budget = {"min_pixels": low * 28 * 28, "max_pixels": high * 28 * 28}
            expected = qwen_vl_utils.smart_resize(height, width, factor=28, **budget)
            assert smart_resize(height, width, 28, **budget) == tuple(expected)
