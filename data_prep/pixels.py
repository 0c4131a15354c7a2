"""Encoded image bytes -> square uint8 RGB pixels, as downsampled ImageNet was made: decoded completely with
Pillow (or ``Skip`` with the reason it cannot be used), made RGB, center-cropped to a square and box (area)
downsampled. ``data_prep.images`` runs every input image through it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class Skip(Exception):
    """An input left out of the dataset; ``reason`` is counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes completely, or raise Skip with the reason."""
    if not data:
        raise Skip("empty")
    try:
        # Images up to Pillow's hard limit (2 x MAX_IMAGE_PIXELS, ~179 MP) are decoded without its warning;
        # above it Pillow raises DecompressionBombError before allocating anything.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # inside the try: a truncated file fails here, not later in convert() or resize()
    except Image.DecompressionBombError as e:
        raise Skip("too large", str(e)) from None
    except UnidentifiedImageError:
        raise Skip("not an image") from None
    except Exception as e:  # Pillow reports broken data as OSError, SyntaxError, ValueError, EOFError, ...
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise Skip(reason, f"{type(e).__name__}: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit grey is scaled (convert() would clip it), transparency is composited on white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    bands = img.getbands()
    if "A" in bands or "a" in bands or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def square_pixels(img: Image.Image, size: int) -> np.ndarray:
    """Center crop to a square, then box (area-average) resize to size x size: uint8 (size, size, 3), HWC."""
    try:
        img = to_rgb(img)
    except (ValueError, OSError) as e:  # e.g. a mode Pillow cannot convert to RGB
        raise Skip("unsupported mode", f"{img.mode}: {e}") from None
    w, h = img.size
    side = min(w, h)
    if side < 1:
        raise Skip("empty", f"{w}x{h} pixels")
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)
