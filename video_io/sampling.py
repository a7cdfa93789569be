"""Which frames of a video to read: N uniformly over the video, or a fixed rate in video time."""

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly over the whole video.

    Convention (as in VideoMME-style evaluation): split the video into `num_frames` equal segments
    and take the frame at the centre of each, index int((i + 0.5) * total / N). The first and last
    frames are therefore not taken unless the segments are a single frame long. If
    `num_frames >= total_frames` every frame is returned once (no duplicates).
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames >= total_frames:
        return list(range(total_frames))
    # integer form of int((i + 0.5) * total / N): no float rounding at segment boundaries
    return [(2 * i + 1) * total_frames // (2 * num_frames) for i in range(num_frames)]


def linspace_indices(total_frames: int, num_frames: int) -> list[int]:
    """`num_frames` indices from the first frame to the last inclusive, as qwen-vl-utils, lmms-eval's
    Qwen2-VL model and the EMLoC code take them: torch.linspace(0, total - 1, N).round() (float32,
    halves to even). Every frame once if `num_frames >= total_frames`."""
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames >= total_frames:
        return list(range(total_frames))
    import torch  # here, not at the top: torch's own float32 linspace is the rule, and a thin client needs no torch

    return torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()


SPREADS = {"centres": uniform_indices, "linspace": linspace_indices}  # how N frames are spread over a video


def fps_indices(times: Sequence[float], fps: float, max_frames: int | None) -> list[int]:
    """Frames at `fps` frames per second of video time, by the frames' own timestamps.

    `times` holds each frame's presentation time in seconds from the first (ascending), so a
    variable-frame-rate file is sampled at the right moments. Times k / fps before the end of the
    video (the last frame's time plus one mean frame interval) are mapped to the frame whose
    timestamp is nearest; a frame picked twice is kept once, and an fps above the frames' rate
    yields each frame once. If that gives more than `max_frames` frames, falls back to
    uniform_indices(len(times), max_frames), so the whole video stays covered.
    """
    total = len(times)
    if total < 1:
        raise ValueError("a video needs at least one frame to sample")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    end = times[-1] + (times[-1] - times[0]) / (total - 1) if total > 1 else 0.0
    if end * fps >= total:  # as many sample times as frames, or more: every frame once (and a bounded loop)
        indices = list(range(total))
    else:
        indices = []
        k = 0
        while k == 0 or k / fps < end:
            t = k / fps
            j = bisect.bisect_left(times, t)
            if j == total or (j > 0 and t - times[j - 1] <= times[j] - t):
                j -= 1  # the earlier frame is nearer (ties go to it)
            if not indices or j != indices[-1]:
                indices.append(j)
            k += 1
    if max_frames is not None and len(indices) > max_frames:
        return uniform_indices(total, max_frames)
    return indices


@dataclass
class Sampling:
    """Exactly one of `frames` (N uniform frames) or `fps` (frames per second of video time).

    `max_frames` caps either mode: with fps it triggers the uniform fallback of fps_indices, with
    frames it lowers N. `spread` says how N frames lie: "centres" of N equal segments (uniform_indices)
    or "linspace" from the first frame to the last (linspace_indices, the reference codes' choice).
    """

    frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    spread: str = "centres"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if (self.frames is None) == (self.fps is None):
            raise ValueError(
                f"Sampling needs exactly one of frames= or fps=, got frames={self.frames}, fps={self.fps}"
            )
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"Sampling frames must be >= 1, got {self.frames}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"Sampling fps must be a finite number > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"Sampling max_frames must be >= 1, got {self.max_frames}")
        if self.spread not in SPREADS:
            raise ValueError(f"Sampling spread must be one of {', '.join(SPREADS)}, got {self.spread!r}")

    def indices(self, times: Sequence[float]) -> list[int]:
        """The frames to read of a video whose frames are shown at `times` (seconds, ascending)."""
        self._validate()  # the fields are mutable
        if self.fps is not None:
            return fps_indices(times, self.fps, self.max_frames)
        num_frames = self.frames if self.max_frames is None else min(self.frames, self.max_frames)
        return SPREADS[self.spread](len(times), num_frames)
