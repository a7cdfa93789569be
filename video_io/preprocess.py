"""Qwen-VL video preprocessing in plain torch, matching transformers' Qwen2VLVideoProcessor and
Qwen3VLVideoProcessor (given the pixel range of the checkpoint's processor config, as
streamer.engine.models.processor_preset reads it).

The processor needs torchvision, which has no CPU build here. Its steps, reproduced exactly:
smart_resize the frame size to multiples of patch*merge within [min_pixels, max_pixels]; resize
each uint8 frame with bicubic + antialias (torchvision's v2 resize runs torch's native uint8
kernel on CPU); rescale by 1/255 and normalise with the preset's mean/std (fused, in float32: CLIP's
for Qwen2-VL and Qwen2.5-VL, 0.5 for Qwen3-VL); pad to an even frame count by repeating the last frame;
cut into patches in the processor's order. Qwen3-VL's processor bounds the pixels of the whole clip
(frames x height x width) where Qwen2-VL's bounds each frame; a stream has no length to share, so
here the bounds are always per frame (qwen-vl-utils' per-frame bounds for Qwen3-VL are these).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's mean and std (transformers' IMAGENET_STANDARD_MEAN / _STD)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, rescaled into [min_pixels, max_pixels].

    Same results as transformers' Qwen2-VL smart_resize: round each side to the nearest multiple;
    if the area is too large, scale both sides down by the same factor and floor (never below one
    `factor`); if too small, scale up and ceil. The aspect ratio is kept as closely as the
    rounding allows, so the area can land below max_pixels or above min_pixels.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1 "
            f"({max(height, width) / min(height, width):.1f}); crop or pad the frames first"
        )
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / scale / factor) * factor)
        resized_width = max(factor, math.floor(width / scale / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * scale / factor) * factor
        resized_width = math.ceil(width * scale / factor) * factor
    return resized_height, resized_width


def pixels_for_tokens(tokens_per_frame_pair: int) -> int:
    """Pixel budget for a number of LLM tokens per frame pair.

    With patch 14 and a 2x2 merge, one token covers 28x28 pixels of a temporal pair of frames,
    so tokens * 28 * 28 pixels per frame. Passed as both min_pixels and max_pixels it fixes the
    budget, though rounding to multiples of 28 makes the exact count depend on the aspect ratio.
    """
    return tokens_per_frame_pair * 28 * 28


@dataclass(frozen=True)
class VisionPreset:
    # defaults: Qwen2VLVideoProcessor's size = {shortest_edge: 128*28*28, longest_edge: 768*28*28}
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):  # tuples, also when read from JSON lists (a checkpoint's preset.json)
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))


# Qwen3-VL: patch 16, so frames are multiples of 32; per frame qwen-vl-utils' 128 .. 768 tokens of 32 x 32
# pixels (transformers' video processor has the same numbers for a whole clip)
QWEN3_PRESET = VisionPreset(min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32, patch_size=16, mean=HALF, std=HALF)


def qwen_vl_utils_video(preset: VisionPreset) -> tuple[VisionPreset, int]:
    """qwen-vl-utils' video defaults for the preset's token size (patch x merge pixels: 28 for Qwen2-VL and
    Qwen2.5-VL, 32 for Qwen3-VL): `preset` with 128 .. 768 tokens per frame (its VIDEO_MIN/MAX_TOKEN_NUM), and
    the whole video's pixel budget, 0.9 x 128,000 tokens' worth (its MODEL_SEQ_LEN)."""
    token = (preset.patch_size * preset.merge_size) ** 2
    return replace(preset, min_pixels=128 * token, max_pixels=768 * token), int(128000 * token * 0.9)


def within_total_pixels(preset: VisionPreset, total_pixels: int, frames: int) -> VisionPreset:
    """`preset` with its max_pixels lowered so that `frames` frames share `total_pixels`, as qwen-vl-utils
    does: max(min(max_pixels, total_pixels / frames * 2), int(min_pixels * 1.05)). The bound stays
    fractional, as there, so smart_resize rounds exactly as it does."""
    if frames < 1:
        raise ValueError(f"a pixel budget needs the video's frame count (>= 1), got {frames}")
    share = total_pixels / frames * preset.temporal_patch_size
    return replace(preset, max_pixels=max(min(preset.max_pixels, share), int(preset.min_pixels * 1.05)))


# VideoMME evaluation setting: 144 tokens per frame pair (exact for 16:9 and 9:16 sources)
VIDEOMME_PRESET = VisionPreset(min_pixels=pixels_for_tokens(144), max_pixels=pixels_for_tokens(144))


@dataclass
class VideoPatches:
    pixel_values: torch.Tensor  # (grid_t * grid_h * grid_w, 3 * temporal * patch * patch) float32
    grid_thw: tuple[int, int, int]  # in patches, before the merge
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """LLM tokens this video becomes after the vision tower's merge."""
        grid_t, grid_h, grid_w = self.grid_thw
        return grid_t * grid_h * grid_w // self.merge_size**2


