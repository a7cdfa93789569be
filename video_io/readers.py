"""Exact, random-access frame reading from video files with PyAV (default) or decord.

Frame i is the i-th frame in presentation order. The frame table (presentation timestamps and
keyframes of every frame) comes from demuxing the file's packets, which reads the file but
decodes nothing but its first frame; it is cached per file. A requested frame is decoded forward
from the nearest keyframe before it, never replaced by that keyframe. Frames come out as
displayed: a rotation in the file's display matrix (phone videos) is applied, as players and
ffmpeg apply it. Rate and duration come from the frames' own timestamps, not from the
container's nominal rate, which variable-frame-rate files misstate.
"""

import bisect
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import NoFramesError, NotAVideoError, NoVideoStreamError, VideoError, VideoNotFoundError
from .frames import Frame

log = logging.getLogger(__name__)
BACKENDS = ("pyav", "decord")
_DECORD_BATCH = 16  # frames per decord get_batch call: bounds memory for long index lists


@dataclass(frozen=True)
class VideoInfo:
    path: str  # absolute
    num_frames: int  # frames the readers can return: valid indices are 0..num_frames-1
    fps: float  # mean frame rate over the frames' timestamps
    duration: float  # seconds from the first frame's start to the last one's end (num_frames / fps)
    width: int  # as displayed: after the file's rotation
    height: int


@dataclass(frozen=True)
class _FrameTable:
    info: VideoInfo
    pts: list[int]  # presentation timestamp of each frame, ascending, in time_base units
    keyframes: list[int]  # indices of the keyframes, ascending
    time_base: Fraction
    container_format: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts"
    open_gop: bool  # some frame after a keyframe in decode order is shown before it (it refers to the GOP before)

    def keyframe_before(self, index: int) -> int:
        """Index of the last keyframe at or before `index` (0 if the file starts without one)."""
        if not self.keyframes:
            return 0
        return self.keyframes[max(bisect.bisect_right(self.keyframes, index) - 1, 0)]

    def seconds(self, pts: int) -> float:
        return float((pts - self.pts[0]) * self.time_base)

    @property
    def times(self) -> list[float]:
        """Each frame's presentation time, seconds from the first frame."""
        return [self.seconds(p) for p in self.pts]


