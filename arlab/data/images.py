"""Decoding image files as a person looking at them would see them: (H, W, 3) uint8 RGB.

``Image.convert("RGB")`` alone gets several files wrong; :func:`to_rgb` handles them:

* **EXIF orientation** (phone and camera JPEGs): the pixels are stored sideways and the viewer
  rotates them; ``ImageOps.exif_transpose`` applies the rotation (so width and height may swap).
* **16- and 32-bit integer grey** (``I;16*``, ``I``; scientific and medical PNG/TIFF): ``convert``
  clips every value above 255 to white; they are scaled from the 16-bit range to 8 bits instead.
* **float grey** (``F``, TIFF): values in [0, 1] are scaled to [0, 255]; larger ones are clipped.
* **transparency** (``RGBA``, ``LA``, ``PA``, palette images with a transparent index): ``convert``
  keeps the colour under transparent pixels (often black or garbage); they are composited on white,
  as viewers and browsers show them.
* palette (``P``), bilevel (``1``), ``L``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_INT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image (any mode) → (H, W, 3) uint8 RGB, oriented and scaled as described above."""
    im = ImageOps.exif_transpose(im) or im
    if im.mode in _INT_GREY:
        a = np.asarray(im, dtype=np.float64)
        a = a * (255.0 / 65535.0) if im.mode != "I" or a.max(initial=0) > 255 else a
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a) * (255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_rgb(data: bytes) -> np.ndarray:
    """Image file bytes → (H, W, 3) uint8 RGB (every pixel decoded: a truncated file raises)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)
