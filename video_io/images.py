"""Single encoded frames (JPEG/PNG), as clients push them over websockets: one decoder, one encoder."""

import io

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG")
MAX_IMAGE_PIXELS = 4096 * 4096  # a 4K frame fits; a 92-byte PNG may claim 60000 x 60000


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG or PNG bytes -> (H, W, 3) uint8 RGB (grey, RGBA and palette images are converted).

    The size the header declares is checked before anything is decoded, so a small file that
    claims a huge image costs nothing. Anything else -- another format, garbage, a truncated or
    corrupt file, more than `max_pixels` pixels -- is a ValueError that says what was wrong.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as encoded:
            width, height = encoded.size
            if width * height > max_pixels:
                raise ValueError(f"the image is {width}x{height} pixels, over the limit of {max_pixels} pixels; "
                                 "send smaller frames")
            return np.asarray(encoded.convert("RGB"))
    except Image.UnidentifiedImageError:
        raise ValueError(f"the bytes are not a JPEG or PNG image (first bytes {bytes(data[:8])!r}); "
                         "send JPEG or PNG") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the image is corrupt, truncated or too large: {e}") from None


def encode_image(image: np.ndarray, image_format: str = "JPEG", quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG (at `quality`) or PNG bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format == "JPEG" else {}
    Image.fromarray(image).save(buffer, format=image_format, **options)
    return buffer.getvalue()
