"""Image bytes → an upright 8-bit RGB PIL image, the one decode that training, caching, cleaning and the checker
share. PIL's convert("RGB") alone clips 16-bit greyscale to white (a 16-bit PNG trained as a blank image) and
ignores the EXIF orientation (a phone's portrait JPEG trained sideways, in a landscape bucket)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG's 16-bit greyscale opens as one of these


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE:
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip(a >> 8, 0, 255).astype(np.uint8), "L")  # 16 bits to their top 8
    return im.convert("RGB")
