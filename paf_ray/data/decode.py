"""Reading and decoding one sample's files: used by the loader and by ``paf-ray data check``.

Every failure is a :class:`DatasetError` whose message names the file and the problem. What a
task's label means is the task's business (``Task.decode``); the image and 8-bit masks are decoded
here.

Every image and mask is opened lazily first: its header gives its size, and one with more than
``max_pixels`` pixels (``data.max_image_pixels``, default :data:`MAX_IMAGE_PIXELS`) is refused
before a pixel is decoded, so a small file whose header claims a huge size costs no memory.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from paf_ray.data.contracts import DatasetError, Record, Sample
from paf_ray.runtime import storage

# The most pixels an image or mask may have (width x height): 4096 x 4096, 16.8 MP. Driving frames
# are 0.9 MP (BDD100K, 1280x720) to 3 MP (2048x1550); a 4K frame is 8.3 MP. Decoding a frame at
# the limit takes 50 MB (RGB uint8), a float copy 200 MB. Config key: data.max_image_pixels.
MAX_IMAGE_PIXELS = 4096 * 4096

_readers: ThreadPoolExecutor | None = None
_pil_check = threading.Lock()


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


def open_image(path: str, data: bytes, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image `data` opened lazily (its header read, no pixel decoded); DatasetError naming `path`
    when it is no image, or when it has more than `max_pixels` pixels."""
    try:
        # PIL's own check (Image.MAX_IMAGE_PIXELS) is off while the header is read: ours follows and
        # names the file, and a limit set above PIL's must be ours to decide
        with _pil_check:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable or corrupt {what} (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt {what} ({e})") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise DatasetError(f"{path}: {what} of {width}x{height} = {width * height} pixels is over the limit of "
                           f"{max_pixels} (data.max_image_pixels, --max-image-pixels); refused before decoding")
    return im


def decode_image(path: str, data: bytes | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3); DatasetError for a missing, unreadable, corrupt or too large image."""
    data = read(path) if data is None else data
    with open_image(path, data, "image", max_pixels) as im:
        try:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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


def read_mask(path: str, what: str, data: bytes | None = None, size: tuple[int, int] | None = None,
              max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8 (H, W): an 8-bit single-channel mask (mode L or P: the values are the ids), its format
    and size (`size` = (width, height) it must have, or None) checked from its header before decoding."""
    data = read(path) if data is None else data
    with open_image(path, data, what, max_pixels) as im:
        if im.mode not in ("L", "P"):
            raise DatasetError(f"{path}: {what} must be an 8-bit single-channel PNG, got mode {im.mode}")
        if size is not None and im.size != tuple(size):
            raise DatasetError(f"{path}: {what} is {im.size[0]}x{im.size[1]}, its image is {size[0]}x{size[1]}")
        try:
            im.load()
            return np.asarray(im, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: unreadable or corrupt {what} ({e})") from None


def decode_mask(path: str, what: str, allowed: np.ndarray, size: tuple[int, int] | None = None,
                data: bytes | None = None) -> np.ndarray:
    """uint8 (H, W) mask (an 8-bit single-channel PNG), checked for format, size and values.

    `allowed`: bool [256], which byte values the mask may hold; `size` = (width, height) the mask
    must have (its image's size: the image's pixel limit bounds it), or None; `what` names the mask
    in errors ("sem mask").
    """
    mask = read_mask(path, what, data, size)
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


def load_sample(record: Record, tasks, max_pixels: int = MAX_IMAGE_PIXELS) -> Sample:
    """Decode one index record into numpy arrays (original resolution), every label checked.

    `tasks`: the task objects of the run; labels of other tasks in the record are not read;
    `max_pixels`: data.max_image_pixels."""
    ours = [t for t in tasks if t.name in record["labels"]]
    paths = [record["image"]] + [p for t in ours for p in t.files(record["labels"][t.name])]
    data = dict(zip(paths, read_many(paths)))
    image = decode_image(record["image"], data[record["image"]], max_pixels)
    size = (image.shape[1], image.shape[0])
    targets = {t.name: t.decode(record["labels"][t.name], data, size, record["image"]) for t in ours}
    return {"image": image, "targets": targets}
