"""Synthetic videos for tests and demos; frames can carry their own index through lossy encoding."""

from collections.abc import Callable
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np

# The index is written as a GRID x GRID board of black/white cells (most significant bit first),
# each inset in a coloured margin; cells stay far larger than the 16x16 codec blocks would blur.
GRID = 4
INDEX_BITS = GRID * GRID
_MARGIN = 0.2  # fraction of a cell left as coloured background around each bit square


def _cells(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width < 8 * GRID or height < 8 * GRID:
        raise ValueError(f"index frames need at least {8 * GRID}x{8 * GRID} pixels, got {width}x{height}")
    return width // GRID, height // GRID


def index_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """An (height, width, 3) uint8 frame coding `i` (0 <= i < 2**16); `size` is (width, height)."""
    if not 0 <= i < 2**INDEX_BITS:
        raise ValueError(f"index_frame codes indices 0..{2**INDEX_BITS - 1}, got {i}")
    width, height = size
    cell_w, cell_h = _cells(size)
    background = np.array([(i * 37) % 200 + 30, (i * 91) % 200 + 30, (i * 53) % 200 + 30], np.uint8)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    mx, my = int(cell_w * _MARGIN), int(cell_h * _MARGIN)
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, GRID)
        value = 255 if (i >> (INDEX_BITS - 1 - bit)) & 1 else 0
        y0, x0 = row * cell_h, col * cell_w
        image[y0 + my : y0 + cell_h - my, x0 + mx : x0 + cell_w - mx] = value
    return image


def decode_index(image: np.ndarray) -> int:
    """Read back the index written by index_frame (thresholds the mean of each cell's centre)."""
    height, width = image.shape[:2]
    cell_w, cell_h = _cells((width, height))
    gray = image.astype(np.float32).mean(axis=2)
    i = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, GRID)
        y0, x0 = row * cell_h, col * cell_w
        centre = gray[y0 + cell_h // 3 : y0 + 2 * cell_h // 3, x0 + cell_w // 3 : x0 + 2 * cell_w // 3]
        i = (i << 1) | int(centre.mean() > 127.5)
    return i


def demo_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """A gradient with a coloured disc moving in a circle: richer content for demos."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xs / width * 255, ys / height * 255, np.full_like(xs, 96)], axis=-1)
    angle = i * 2 * np.pi / 48
    cx = width / 2 + width / 4 * np.cos(angle)
    cy = height / 2 + height / 4 * np.sin(angle)
    disc = (xs - cx) ** 2 + (ys - cy) ** 2 < (min(width, height) / 8) ** 2
    image[disc] = ((i * 40) % 256, 255 - (i * 25) % 256, 200)
    return image.astype(np.uint8)


def _codec() -> str:
    # mpeg4 is always built into FFmpeg; libx264 (with B-frames) is the more realistic test
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: str | Path,
    num_frames: int,
    fps: float = 8.0,
    size: tuple[int, int] = (112, 112),
    gop: int = 12,
    content: Callable[[int], np.ndarray] | None = None,
) -> None:
    """Encode `num_frames` frames (yuv420p) with a keyframe exactly every `gop` frames.

    `size` is (width, height), both even. `content(i)` returns frame i as (height, width, 3)
    uint8 RGB; by default index_frame(i, size). Scene-cut keyframes are disabled so that
    keyframes fall only at multiples of `gop`.
    """
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
    make_frame = content or partial(index_frame, size=size)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(_codec(), rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"sc_threshold": "0"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(i), format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_y4m(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """RGB frames as an uncompressed YUV 4:2:0 (JPEG's full-range BT.601) .y4m, a camera file for Chromium's
    fake camera (--use-file-for-fake-video-capture)."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            r, g, b = np.moveaxis(frame.astype(np.float32), 2, 0)
            y = 0.299 * r + 0.587 * g + 0.114 * b
            u = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
            v = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
            out.write(b"FRAME\n")
            for plane, step in ((y, 1), (u, 2), (v, 2)):
                plane = plane.reshape(height // step, step, width // step, step).mean(axis=(1, 3))
                out.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())
