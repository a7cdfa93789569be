"""Video input for the streamer: exact frame reading (`readers`), sampling (`sampling`), streaming sources
(`sources`), Qwen2-VL preprocessing (`preprocess`), pushed images (`images`), test videos (`synthetic`).

Import what you use from its module: the package itself loads only the errors and the Frame type, so
that a thin client (streamer.service.client: frames and images) runs without torch or PyAV.
"""

from .errors import (
    NoFramesError,
    NotAVideoError,
    NoVideoStreamError,
    UnreadableStreamError,
    VideoError,
    VideoNotFoundError,
)
from .frames import Frame

__all__ = [
    "Frame",
    "NoFramesError",
    "NoVideoStreamError",
    "NotAVideoError",
    "UnreadableStreamError",
    "VideoError",
    "VideoNotFoundError",
]
