"""Joint transforms: the image and every task's target resized, cropped and flipped together.

A :class:`Geometry` says where the frame's pixels go: resized by ``scale`` (keeping the aspect),
optionally flipped, cropped at ``offset`` and placed at the top-left of the ``out_hw`` canvas
(the network input, ``data.input_size``), the rest padded (image 0, masks 255). The image goes
through ``Geometry.image``; each task moves its own target with ``Geometry.mask`` / ``Geometry.boxes``
(``Task.transform``). Normalisation is the model's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from paf_ray.data.contracts import IGNORE_INDEX, has_column

MIN_BOX_SIZE = 2.0  # boxes narrower or lower than this (network pixels) are dropped


def fit_scale(width: int, height: int, input_size) -> float:
    """Scale that makes a (width, height) frame fit inside input_size keeping its aspect."""
    return min(input_size[0] / width, input_size[1] / height)


def _place(array: np.ndarray, out_hw: tuple[int, int], fill: int, x0: int, y0: int) -> np.ndarray:
    """Crop array at (x0, y0) to at most out_hw and put it at the top-left of a filled canvas."""
    h, w = out_hw
    crop = array[y0:y0 + h, x0:x0 + w]
    if crop.shape[0] == h and crop.shape[1] == w:
        return np.ascontiguousarray(crop)
    canvas = np.full((h, w) + array.shape[2:], fill, array.dtype)
    canvas[: crop.shape[0], : crop.shape[1]] = crop
    return canvas


@dataclass(frozen=True)
class Geometry:
    """Where a frame's pixels land in the network input."""

    scale: float  # network pixels per frame pixel
    resized: tuple[int, int]  # (w, h) of the frame after the resize
    flip: bool
    offset: tuple[int, int]  # (x0, y0) of the crop in the resized frame
    out_hw: tuple[int, int]  # (H, W) of the network input

    @property
    def content_hw(self) -> tuple[int, int]:
        """(h, w) of the frame's content in the input; the rest is padding."""
        return (min(self.resized[1] - self.offset[1], self.out_hw[0]),
                min(self.resized[0] - self.offset[0], self.out_hw[1]))

    def image(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 frame -> the input canvas (bilinear), padding 0."""
        if (image.shape[1], image.shape[0]) != self.resized:
            image = np.asarray(Image.fromarray(image).resize(self.resized, Image.BILINEAR))
        if self.flip:
            image = image[:, ::-1]
        return _place(image, self.out_hw, 0, *self.offset)

    def mask(self, mask: np.ndarray | None, fill: int = IGNORE_INDEX) -> np.ndarray:
        """uint8 mask -> the input canvas (nearest), padding `fill`; None -> all `fill`."""
        if mask is None:
            return np.full(self.out_hw, fill, np.uint8)
        mask = np.asarray(mask, np.uint8)
        if (mask.shape[1], mask.shape[0]) != self.resized:
            mask = np.asarray(Image.fromarray(mask).resize(self.resized, Image.NEAREST))
        if self.flip:
            mask = mask[:, ::-1]
        return _place(mask, self.out_hw, fill, *self.offset)

    def boxes(self, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x1y1x2y2 frame-pixel boxes -> input pixels, clipped to the content (not the padding);
        boxes left smaller than MIN_BOX_SIZE are dropped with their labels."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4) * self.scale
        if self.flip:
            b = np.stack([self.resized[0] - b[:, 2], b[:, 1], self.resized[0] - b[:, 0], b[:, 3]], axis=1)
        b = b - np.array([*self.offset, *self.offset], np.float32)
        h, w = self.content_hw
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        keep = ((b[:, 2] - b[:, 0]) >= MIN_BOX_SIZE) & ((b[:, 3] - b[:, 1]) >= MIN_BOX_SIZE)
        return b[keep].astype(np.float32), np.asarray(labels, np.int64).reshape(-1)[keep]

    @classmethod
    def placeholder(cls) -> "Geometry":
        """The 1x1 canvas of a bad sample's row (``on_bad_sample: skip``)."""
        return cls(0.0, (1, 1), False, (0, 0), (1, 1))


def val_geometry(width: int, height: int, input_size) -> Geometry:
    """Resize to fit input_size keeping aspect; content at the top-left, padded."""
    scale = fit_scale(width, height, input_size)
    resized = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return Geometry(scale, resized, False, (0, 0), (int(input_size[1]), int(input_size[0])))


def train_geometry(width: int, height: int, input_size, scale_range=(0.75, 1.25), hflip: float = 0.5,
                   rng: np.random.Generator | None = None) -> Geometry:
    """Fit, then a random scale in scale_range, a random crop (or pad) and a flip."""
    rng = rng if rng is not None else np.random.default_rng()
    scale = fit_scale(width, height, input_size) * float(rng.uniform(scale_range[0], scale_range[1]))
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    x0 = int(rng.integers(0, new_w - input_size[0] + 1)) if new_w > input_size[0] else 0
    y0 = int(rng.integers(0, new_h - input_size[1] + 1)) if new_h > input_size[1] else 0
    flip = bool(rng.random() < hflip)
    return Geometry(scale, (new_w, new_h), flip, (x0, y0), (int(input_size[1]), int(input_size[0])))


def jitter_colors(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s].

    Brightness b, then contrast c around the frame mean m, then saturation s around each
    pixel's grey (mean of its channels) compose to one affine colour map:
    out = s*b*c * x + (1-s)*b*c/3 * (x_r + x_g + x_b) + b*(1-c)*m. Written as element-wise
    passes, not as the equal 3x3 matrix product: numpy hands a matrix product to its BLAS,
    whose threads (one per core in every decode process) fought each other and tripled the CPU
    time of a row where several decode processes ran at once (docs/benchmarks.md).
    """
    if strength <= 0:
        return image
    b, c, s = rng.uniform(1 - strength, 1 + strength, 3)
    x = image.astype(np.float32)
    out = x * np.float32(s * b * c)
    out += x.sum(axis=2, keepdims=True) * np.float32((1 - s) * b * c / 3)
    out += np.float32(b * (1 - c) * float(x.mean()))
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def make_row(image: np.ndarray, targets: dict, tasks, geometry: Geometry, color_jitter: float = 0.0,
             rng: np.random.Generator | None = None) -> dict:
    """The row of a decoded sample under `geometry` (all of the Row but `name` and `error`):
    the image, and for each task its has-flag and columns."""
    h0, w0 = image.shape[:2]
    canvas = geometry.image(image)
    if color_jitter > 0:  # on the content only: the padding stays 0
        ch, cw = geometry.content_hw
        canvas = canvas.copy()
        canvas[:ch, :cw] = jitter_colors(canvas[:ch, :cw], color_jitter, rng or np.random.default_rng())
    row = {"image": canvas, "scale": np.float32(geometry.scale), "orig_size": np.array([h0, w0], np.int64)}
    for task in tasks:
        target = targets.get(task.name)
        row[has_column(task.name)] = target is not None
        row.update(task.transform(target, geometry))
    return row
