"""Joint transforms: image, masks and boxes resized, cropped and flipped together.

Input sample (numpy): ``image`` (H, W, 3) uint8 RGB, ``boxes`` (k, 4) float32 x1y1x2y2,
``labels`` (k,) int64, ``ignore_boxes`` (m, 4) float32, ``sem`` / ``drv`` (H, W) uint8 or
None. Output: the transformed row of docs/architecture.md §2 minus ``name`` / ``error``
(the loader adds those). The frame is resized keeping its aspect so it fits
``input_size`` = (width, height), content at the top-left, padded with 0 (image) and 255
(masks). ``scale`` = network pixels per original pixel. Normalisation is the model's job.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from paf_ray.data.bdd100k import IGNORE_INDEX
from paf_ray.data.contracts import Sample

MIN_BOX_SIZE = 2.0  # boxes narrower or lower than this (network pixels) are dropped


def fit_scale(width: int, height: int, input_size) -> float:
    """Scale that makes a (width, height) frame fit inside input_size keeping its aspect."""
    return min(input_size[0] / width, input_size[1] / height)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def _boxes(a) -> np.ndarray:
    return np.asarray(a if a is not None else [], np.float32).reshape(-1, 4)


def _place(array: np.ndarray, out_hw: tuple[int, int], fill: int, x0: int, y0: int) -> np.ndarray:
    """Crop array at (x0, y0) to at most out_hw and put it at the top-left of a filled canvas."""
    h, w = out_hw
    crop = array[y0:y0 + h, x0:x0 + w]
    if crop.shape[0] == h and crop.shape[1] == w:
        return np.ascontiguousarray(crop)
    canvas = np.full((h, w) + array.shape[2:], fill, array.dtype)
    canvas[: crop.shape[0], : crop.shape[1]] = crop
    return canvas


def _clip_boxes(boxes: np.ndarray, width: float, height: float, labels: np.ndarray | None = None):
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE)
    return boxes[keep], (labels[keep] if labels is not None else None)


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


def _transform(sample: Sample, input_size, scale: float, flip: bool, offset: tuple[int, int]) -> dict:
    """The Row of `sample` (all of contracts.Row but `name` and `error`, which pipeline.load_row adds)."""
    image = sample["image"]
    h0, w0 = image.shape[:2]
    new_w, new_h = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    out_hw = (int(input_size[1]), int(input_size[0]))
    x0, y0 = offset

    def prep_mask(mask):
        if mask is None:
            return np.full(out_hw, IGNORE_INDEX, np.uint8)
        m = _resize_mask(np.asarray(mask, np.uint8), (new_w, new_h))
        if flip:
            m = m[:, ::-1]
        return _place(m, out_hw, IGNORE_INDEX, x0, y0)

    img = _resize_image(image, (new_w, new_h))
    if flip:
        img = img[:, ::-1]
    img = _place(img, out_hw, 0, x0, y0)

    # content that survives the crop, in network pixels: boxes are clipped to it, not to the pad
    content_w, content_h = min(new_w - x0, out_hw[1]), min(new_h - y0, out_hw[0])

    def move(boxes):
        b = _boxes(boxes) * scale
        if flip:
            b = np.stack([new_w - b[:, 2], b[:, 1], new_w - b[:, 0], b[:, 3]], axis=1)
        b -= np.array([x0, y0, x0, y0], np.float32)
        return b

    labels = np.asarray(sample.get("labels") if sample.get("labels") is not None else [], np.int64).reshape(-1)
    boxes, labels = _clip_boxes(move(sample.get("boxes")), content_w, content_h, labels)
    ignore_labels = sample.get("ignore_labels")
    ignore_labels = np.asarray(ignore_labels if ignore_labels is not None else [], np.int64).reshape(-1)
    ignore, ignore_labels = _clip_boxes(move(sample.get("ignore_boxes")), content_w, content_h, ignore_labels)
    return {
        "image": img,
        "boxes": boxes.astype(np.float32),
        "labels": labels.astype(np.int64),
        "ignore_boxes": ignore.astype(np.float32),
        "ignore_labels": ignore_labels.astype(np.int64),
        "sem": prep_mask(sample.get("sem")),
        "drv": prep_mask(sample.get("drv")),
        "has_det": bool(sample.get("has_det", False)),
        "has_sem": sample.get("sem") is not None,
        "has_drv": sample.get("drv") is not None,
        "scale": np.float32(scale),
        "orig_size": np.array([h0, w0], np.int64),
    }


def val_transform(sample: Sample, input_size) -> dict:
    """Resize to fit input_size keeping aspect; content at the top-left, padded."""
    h0, w0 = sample["image"].shape[:2]
    return _transform(sample, input_size, fit_scale(w0, h0, input_size), False, (0, 0))


def train_transform(sample: Sample, input_size, scale_range=(0.75, 1.25), hflip: float = 0.5, color_jitter: float = 0.2,
                    rng: np.random.Generator | None = None) -> dict:
    """Fit, then a random scale in scale_range, a random crop (or pad), a flip and photometric jitter."""
    rng = rng if rng is not None else np.random.default_rng()
    h0, w0 = sample["image"].shape[:2]
    scale = fit_scale(w0, h0, input_size) * float(rng.uniform(scale_range[0], scale_range[1]))
    new_w, new_h = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    x0 = int(rng.integers(0, new_w - input_size[0] + 1)) if new_w > input_size[0] else 0
    y0 = int(rng.integers(0, new_h - input_size[1] + 1)) if new_h > input_size[1] else 0
    flip = bool(rng.random() < hflip)
    row = _transform(sample, input_size, scale, flip, (x0, y0))
    if color_jitter > 0:  # on the content only: the padding stays 0
        ch, cw = min(new_h - y0, input_size[1]), min(new_w - x0, input_size[0])
        image = row["image"].copy()
        image[:ch, :cw] = jitter_colors(image[:ch, :cw], color_jitter, rng)
        row["image"] = image
    return row
