"""Exact, random-access frame reading from video files with PyAV (default) or decord.

Frame i is the i-th frame in presentation order. The frame table (presentation timestamps and
keyframes of every frame) comes from demuxing the file's packets, which reads the file but
decodes nothing; it is cached per file. A requested frame is decoded forward from the nearest
keyframe before it, never replaced by that keyframe.
"""

import bisect
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from .errors import NoFramesError, NotAVideoError, NoVideoStreamError, VideoError, VideoNotFoundError
from .frames import Frame

BACKENDS = ("pyav", "decord")
_DECORD_BATCH = 16  # frames per decord get_batch call: bounds memory for long index lists


@dataclass(frozen=True)
class VideoInfo:
    path: str  # absolute
    num_frames: int  # frames the readers can return: valid indices are 0..num_frames-1
    fps: float  # average frame rate
    duration: float  # num_frames / fps, seconds
    width: int
    height: int


@dataclass(frozen=True)
class _FrameTable:
    info: VideoInfo
    pts: list[int]  # presentation timestamp of each frame, ascending, in time_base units
    keyframes: list[int]  # indices of the keyframes, ascending
    time_base: Fraction

    def keyframe_before(self, index: int) -> int:
        """Index of the last keyframe at or before `index` (0 if the file starts without one)."""
        if not self.keyframes:
            return 0
        return self.keyframes[max(bisect.bisect_right(self.keyframes, index) - 1, 0)]

    def seconds(self, pts: int) -> float:
        return float((pts - self.pts[0]) * self.time_base)


def _not_found(path: str) -> VideoNotFoundError:
    return VideoNotFoundError(f"{path}: no such file (working directory {os.getcwd()}); check the path")


