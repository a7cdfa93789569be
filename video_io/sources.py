"""Frame sources for streaming: each is an iterator of Frame.

FileSource reads sampled frames of a local file; StreamSource follows anything FFmpeg can open
(rtsp, http, file URLs) at the source's pace.
"""

import logging
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

log = logging.getLogger(__name__)
# a timestamp more than this many seconds ahead of the wall-clock time since the last frame is a jump
# (a publisher restarted with other timestamps), not a pause: realtime pacing would sleep it out
FORWARD_JUMP_S = 10.0


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

    def close(self) -> None:
        """Nothing stays open between reads (the same call as StreamSource's)."""


class StreamSource:
    """Frames of a URL or path as FFmpeg delivers them; single use.

    fps: keep at most one frame per 1/fps seconds of stream time (the first of each interval).
    max_frames: stop after yielding this many frames.
    realtime: yield no frame before its timestamp on the wall clock, measured from the first frame.
        A live source is paced by its arrival anyway; for a file this replays it like a live one.
    open_timeout: seconds to wait for the source to open; read_timeout: for each later read (a
        source that sends nothing for that long has stalled: it broke off).
    reconnect: times to open the source again after it broke off (a stall, a dropped connection),
        waiting 1, 2, 4 ... (at most 10) seconds before each; then it raises UnreadableStreamError.
    until: stop at this much stream time (seconds; the frames before it).

    Stream time (Frame.ts) starts at 0 and never goes back: where the source's timestamps jump (an
    MPEG-TS discontinuity, a publisher that restarted: back, or forward by more than FORWARD_JUMP_S
    beyond the wall-clock gap) or the source was opened again, it continues one frame interval after
    the last frame, and the first such jump is logged. `discontinuities` counts them, `reconnects`
    the reopenings; `frames` the frames yielded.
    """

    def __init__(
        self,
        url: str | Path,
        fps: float | None = None,
        max_frames: int | None = None,
        realtime: bool = True,
        open_timeout: float = 10.0,
        read_timeout: float | None = None,
        reconnect: int = 0,
        until: float | None = None,
    ):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        for name, value in (("open_timeout", open_timeout), ("read_timeout", read_timeout), ("until", until)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        if reconnect < 0:
            raise ValueError(f"reconnect must be >= 0, got {reconnect}")
        self.url = os.fspath(url)
        self.fps, self.max_frames, self.realtime = fps, max_frames, realtime
        self.timeouts = (open_timeout, read_timeout or open_timeout)
        self.reconnect, self.until = reconnect, until
        self.discontinuities = self.reconnects = self.frames = 0
        self._container = self._open()

    def _open(self):
        # UDP (FFmpeg's rtsp default) drops packets behind NAT and firewalls; TCP is the safe choice
        options = {"rtsp_transport": "tcp"} if self.url.startswith(("rtsp://", "rtsps://")) else {}
        try:
            container = av.open(self.url, options=options, timeout=self.timeouts)
        except (av.error.FFmpegError, OSError) as e:
            raise UnreadableStreamError(
                f"{self.url}: cannot open the stream ({e}); check the URL and that the source is up "
                "and reachable"
            ) from e
        if not container.streams.video:
            container.close()
            raise NoVideoStreamError(f"{self.url}: the stream carries no video; point to a video source")
        return container

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[Frame]:
        self._last = None  # (ts, wall clock) of the last frame decoded
        self._last_slot = None
        self._decoded = 0  # frames decoded (a Frame's index), those the fps skips included
        self._wall_start = None
        try:
            while True:
                try:
                    yield from self._decode()
                    return
                except av.error.FFmpegError as e:
                    error = e
                self._container.close()
                if not self._reopen(error):
                    raise UnreadableStreamError(
                        f"{self.url}: the stream broke off after {self.frames} "
                        f"frame{'' if self.frames == 1 else 's'} ({error})"
                        + (f" and {self.reconnects} reconnects" if self.reconnects else "")
                        + "; reconnect to continue (--reconnect N tries by itself)"
                    ) from error
        finally:
            self.close()

    def _reopen(self, error: Exception) -> bool:
        """After the source broke off: open it again, if reconnects are left; False when none is."""
        while self.reconnects < self.reconnect:
            self.reconnects += 1
            wait = min(2.0 ** (self.reconnects - 1), 10.0)
            log.warning("%s: the stream broke off after %d frames (%s); opening it again in %g s (%d of %d)",
                        self.url, self.frames, error, wait, self.reconnects, self.reconnect)
            time.sleep(wait)
            try:
                self._container = self._open()
                return True
            except UnreadableStreamError as exc:
                error = exc
        return False

    def _decode(self) -> Iterator[Frame]:
        """Frames of the open container, stream time going on from the last frame before it."""
        stream = self._container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        first_pts, offset = None, 0.0
        for av_frame in self._container.decode(stream):
            index, self._decoded = self._decoded, self._decoded + 1
            now = time.monotonic()
            if self._wall_start is None:
                self._wall_start = now
            if first_pts is None:
                first_pts = av_frame.pts
                offset = 0.0 if self._last is None else self._last[0] + 1 / rate  # a reopened source goes on
            if av_frame.pts is None or first_pts is None:
                ts = now - self._wall_start  # no timestamps (some live sources): arrival time
            else:
                ts = float((av_frame.pts - first_pts) * stream.time_base) + offset
            last = self._last
            if last is not None and (ts < last[0] or ts - last[0] > FORWARD_JUMP_S + now - last[1]):
                offset += last[0] + 1 / rate - ts
                self._jumped(ts - last[0], last[0] + 1 / rate)
                ts = last[0] + 1 / rate
            self._last = (ts, now)
            if self.until is not None and ts >= self.until:
                return
            if self.fps is not None:
                slot = math.floor(ts * self.fps + 1e-6)  # tolerance: 0.4999999 s is 0.5 s
                if slot == self._last_slot:
                    continue
                self._last_slot = slot
            if self.realtime and (delay := self._wall_start + ts - time.monotonic()) > 0:
                time.sleep(delay)
            yield Frame(image=displayed(av_frame), ts=ts, index=index)
            self.frames += 1
            if self.frames == self.max_frames:
                return

    def _jumped(self, by: float, now: float) -> None:
        self.discontinuities += 1
        if self.discontinuities == 1:  # once: a flapping source must not flood the log
            log.warning("%s: the source's timestamps jumped %+.3f s (a restart or a discontinuity); stream time "
                        "goes on from %.3f s (further jumps are handled the same, without this message)",
                        self.url, by, now)
