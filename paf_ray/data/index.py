"""The dataset index: one record per image with the tasks it has (docs/architecture.md §1).

The index reads only the directory listings and the det_20 JSON; it never decodes an
image (that is what ``paf-ray data check`` and the loader do). What does not fit is
dropped and counted: det entries or masks without an image, images without any label,
and (``drop_overlap``) training frames whose stem is also a validation frame.

It is built once per dataset state: ``load_index`` (runs, Tune trials, ``paf-ray data index``)
keeps the built index with the listing it came from (names, sizes, modification times) in
``<root>/.paf_ray_index/`` (or ``data.index_dir``), and reuses it while a new listing of the
root is the same; any added, removed or rewritten file makes it build a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from paf_ray.data import bdd100k as B
from paf_ray.data import storage

log = logging.getLogger(__name__)

RECORD_KEYS = ("name", "image", "image_set", "split", "has_det", "boxes", "labels", "ignore_boxes", "ignore_labels",
               "sem", "drv", "attributes")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


@dataclass
class DetTargets:
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignore_boxes: list[list[float]] = field(default_factory=list)
    ignore_labels: list[int] = field(default_factory=list)  # the class each ignore region hides
    # per box (boxes then ignore boxes): the category name, for reports
    categories: list[str] = field(default_factory=list)


def load_det_json(path: str) -> list[dict]:
    """Read a det_20 file; DatasetError naming the file when it is not a JSON list of frames."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    try:
        frames = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(frames, list):
        raise DatasetError(f"{path}: expected a JSON list of frames, got {type(frames).__name__}")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
            raise DatasetError(f"{path}: frame {i}: expected an object with a string 'name'")
    return frames


def det_targets(frame: dict, source: str) -> tuple[DetTargets, list[str]]:
    """Boxes, class indices and ignore boxes of one det_20 frame, plus the problems found.

    A problem is a string naming the file, frame, label and field. Labels without
    ``box2d`` are skipped (they are not boxes); a missing or null ``labels`` is empty.
    """
    out, problems = DetTargets(), []
    name = frame.get("name")
    labels = frame.get("labels") or []
    if not isinstance(labels, list):
        return out, [f"{source}: frame {name!r}: 'labels' must be a list, got {type(labels).__name__}"]
    for i, label in enumerate(labels):
        where = f"{source}: frame {name!r} label {i}"
        if not isinstance(label, dict):
            problems.append(f"{where}: expected an object")
            continue
        if isinstance(label.get("id"), (str, int)):
            where += f" (id {label['id']!r})"
        box = label.get("box2d")
        if box is None:
            continue
        category = label.get("category")
        mapped = B.det_category_to_index(category) if isinstance(category, str) else None
        if mapped is None:
            problems.append(f"{where}: unknown category {category!r}")
            continue
        if not isinstance(box, dict):
            problems.append(f"{where}: box2d must be an object with x1, y1, x2, y2")
            continue
        coords = []
        for key in ("x1", "y1", "x2", "y2"):
            v = box.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{where}: box2d.{key} is not a number ({v!r})")
                break
            if not math.isfinite(v):
                problems.append(f"{where}: box2d.{key} is {v}")
                break
            coords.append(float(v))
        if len(coords) < 4:
            continue
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            problems.append(f"{where}: box2d has x2 < x1 or y2 < y1 ({x1}, {y1}, {x2}, {y2})")
            continue
        cls, ignored = mapped
        attrs = label.get("attributes") or {}
        if ignored or (isinstance(attrs, dict) and attrs.get("crowd") is True):
            out.ignore_boxes.append(coords)
            out.ignore_labels.append(cls)
        else:
            out.boxes.append(coords)
            out.labels.append(cls)
        out.categories.append(category)
    return out, problems


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


INDEX_DIR = ".paf_ray_index"  # below the dataset root, unless data.index_dir names another place
INDEX_FORMAT = 1  # bump when records or stats change shape: older cached indexes are then rebuilt
READ_THREADS = 16  # concurrent listings / reads: on object storage each one is a round trip

# folder (relative to the root) -> [(name, size, mtime_ns)], plus the det_20 files as [(name, size, mtime_ns)]
Listing = dict[str, list[tuple[str, int, int]]]


def _listing_folders() -> list[str]:
    folders = []
    for split in B.SPLITS:
        folders += [B.IMAGES_DIR.format(image_set=s, split=split) for s in ("100k", "10k")]
        folders += [B.DRV_MASKS_DIR.format(split=split), B.SEM_MASKS_DIR.format(split=split)]
    return folders


def read_listing(root: str) -> Listing:
    """What the index is built from: every folder's files (name, size, mtime) and the det_20 files."""
    folders = _listing_folders()
    with ThreadPoolExecutor(min(READ_THREADS, len(folders))) as pool:
        listed = list(pool.map(lambda f: storage.list_file_infos(storage.join(root, f)), folders))
    out: Listing = dict(zip(folders, [[tuple(i) for i in entries] for entries in listed]))
    det = []
    for split in B.SPLITS:
        info = storage.file_info(storage.join(root, B.DET_LABELS.format(split=split)))
        if info is not None:
            det.append((B.DET_LABELS.format(split=split), *info))
    out["det_20"] = det
    return out