def open_video(path: str | Path) -> av.container.InputContainer:
    """Open a local file with PyAV, turning failures into VideoError subclasses."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _not_found(path)
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise NotAVideoError(
            f"{path}: not a media file FFmpeg can read ({e.strerror}); check that it is a complete video file"
        ) from e
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "no streams at all"
        container.close()
        raise NoVideoStreamError(f"{path}: contains {kinds} but no video stream; pass a file with video")
    return container


def _build_table(path: str) -> _FrameTable:
    with open_video(path) as container:
        stream = container.streams.video[0]
        try:
            # size 0 marks the demuxer's final flush packet; discard-flagged packets (e.g. before
            # an mp4 edit list's start) are decoded but never output as frames
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
        except av.error.FFmpegError as e:
            raise NotAVideoError(
                f"{path}: the file is corrupt ({e.strerror}); re-encode or re-download it"
            ) from e
        if any(pts is None for pts, _ in packets):
            raise VideoError(
                f"{path}: its video packets carry no timestamps (a raw elementary stream?), so frames "
                "cannot be located; remux it into a container first, e.g. `ffmpeg -i IN -c copy OUT.mp4`"
            )
        if not packets:
            raise NoFramesError(
                f"{path}: the video stream holds no frames; the file is empty or was cut short"
            )
        packets.sort()
        pts = [p for p, _ in packets]
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            fps = float(rate)
        elif len(pts) > 1:
            fps = (len(pts) - 1) / float((pts[-1] - pts[0]) * stream.time_base)
        else:
            fps = 1.0  # a single frame without a rate: any positive value keeps fps sampling valid
        info = VideoInfo(
            path=path,
            num_frames=len(pts),
            fps=fps,
            duration=len(pts) / fps,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
        )
        keyframes = [i for i, (_, key) in enumerate(packets) if key]
        return _FrameTable(info=info, pts=pts, keyframes=keyframes, time_base=stream.time_base)


@functools.lru_cache(maxsize=64)
def _cached_table(path: str, mtime_ns: int, size: int) -> _FrameTable:
    return _build_table(path)


def _frame_table(path: str | Path) -> _FrameTable:
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise _not_found(path) from None
    # keyed on mtime and size so a rewritten file is indexed again
    return _cached_table(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


def probe(path: str | Path) -> VideoInfo:
    """Frame count, rate, duration and size of a video file (reads the file, decodes nothing)."""
    return _frame_table(path).info


def _check_indices(indices: Sequence[int], num_frames: int, path: str) -> list[int]:
    indices = [int(i) for i in indices]
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"{path}: frame indices must be sorted and unique, got {indices[:8]}...")
    if indices and (indices[0] < 0 or indices[-1] >= num_frames):
        raise ValueError(
            f"{path}: frame indices must lie in 0..{num_frames - 1}, got {indices[0]}..{indices[-1]}"
        )
    return indices


def _iter_pyav(path: str, table: _FrameTable, indices: list[int]) -> Iterator[Frame]:
    index_of_pts = {pts: i for i, pts in enumerate(table.pts)}
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded: Iterator[av.VideoFrame] | None = None
        position = -1  # index of the last frame taken from `decoded`
        for target in indices:
            keyframe = table.keyframe_before(target)
            # Seek only when it skips frames: the target's keyframe lies beyond what was decoded.
            # Otherwise decoding forward is cheaper and needs no decoder flush.
            if decoded is None or keyframe > position:
                decoded, position = _seek(container, stream, table, keyframe, target, path), -1
            for av_frame in decoded:
                position = index_of_pts.get(av_frame.pts, -1)
                if position == target:
                    image = av_frame.to_ndarray(format="rgb24")
                    yield Frame(image=image, ts=table.seconds(av_frame.pts), index=target)
                    break
                if position > target:
                    raise VideoError(f"{path}: decoding skipped frame {target}; try backend='decord'")
            else:
                raise NoFramesError(f"{path}: frame {target} could not be decoded; the file may be truncated")


def _seek(
    container, stream, table: _FrameTable, keyframe: int, target: int, path: str
) -> Iterator[av.VideoFrame]:
    """Decoded frames starting at or before `target`, from the keyframe `keyframe` or an earlier one.

    Containers may seek by decode timestamps or imprecisely; if the first frame out is already past
    the target, step back one keyframe and try again (the start of the file always works).
    """
    candidates = [k for k in table.keyframes if k <= keyframe][::-1] or [0]
    for k in candidates:
        container.seek(table.pts[k], stream=stream, backward=True, any_frame=False)
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is not None and first.pts is not None and first.pts <= table.pts[target]:
            return _prepend(first, decoded)
    raise VideoError(f"{path}: cannot seek to frame {target}; try backend='decord'")


def _prepend(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


def _import_decord():
    try:
        import decord
    except ImportError as e:
        raise ImportError(
            "backend='decord' needs the decord package: pip install 'video-streamer[decord]' "
            "(or use the default backend='pyav')"
        ) from e
    return decord


def _iter_decord(path: str, table: _FrameTable, indices: list[int]) -> Iterator[Frame]:
    decord = _import_decord()
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
    except decord.DECORDError as e:
        raise VideoError(f"{path}: decord cannot open it ({e}); use backend='pyav'") from e
    if len(reader) != table.info.num_frames:
        raise VideoError(
            f"{path}: decord counts {len(reader)} frames where PyAV counts {table.info.num_frames}, "
            "so indices would address different frames; use backend='pyav'"
        )
    start = float(reader.get_frame_timestamp(0)[0])
    for lo in range(0, len(indices), _DECORD_BATCH):
        batch = indices[lo : lo + _DECORD_BATCH]
        images = reader.get_batch(batch).asnumpy()
        starts = reader.get_frame_timestamp(batch)[:, 0]
        for index, image, ts in zip(batch, images, starts):
            yield Frame(image=image, ts=float(ts) - start, index=index)


def iter_frames(path: str | Path, indices: Sequence[int], backend: str = "pyav") -> Iterator[Frame]:
    """Yield exactly the frames at `indices` (sorted, unique, in range) as uint8 RGB.

    Timestamps are seconds from the first frame. File errors and bad indices raise here, at the
    call, not at the first next().
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    path = os.fspath(path)
    table = _frame_table(path)
    indices = _check_indices(indices, table.info.num_frames, path)
    if backend == "decord":
        _import_decord()  # fail at the call, not at the first frame
        return _iter_decord(path, table, indices)
    return _iter_pyav(path, table, indices)


def read_frames(path: str | Path, indices: Sequence[int], backend: str = "pyav") -> list[Frame]:
    return list(iter_frames(path, indices, backend))
