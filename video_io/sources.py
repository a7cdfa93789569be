"""Frame sources for streaming: each is an iterator of Frame.

FileSource reads sampled frames of a local file; StreamSource follows anything FFmpeg can open
(rtsp, http, file URLs) at the source's pace.
"""

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import av

from .errors import NoVideoStreamError, UnreadableStreamError
from .frames import Frame
from .readers import BACKENDS, displayed, frame_times, iter_frames, probe
from .sampling import Sampling


class FileSource:
    """The frames of a local video file chosen by `sampling`, in order; with `until`, chosen over the part
    of the video up to that many seconds only (at least its first frame), as if the file ended there."""

    def __init__(self, path: str | Path, sampling: Sampling, backend: str = "pyav", until: float | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.path = os.fspath(path)
        self.backend = backend
        self.info = probe(self.path)
        times = frame_times(self.path)
        if until is not None:
            times = [t for t in times if t <= until] or times[:1]
        self.duration = self.info.duration * len(times) / self.info.num_frames  # of the part read
        self.indices = sampling.indices(times)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def sampled_fps(self) -> float:
        """Frames per second of video time this source yields: its frame count over the duration of the part
        read, as transformers' VideoMetadata.sampled_fps and qwen-vl-utils compute it."""
        return len(self.indices) / self.duration

    def __iter__(self) -> Iterator[Frame]:
        return iter_frames(self.path, self.indices, self.backend)


class StreamSource:
    """Frames of a URL or path as FFmpeg delivers them; single use.

    fps: keep at most one frame per 1/fps seconds of stream time (the first of each interval).
    max_frames: stop after yielding this many frames.
    realtime: yield no frame before its timestamp on the wall clock, measured from the first frame.
        A live source is paced by its arrival anyway; for a file this replays it like a live one.
    open_timeout: seconds to wait for the source to open, and for each later read.
    """

    def __init__(
        self,
        url: str | Path,
        fps: float | None = None,
        max_frames: int | None = None,
        realtime: bool = True,
        open_timeout: float = 10.0,
    ):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.url = os.fspath(url)
        self.fps, self.max_frames, self.realtime = fps, max_frames, realtime
        # UDP (FFmpeg's rtsp default) drops packets behind NAT and firewalls; TCP is the safe choice
        options = {"rtsp_transport": "tcp"} if self.url.startswith(("rtsp://", "rtsps://")) else {}
        try:
            self._container = av.open(self.url, options=options, timeout=open_timeout)
        except (av.error.FFmpegError, OSError) as e:
            raise UnreadableStreamError(
                f"{self.url}: cannot open the stream ({e}); check the URL and that the source is up "
                "and reachable"
            ) from e
        if not self._container.streams.video:
            self._container.close()
            raise NoVideoStreamError(f"{self.url}: the stream carries no video; point to a video source")

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[Frame]:
        stream = self._container.streams.video[0]
        first_pts = wall_start = last_slot = None
        kept = 0
        try:
            for index, av_frame in enumerate(self._container.decode(stream)):
                now = time.monotonic()
                if wall_start is None:
                    wall_start, first_pts = now, av_frame.pts
                if av_frame.pts is None or first_pts is None:
                    ts = now - wall_start  # no timestamps (some live sources): arrival time
                else:
                    ts = float((av_frame.pts - first_pts) * stream.time_base)
                if self.fps is not None:
                    slot = math.floor(ts * self.fps + 1e-6)  # tolerance: 0.4999999 s is 0.5 s
                    if slot == last_slot:
                        continue
                    last_slot = slot
                if self.realtime and (delay := wall_start + ts - time.monotonic()) > 0:
                    time.sleep(delay)
                yield Frame(image=displayed(av_frame), ts=ts, index=index)
                kept += 1
                if kept == self.max_frames:
                    break
        except av.error.FFmpegError as e:
            raise UnreadableStreamError(
                f"{self.url}: the stream broke off after {kept} frames ({e}); reconnect to continue"
            ) from e
        finally:
            self.close()