def displayed(av_frame: av.VideoFrame) -> np.ndarray:
    """The frame as uint8 RGB, turned by the rotation of the file's display matrix (counter-clockwise)."""
    image = av_frame.to_ndarray(format="rgb24")
    turns = (av_frame.rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def not_found(path: str) -> VideoNotFoundError:
    return VideoNotFoundError(f"{path}: no such file (working directory {os.getcwd()}); check the path")


def open_video(path: str | Path) -> av.container.InputContainer:
    """Open a local file with PyAV, turning failures into VideoError subclasses."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise not_found(path)
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
        open_gop, keyframe_pts = False, None
        for p, key in packets:  # decode order
            if key:
                keyframe_pts = p
            elif keyframe_pts is not None and p < keyframe_pts:
                open_gop = True
                break
        packets.sort()
        pts = [p for p, _ in packets]
        if len(pts) > 1 and pts[-1] > pts[0]:  # exact for constant rates: 8 fps is 8.0, not 7.9999
            fps = float((len(pts) - 1) / ((pts[-1] - pts[0]) * stream.time_base))
        else:  # one frame: the nominal rate, or any positive value, which keeps fps sampling valid
            fps = float(stream.average_rate or stream.guessed_rate or 1)
        try:
            container.seek(0)
            first = next(container.decode(stream), None)
        except av.error.FFmpegError:
            first = None  # the readers will say what is wrong with the frames; here only the rotation is lost
        turned = first is not None and first.rotation % 180 != 0
        width, height = stream.codec_context.width, stream.codec_context.height
        info = VideoInfo(path=path, num_frames=len(pts), fps=fps, duration=len(pts) / fps,
                         width=height if turned else width, height=width if turned else height)
        keyframes = [i for i, (_, key) in enumerate(packets) if key]
        return _FrameTable(info=info, pts=pts, keyframes=keyframes, time_base=stream.time_base,
                           container_format=container.format.name, open_gop=open_gop)


@functools.lru_cache(maxsize=64)
def _cached_table(path: str, mtime_ns: int, size: int) -> _FrameTable:
    return _build_table(path)


def _frame_table(path: str | Path) -> _FrameTable:
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise not_found(path) from None
    # keyed on mtime and size so a rewritten file is indexed again
    return _cached_table(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


def probe(path: str | Path) -> VideoInfo:
    """Frame count, rate, duration and size of a video file (reads the file, decodes nothing)."""
    return _frame_table(path).info


def frame_times(path: str | Path) -> list[float]:
    """Each frame's presentation time in seconds from the first frame (reads the file, decodes nothing)."""
    return _frame_table(path).times


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
            found = None
            # Decode forward when the target's keyframe is not beyond what was decoded: cheaper than a
            # seek, and no decoder flush.
            if decoded is not None and table.keyframe_before(target) <= position:
                found, position = _advance(decoded, index_of_pts, target)
            if found is None:
                found, decoded = _seek(container, stream, table, index_of_pts, target, path)
                position = target
            yield Frame(image=displayed(found), ts=table.seconds(found.pts), index=target)


def _advance(decoded: Iterator[av.VideoFrame], index_of_pts: dict[int, int],
             target: int) -> tuple[av.VideoFrame | None, int]:
    """Decode forward to frame `target`: (that frame, target), or (None, the last index seen) when the
    decoder passed it without producing it or ran out."""
    position = -1
    for av_frame in decoded:
        position = index_of_pts.get(av_frame.pts, position)
        if position == target:
            return av_frame, target
        if position > target:
            break
    return None, position


def _seek(container, stream, table: _FrameTable, index_of_pts: dict[int, int], target: int,
          path: str) -> tuple[av.VideoFrame, Iterator[av.VideoFrame]]:
    """(frame `target`, the decoder positioned after it), decoding from the keyframe before it, or an
    earlier one, or at last the start of the file.

    A seek can land late (MPEG-TS seeks by timestamps that run ahead of the frames' presentation
    times, so it lands a keyframe after the one asked for), and after a seek to an open-GOP keyframe
    the frames that refer to the previous GOP are dropped: each step back covers both. Decoding
    from the start always works.
    """
    keyframe = table.keyframe_before(target)
    for k in [k for k in table.keyframes if k <= keyframe][::-1]:
        if k == 0:
            break  # the start of the file, below
        container.seek(table.pts[k], stream=stream, backward=True, any_frame=False)
        decoded = container.decode(stream)
        found, _ = _advance(decoded, index_of_pts, target)
        if found is not None:
            return found, decoded
    container.seek(0)  # in AV_TIME_BASE: the container's very start
    decoded = container.decode(stream)
    found, _ = _advance(decoded, index_of_pts, target)
    if found is None:
        raise NoFramesError(f"{path}: frame {target} could not be decoded even from the start of the file; "
                            "the file is truncated or damaged: re-encode or re-download it")
    return found, decoded


def _import_decord():
    try:
        import decord
    except ImportError as e:
        raise ImportError(
            "backend='decord' needs the decord package: pip install 'video-streamer[decord]' "
            "(or use the default backend='pyav')"
        ) from e
    return decord


def _decord_risk(table: _FrameTable) -> str | None:
    """Why decord would return wrong frames for this file, where that is known (measured with decord
    0.6.0): it seeks MPEG-TS by timestamps that run ahead of the frames (on a TS file with B-frames,
    every frame it returned was another), and after a seek to an open-GOP keyframe it returns frames
    of the wrong GOP (a tenth to a fifth of them)."""
    if "mpegts" in table.container_format.split(","):
        return "an MPEG-TS file"
    if table.open_gop:
        return "a file with open GOPs"
    return None


def _iter_decord(path: str, table: _FrameTable, indices: list[int]) -> Iterator[Frame]:
    """decord's frames, checked: where decord is known to go wrong, or its timestamps disagree with the
    frame table, or it fails, the frames come from PyAV instead (with a warning), never wrong ones."""
    decord = _import_decord()
    if (risk := _decord_risk(table)) is not None:
        log.warning("%s: decord returns wrong frames for %s; reading it with PyAV instead", path, risk)
        yield from _iter_pyav(path, table, indices)
        return
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
    except decord.DECORDError as e:
        raise VideoError(f"{path}: decord cannot open it ({e}); use backend='pyav'") from e
    if len(reader) != table.info.num_frames:
        raise VideoError(
            f"{path}: decord counts {len(reader)} frames where PyAV counts {table.info.num_frames}, "
            "so indices would address different frames; use backend='pyav'"
        )
    half_frame = 0.5 / table.info.fps
    for lo in range(0, len(indices), _DECORD_BATCH):
        batch = indices[lo : lo + _DECORD_BATCH]
        try:
            images = reader.get_batch(batch).asnumpy()
            starts = reader.get_frame_timestamp(batch)[:, 0]
        except decord.DECORDError as e:
            log.warning("%s: decord failed at frames %d..%d (%s); reading the rest with PyAV", path, batch[0],
                        batch[-1], str(e).splitlines()[0][:200])
            yield from _iter_pyav(path, table, indices[lo:])
            return
        expected = [float(table.pts[i] * table.time_base) for i in batch]
        if any(abs(float(got) - want) > half_frame for got, want in zip(starts, expected)):
            log.warning("%s: decord's timestamps disagree with the file's from frame %d on; reading the rest "
                        "with PyAV", path, batch[0])
            yield from _iter_pyav(path, table, indices[lo:])
            return
        for index, image in zip(batch, images):
            yield Frame(image=image, ts=table.seconds(table.pts[index]), index=index)


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