def _files(listing: Listing, template: str, split: str, image_set: str | None = None,
           ext: str = ".jpg") -> list[str]:
    folder = template.format(split=split, image_set=image_set)
    return [n for n, _, _ in listing.get(folder, []) if n.lower().endswith(ext)]


def _sizes(listing: Listing, template: str, split: str, image_set: str) -> dict[str, int]:
    return {n: size for n, size, _ in listing.get(template.format(split=split, image_set=image_set), [])}


def _sha1(path: str) -> str:
    return hashlib.sha1(storage.read_bytes(path)).hexdigest()


def _empty_stats() -> dict:
    keys = ("images_100k", "images_10k", "records", "merged", "dropped_overlap", "unlabelled_images",
            "det_without_image", "drv_without_image", "sem_without_image", "skipped")
    return {**{k: 0 for k in keys}, "problems": []}


def build_index(root: str, splits=("train", "val"), drop_overlap: bool = True, on_bad_sample: str = "error",
                stats: dict | None = None, listing: Listing | None = None) -> dict[str, list[dict]]:
    """Records per split (docs/architecture.md §1), sorted by name.

    ``on_bad_sample="error"`` raises DatasetError on a bad det label (naming file, frame,
    label and field); ``"skip"`` drops that image's record and counts it. What was dropped
    for other reasons is counted too; pass a dict as ``stats`` to receive the counts.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    root = storage.normalize_root(root)
    if not storage.is_dir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    stats = stats if stats is not None else {}
    splits = tuple(splits)
    listing = read_listing(root) if listing is None else listing
    # Stems of every validation frame, for dropping overlapping training frames.
    val_stems: set[str] = set()
    if drop_overlap:
        for s in B.SPLITS:
            if s != "train":
                for image_set in ("100k", "10k"):
                    val_stems.update(_stem(n) for n in _files(listing, B.IMAGES_DIR, s, image_set))
    out = {}
    for split in splits:
        st = stats.setdefault(split, _empty_stats())
        drop = val_stems if (drop_overlap and split == "train") else set()
        out[split] = _index_split(root, split, on_bad_sample, drop, st, listing)
        dropped = {k: v for k, v in st.items() if k not in ("problems", "records", "merged", "images_100k", "images_10k") and v}
        log.info("index %s/%s: %d records (%d merged 100k+10k)%s", root, split, st["records"], st["merged"],
                 f"; dropped {dropped}" if dropped else "")
    return out


def _index_split(root: str, split: str, on_bad_sample: str, drop_stems: set[str], st: dict,
                 listing: Listing) -> list[dict]:
    images = {s: _files(listing, B.IMAGES_DIR, split, s) for s in ("100k", "10k")}
    st["images_100k"], st["images_10k"] = len(images["100k"]), len(images["10k"])
    names100 = set(images["100k"])
    drv = {_stem(n) for n in _files(listing, B.DRV_MASKS_DIR, split, ext=".png")}
    sem = {_stem(n) for n in _files(listing, B.SEM_MASKS_DIR, split, ext=".png")}

    det_path = storage.join(root, B.DET_LABELS.format(split=split))
    det_frames: dict[str, dict] = {}
    if any(name == B.DET_LABELS.format(split=split) for name, _, _ in listing.get("det_20", [])):
        for frame in load_det_json(det_path):
            if frame["name"] not in names100:
                st["det_without_image"] += 1
                continue
            det_frames[frame["name"]] = frame
    st["drv_without_image"] = len(drv - {_stem(n) for n in images["100k"]})
    st["sem_without_image"] = len(sem - {_stem(n) for n in images["10k"]})

    def image_path(image_set, name):
        return storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split), name)

    def mask_path(template, stem):
        return storage.join(root, template.format(split=split), stem + ".png")

    records: dict[tuple[str, str], dict] = {}
    for name in images["100k"]:
        stem = _stem(name)
        frame = det_frames.get(name)
        has_drv = stem in drv
        if frame is None and not has_drv:
            st["unlabelled_images"] += 1
            continue
        targets, problems = det_targets(frame, det_path) if frame is not None else (DetTargets(), [])
        if problems:
            if on_bad_sample == "error":
                raise DatasetError(problems[0])
            st["skipped"] += 1
            st["problems"].extend(problems)
            continue
        records[("100k", stem)] = {
            "name": name, "image": image_path("100k", name), "image_set": "100k", "split": split,
            "has_det": frame is not None, "boxes": targets.boxes, "labels": targets.labels,
            "ignore_boxes": targets.ignore_boxes, "ignore_labels": targets.ignore_labels, "sem": None,
            "drv": mask_path(B.DRV_MASKS_DIR, stem) if has_drv else None,
            "attributes": dict(frame.get("attributes") or {}) if frame is not None else {},
        }
    # A 10k frame whose stem is also a 100k frame is the same frame when the bytes are the same:
    # only pairs of equal size can be, and those are hashed concurrently.
    sizes100, sizes10 = _sizes(listing, B.IMAGES_DIR, split, "100k"), _sizes(listing, B.IMAGES_DIR, split, "10k")
    pairs = [(records[("100k", _stem(n))]["image"], image_path("10k", n)) for n in images["10k"]
             if ("100k", _stem(n)) in records and _stem(n) in sem
             and sizes10.get(n) == sizes100.get(records[("100k", _stem(n))]["name"])]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        hashes = dict(zip([p for pair in pairs for p in pair], pool.map(_sha1, [p for pair in pairs for p in pair])))
    for name in images["10k"]:
        stem = _stem(name)
        if stem not in sem:
            st["unlabelled_images"] += 1
            continue
        sem_path = mask_path(B.SEM_MASKS_DIR, stem)
        twin = records.get(("100k", stem))
        ours = image_path("10k", name)
        if twin is not None and ours in hashes and hashes[twin["image"]] == hashes[ours]:
            twin["sem"] = sem_path  # the same frame in both sets: one record with all three tasks
            st["merged"] += 1
            continue
        records[("10k", stem)] = {
            "name": name, "image": image_path("10k", name), "image_set": "10k", "split": split,
            "has_det": False, "boxes": [], "labels": [], "ignore_boxes": [], "ignore_labels": [],
            "sem": sem_path, "drv": None,
            "attributes": {},
        }
    kept = []
    for (_, stem), rec in records.items():
        if stem in drop_stems:
            st["dropped_overlap"] += 1
            continue
        kept.append(rec)
    kept.sort(key=lambda r: (r["name"], r["image_set"]))
    st["records"] = len(kept)
    return kept


def write_index(records: list[dict], path: str) -> None:
    """JSON lines, one record per line (directories are created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_index(path: str) -> list[dict]:
    """Records from a JSON-lines index; DatasetError naming the file and line on a bad line."""
    text = storage.read_bytes(path).decode("utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {lineno}: malformed JSON: {e}") from None
        missing = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(RECORD_KEYS)
        if missing:
            raise DatasetError(f"{path}: line {lineno}: record is missing {', '.join(missing)}")
        records.append(rec)
    return records


# --------------------------------------------------------------------------- built once


def index_location(root: str, index_dir: str | None = None) -> str:
    """The folder (path or URI) that keeps the built indexes of `root`."""
    return storage.normalize_root(index_dir) if index_dir else storage.join(storage.normalize_root(root), INDEX_DIR)


def _index_key(root: str, listing: Listing, drop_overlap: bool, on_bad_sample: str) -> str:
    text = json.dumps({"format": INDEX_FORMAT, "root": root, "listing": listing, "drop_overlap": drop_overlap,
                       "on_bad_sample": on_bad_sample}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_index(root: str, drop_overlap: bool = True, on_bad_sample: str = "error", index_dir: str | None = None,
               stats: dict | None = None) -> dict[str, list[dict]]:
    """The records of every split: the kept index when the root's listing is unchanged, else built
    now and kept (in `index_dir`, default `<root>/.paf_ray_index`; where that is not writable, in
    this node's cache). Each split's stats say ``"index": "reused"`` or ``"built"``."""
    root = storage.normalize_root(root)
    if not storage.is_dir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    stats = stats if stats is not None else {}
    listing = read_listing(root)
    name = f"index-{_index_key(root, listing, drop_overlap, on_bad_sample)}.json"
    node_cache = os.path.join(storage.cache_dir(), "index", hashlib.sha256(root.encode()).hexdigest()[:16])
    places = [index_location(root, index_dir), node_cache]
    for place in places:
        path = storage.join(place, name)
        if storage.exists(path):
            kept = json.loads(storage.read_bytes(path))
            for split, st in kept["stats"].items():
                stats[split] = {**st, "index": "reused"}
            log.info("index %s: reused %s", root, path)
            return kept["splits"]
    built_stats: dict = {}
    splits = build_index(root, splits=B.SPLITS, drop_overlap=drop_overlap, on_bad_sample=on_bad_sample,
                         stats=built_stats, listing=listing)
    text = json.dumps({"format": INDEX_FORMAT, "root": root, "listing": listing, "stats": built_stats,
                       "splits": splits}, separators=(",", ":"))
    for place in places:
        try:
            _write_atomically(storage.join(place, name), text.encode("utf-8"))
            break
        except OSError as e:  # a read-only dataset root: keep it on this node instead
            log.warning("index %s: cannot write %s (%s)", root, place, e)
    for split, st in built_stats.items():
        stats[split] = {**st, "index": "built"}
    return splits


def _write_atomically(path: str, data: bytes) -> None:
    """Object stores replace a whole object at once; a local file goes through a temporary name."""
    if storage.is_remote(path):
        storage.write_bytes(path, data)
        return
    local = storage.local_path(path)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, local)
