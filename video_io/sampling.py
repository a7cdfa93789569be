"""Which frames of a video to read: N uniformly over the video, or a fixed rate in video time."""

import math
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


def fps_indices(total_frames: int, source_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """Frames at `fps` frames per second of video time.

    Times k / fps for k = 0, 1, ... before the end of the video (total_frames / source_fps) are
    mapped to the nearest source frame (frame j is shown at j / source_fps); an fps above the
    source rate yields each frame once. If that gives more than `max_frames` frames, falls back to
    uniform_indices(total_frames, max_frames), so the whole video stays covered.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if not (source_fps > 0 and math.isfinite(source_fps) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"source_fps and fps must be finite and > 0, got source_fps={source_fps}, fps={fps}")
    if fps >= source_fps:  # every frame once (stepping by 1/fps would loop once per 1/fps of video time)
        indices = list(range(total_frames))
    else:
        indices = []
        k = 0
        while k / fps < total_frames / source_fps:
            index = min(int(k * source_fps / fps + 0.5), total_frames - 1)
            if not indices or index != indices[-1]:
                indices.append(index)
            k += 1
    if max_frames is not None and len(indices) > max_frames:
        return uniform_indices(total_frames, max_frames)
    return indices


@dataclass
class Sampling:
    """Exactly one of `frames` (N uniform frames) or `fps` (frames per second of video time).

    `max_frames` caps either mode: with fps it triggers the uniform fallback of fps_indices, with
    frames it lowers N.
    """

    frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None

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

    def indices(self, total_frames: int, source_fps: float) -> list[int]:
        self._validate()  # the fields are mutable
        if self.fps is not None:
            return fps_indices(total_frames, source_fps, self.fps, self.max_frames)
        num_frames = self.frames if self.max_frames is None else min(self.frames, self.max_frames)
        return uniform_indices(total_frames, num_frames)
