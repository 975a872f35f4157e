"""Drawing on frames: masks in a palette and tagged boxes (each task draws its predictions with these).

The functions take and return RGB uint8 arrays (H, W, 3) at the frame's resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _palette_lut(palette: Sequence[Sequence[int]]) -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Mask of ids (H, W) -> RGB (H, W, 3); ids outside the palette (e.g. 255) are black."""
    return _palette_lut(palette)[np.asarray(mask, dtype=np.uint8)]


def blend_mask(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float, skip: Sequence[int] = ()
) -> np.ndarray:
    """Blend palette colours of `mask` onto `image` with `alpha`, except where the id is in `skip` or off-palette."""
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image {image.shape[:2]}")
    paint = mask < len(palette)
    for value in skip:
        paint &= mask != value
    colours = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32)
    out[paint] = (1.0 - alpha) * out[paint] + alpha * colours[paint]
    return out.round().clip(0, 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    tags: Sequence[str],
    colours: Sequence[Sequence[int]],
    line_width: int = 3,
    font_size: int = 16,
) -> np.ndarray:
    """Draw x1y1x2y2 boxes, each in its colour with its tag ("car 0.93") above it."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(pil)
    font = _font(font_size)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    for box, text, colour in zip(boxes, tags, colours):
        colour = tuple(int(c) for c in colour)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx2 - tx1 + 4, ty2 - ty1 + 4
        ty = y1 - th if y1 - th >= 0 else y1  # tag above the box unless it would leave the frame
        draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
        draw.text((x1 + 2 - tx1, ty + 2 - ty1), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)
