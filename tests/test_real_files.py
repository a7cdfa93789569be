"""Odd but ordinary files (issue 16): MPEG-TS with B-frames, open GOPs, VP9, rotation metadata and
variable frame rates. The suite encodes each with PyAV; every read is checked against the index
each frame carries (video_io.synthetic.index_frame)."""

import logging
import random
from fractions import Fraction

import av
import numpy as np
import pytest

from video_io.readers import probe, read_frames
from video_io.sampling import Sampling, uniform_indices
from video_io.sources import FileSource
from video_io.synthetic import decode_index, index_frame, write_video
from video_io.readers import frame_times

SIZE = (112, 112)


def encode(path, frames: int, codec: str = "libx264", options: dict | None = None, size=SIZE,
           times: list[float] | None = None, rotation: int = 0, rate: int = 8):
    """Index-coded frames; `times` (seconds) makes the rate variable, `rotation` sets the display matrix."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
        base = Fraction(1, 1000) if times is not None else Fraction(1, rate)
        stream.codec_context.time_base = base
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, size), format="rgb24")
            frame.pts, frame.time_base = (round(times[i] * 1000) if times is not None else i), base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    open_gop = "open-gop=1:keyint=48:min-keyint=48:scenecut=0:bframes=3:b-pyramid=normal"
    write_video(folder / "b_frames.ts", 60, gop=12)  # libx264: B-frames
    return {
        "ts": folder / "b_frames.ts",
        "open_gop": encode(folder / "open_gop.mp4", 200, options={"x264-params": open_gop}),
        "vp9": encode(folder / "clip.webm", 60, codec="libvpx-vp9",
                      options={"g": "12", "auto-alt-ref": "1", "lag-in-frames": "16", "cpu-used": "8"}),
    }


def exact(frames) -> bool:
    return all(decode_index(f.image) == f.index for f in frames)


def some_indices(count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(count), min(count, 30)))


@pytest.mark.parametrize("kind", ["ts", "open_gop", "vp9"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_every_frame_and_any_subset_is_exact(files, kind, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    path = files[kind]
    count = probe(path).num_frames
    for indices in ([0], list(range(count)), uniform_indices(count, 16), some_indices(count, 1), [count - 1]):
        assert exact(read_frames(path, indices, backend=backend)), (kind, backend, indices[:5])


def test_pyav_decodes_an_mpeg_ts_from_its_first_frame(files):
    # seeking a TS to frame 0's timestamp lands at the next keyframe: decoding starts from the file's start
    frames = read_frames(files["ts"], [0, 1])
    assert [decode_index(f.image) for f in frames] == [0, 1] and frames[0].ts == 0.0


@pytest.mark.parametrize("kind", ["ts", "open_gop"])
def test_decord_is_not_trusted_where_it_returns_wrong_frames(files, kind, caplog):
    pytest.importorskip("decord")
    with caplog.at_level(logging.WARNING, logger="video_io.readers"):
        frames = read_frames(files[kind], some_indices(probe(files[kind]).num_frames, 2), backend="decord")
    assert exact(frames)
    assert "decord returns wrong frames" in caplog.text and "PyAV instead" in caplog.text


def test_a_decord_failure_reads_the_rest_with_pyav(files, caplog, monkeypatch):
    decord = pytest.importorskip("decord")

    def fail(self, indices):  # what decord raises on some VP9 files for non-consecutive indices
        raise decord.DECORDError("[12:00:00] src/video/video_reader.cc:599: Check failed")

    monkeypatch.setattr(decord.VideoReader, "get_batch", fail)
    with caplog.at_level(logging.WARNING, logger="video_io.readers"):
        frames = read_frames(files["vp9"], [3, 17, 40], backend="decord")
    assert exact(frames) and "decord failed at frames 3..40" in caplog.text


def test_decord_with_wrong_timestamps_is_not_trusted(files, caplog, monkeypatch):
    decord = pytest.importorskip("decord")
    stamps = decord.VideoReader.get_frame_timestamp
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", lambda self, i: stamps(self, i) + 0.5)
    with caplog.at_level(logging.WARNING, logger="video_io.readers"):
        frames = read_frames(files["vp9"], [3, 17, 40], backend="decord")
    assert exact(frames) and "timestamps disagree" in caplog.text


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotation_is_applied_and_both_backends_agree(tmp_path, rotation):
    path = encode(tmp_path / "phone.mp4", 12, size=(160, 120), rotation=rotation)
    info = probe(path)
    turned = rotation % 180 != 0
    assert (info.width, info.height) == ((120, 160) if turned else (160, 120))
    stored = index_frame(5, (160, 120))
    (frame,) = read_frames(path, [5])
    assert frame.image.shape == (info.height, info.width, 3)
    assert np.abs(frame.image.astype(int) - np.rot90(stored, rotation // 90).astype(int)).mean() < 8
    pytest.importorskip("decord")
    (other,) = read_frames(path, [5], backend="decord")
    assert other.image.shape == frame.image.shape and np.abs(other.image.astype(int) - frame.image).max() <= 2


def vfr_times() -> list[float]:
    """A 9.9 s clip: 20 frames at 30 fps, then 20 frames over the remaining 9.2 s."""
    fast = [i / 30 for i in range(20)]
    return fast + [fast[-1] + (k + 1) * (9.9 - fast[-1]) / 20 for k in range(20)]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path, suffix):
    times = vfr_times()
    path = encode(tmp_path / f"vfr{suffix}", len(times), times=times, rate=30)
    assert frame_times(path) == pytest.approx(times, abs=2e-3)
    info = probe(path)
    assert info.duration == pytest.approx(9.9 + 9.9 / 39, abs=0.05)  # was 40 / 30 = 1.3 s on the .mkv
    source = FileSource(path, Sampling(fps=1.0))
    assert len(source) == 11  # 0, 1, ..., 10 s: the last frame is shown until ~10.15 s (was 4 on the .mkv)
    gaps = np.diff(times).max()
    for k, index in enumerate(source.indices):
        assert abs(times[index] - k) <= gaps / 2 + 1e-3  # the nearest frame to k seconds
    frames = list(source)
    assert exact(frames) and [f.ts for f in frames] == pytest.approx([times[i] for i in source.indices], abs=2e-3)
