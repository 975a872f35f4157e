"""Decoding and validating one sample's files: used by the loader and by ``paf-ray data check``.

Every failure is a :class:`DatasetError` whose message names the file and the problem.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from paf_ray.data import bdd100k as B
from paf_ray.data import storage
from paf_ray.data.contracts import Record, Sample
from paf_ray.data.index import DatasetError

# Values a mask may hold, per task.
ALLOWED_MASK_VALUES = {
    "sem": np.array(list(range(len(B.SEM_CLASSES))) + [B.IGNORE_INDEX]),
    "drv": np.array([B.DRV_DIRECT, B.DRV_ALTERNATIVE, B.DRV_BACKGROUND]),
}
_DISALLOWED = {}
for _task, _values in ALLOWED_MASK_VALUES.items():
    _bad = np.ones(256, bool)
    _bad[_values] = False
    _DISALLOWED[_task] = _bad

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the frame (labels use inclusive x2/y2)


_readers: ThreadPoolExecutor | None = None


def read_many(paths: list[str]) -> list[bytes]:
    """The bytes of several files; from object storage concurrently, so a row waits for one round
    trip instead of one per file (local files are read in turn: no latency to hide)."""
    global _readers
    if len(paths) < 2 or not any(storage.is_remote(p) for p in paths):
        return [read(p) for p in paths]
    if _readers is None:
        _readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="paf-read")
    return list(_readers.map(read, paths))


def read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing file") from None
    except storage.StorageError:  # object storage failing is no bad sample: never skipped as one
        raise
    except OSError as e:
        raise DatasetError(f"{path}: unreadable: {e}") from None


def decode_image(path: str, data: bytes | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3); DatasetError for a missing, unreadable or corrupt image."""
    data = read(path) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable or corrupt image (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from None


def decode_mask(path: str, task: str, size: tuple[int, int] | None = None, data: bytes | None = None) -> np.ndarray:
    """uint8 (H, W) mask of `task` ('sem' or 'drv'), checked for format, size and values.

    `size` = (width, height) the mask must have (its image's size), or None.
    """
    data = read(path) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            mask = np.asarray(im)
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable or corrupt {task} mask (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt {task} mask ({e})") from None
    if mode not in ("L", "P"):
        raise DatasetError(f"{path}: {task} mask must be an 8-bit single-channel PNG, got mode {mode}")
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise DatasetError(
            f"{path}: {task} mask is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = np.flatnonzero(counts * _DISALLOWED[task])
    if bad.size:
        allowed = "0-18 and 255" if task == "sem" else "0, 1, 2"
        raise DatasetError(f"{path}: {task} mask has values outside {allowed}: {bad[:8].tolist()}")
    return mask


def box_problems(boxes, width: int, height: int, where: str) -> list[str]:
    """Boxes (x1, y1, x2, y2) that lie outside a width x height image."""
    problems = []
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE:
            problems.append(f"{where}: box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image")
    return problems


def load_sample(record: Record) -> Sample:
    """Decode one index record into numpy arrays (original resolution), checking everything."""
    paths = [record["image"]] + [record[t] for t in ("sem", "drv") if record.get(t)]
    data = dict(zip(paths, read_many(paths)))
    image = decode_image(record["image"], data[record["image"]])
    h, w = image.shape[:2]
    boxes = np.asarray(record.get("boxes") or [], np.float32).reshape(-1, 4)
    ignore = np.asarray(record.get("ignore_boxes") or [], np.float32).reshape(-1, 4)
    problems = box_problems(np.concatenate([boxes, ignore]), w, h, f"{record['image']}: det labels")
    if problems:
        raise DatasetError(problems[0])
    return {
        "image": image,
        "boxes": boxes,
        "labels": np.asarray(record.get("labels") or [], np.int64).reshape(-1),
        "ignore_boxes": ignore,
        "ignore_labels": np.asarray(record.get("ignore_labels") or [], np.int64).reshape(-1),
        "has_det": bool(record.get("has_det")),
        "sem": decode_mask(record["sem"], "sem", (w, h), data[record["sem"]]) if record.get("sem") else None,
        "drv": decode_mask(record["drv"], "drv", (w, h), data[record["drv"]]) if record.get("drv") else None,
    }
