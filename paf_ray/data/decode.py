"""Reading and decoding one sample's files: used by the loader and by ``paf-ray data check``.

Every failure is a :class:`DatasetError` whose message names the file and the problem. What a
task's label means is the task's business (``Task.decode``); the image and 8-bit masks are decoded
here.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from paf_ray.data.contracts import DatasetError, Record, Sample
from paf_ray.runtime import storage

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


def value_ranges(allowed: np.ndarray) -> str:
    """The byte values where `allowed` (bool [256]) is true, as '0-18, 255'."""
    values = np.flatnonzero(allowed).tolist()
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def decode_mask(path: str, what: str, allowed: np.ndarray, size: tuple[int, int] | None = None,
                data: bytes | None = None) -> np.ndarray:
    """uint8 (H, W) mask (an 8-bit single-channel PNG), checked for format, size and values.

    `allowed`: bool [256], which byte values the mask may hold; `size` = (width, height) the mask
    must have (its image's size), or None; `what` names the mask in errors ("sem mask").
    """
    data = read(path) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            mask = np.asarray(im)
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable or corrupt {what} (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt {what} ({e})") from None
    if mode not in ("L", "P"):
        raise DatasetError(f"{path}: {what} must be an 8-bit single-channel PNG, got mode {mode}")
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise DatasetError(f"{path}: {what} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = np.flatnonzero(counts * ~allowed)
    if bad.size:
        raise DatasetError(f"{path}: {what} has values outside {value_ranges(allowed)}: {bad[:8].tolist()}")
    return mask


def encode_png(mask: np.ndarray) -> bytes:
    """An 8-bit single-channel (or RGB) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask)).save(buf, format="PNG")
    return buf.getvalue()


def load_sample(record: Record, tasks) -> Sample:
    """Decode one index record into numpy arrays (original resolution), every label checked.

    `tasks`: the task objects of the run; labels of other tasks in the record are not read."""
    ours = [t for t in tasks if t.name in record["labels"]]
    paths = [record["image"]] + [p for t in ours for p in t.files(record["labels"][t.name])]
    data = dict(zip(paths, read_many(paths)))
    image = decode_image(record["image"], data[record["image"]])
    size = (image.shape[1], image.shape[0])
    targets = {t.name: t.decode(record["labels"][t.name], data, size, record["image"]) for t in ours}
    return {"image": image, "targets": targets}
