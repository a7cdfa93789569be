"""Video input for the streamer: exact frame reading, sampling, streaming sources, Qwen2-VL preprocessing."""

from .errors import (
    NoFramesError,
    NotAVideoError,
    NoVideoStreamError,
    UnreadableStreamError,
    VideoError,
    VideoNotFoundError,
)
from .frames import Frame
from .preprocess import (
    VIDEOMME_PRESET,
    VideoPatches,
    VisionPreset,
    pixels_for_tokens,
    preprocess_frames,
    smart_resize,
)
from .readers import VideoInfo, iter_frames, probe, read_frames
from .sampling import Sampling, fps_indices, uniform_indices
from .images import decode_image, encode_image
from .sources import FileSource, StreamSource
from .synthetic import decode_index, demo_frame, index_frame, write_video

__all__ = [
    "VIDEOMME_PRESET",
    "FileSource",
    "Frame",
    "NoFramesError",
    "NoVideoStreamError",
    "NotAVideoError",
    "Sampling",
    "StreamSource",
    "UnreadableStreamError",
    "VideoError",
    "VideoInfo",
    "VideoNotFoundError",
    "VideoPatches",
    "VisionPreset",
    "decode_image",
    "decode_index",
    "demo_frame",
    "encode_image",
    "fps_indices",
    "index_frame",
    "iter_frames",
    "pixels_for_tokens",
    "preprocess_frames",
    "probe",
    "read_frames",
    "smart_resize",
    "uniform_indices",
    "write_video",
]