def _model_size(height: int, width: int, preset: VisionPreset) -> tuple[int, int]:
    factor = preset.patch_size * preset.merge_size
    return smart_resize(height, width, factor=factor, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)


def _resize_uint8(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, C, H, W) uint8 -> (T, C, *size) uint8, bicubic with antialias.

    torch resizes uint8 natively (rounding and saturating after each pass), as torchvision does
    on CPU; a float resize + round + clamp differs by several levels on sharp edges.
    """
    return F.interpolate(video, size=size, mode="bicubic", align_corners=False, antialias=True)


def resize_frames(frames: Sequence[np.ndarray], preset: VisionPreset = VisionPreset()) -> list[np.ndarray]:
    """(H, W, 3) uint8 frames of one size, resized now as preprocess_frames would resize them.

    For holding many frames before the model needs them (a prefetched video) at model resolution
    rather than source resolution. preprocess_frames(resize_frames(f)) equals preprocess_frames(f)
    exactly: it leaves frames already at their target size alone. When smart_resize is not
    idempotent for a size (its upscale branch can overshoot max_pixels, and then the resized size
    would be resized again), the frames are returned as they are.
    """
    if len(frames) == 0:
        return []
    height, width = frames[0].shape[:2]
    size = _model_size(height, width, preset)
    if size == (height, width) or _model_size(*size, preset) != size:
        return list(frames)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    return list(_resize_uint8(video, size).permute(0, 2, 3, 1).contiguous().numpy())


def preprocess_frames(frames: Sequence[np.ndarray], preset: VisionPreset = VisionPreset()) -> VideoPatches:
    """(H, W, 3) uint8 RGB frames of one size -> Qwen-VL video patches and grid."""
    if len(frames) == 0:
        raise ValueError("preprocess_frames needs at least one frame")
    shapes = {np.shape(frame) for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"all frames must have the same size, got shapes {sorted(shapes)}")
    first = frames[0]
    if first.ndim != 3 or first.shape[2] != 3 or any(frame.dtype != np.uint8 for frame in frames):
        raise ValueError(f"frames must be (H, W, 3) uint8 RGB, got {first.dtype} of shape {first.shape}")
    height, width = frames[0].shape[:2]
    patch, merge, temporal = preset.patch_size, preset.merge_size, preset.temporal_patch_size
    resized_height, resized_width = _model_size(height, width, preset)

    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # (T, C, H, W) uint8
    if (resized_height, resized_width) != (height, width):
        video = _resize_uint8(video, (resized_height, resized_width))
    # fused rescale + normalise as the processor does: (x - 255 * mean) / (255 * std)
    mean = (torch.tensor(preset.mean) * 255.0).view(1, 3, 1, 1)
    std = (torch.tensor(preset.std) * 255.0).view(1, 3, 1, 1)
    video = video.to(torch.float32).sub_(mean).div_(std)

    if pad := -video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    grid_t = video.shape[0] // temporal
    grid_h, grid_w = resized_height // patch, resized_width // patch
    # the processor's order: rows run over (t, merge-block row, merge-block col, row in block,
    # col in block); each row holds (channel, frame in pair, y, x) of one patch
    patches = video.view(grid_t, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, 3 * temporal * patch * patch)
    return VideoPatches(pixel_values=pixel_values, grid_thw=(grid_t, grid_h, grid_w), merge_size=merge)
