"""The dataset index: one record per frame with the labels of every task it has (docs/architecture.md §1).

The index reads only the directory listings and the label files the tasks name (``Task.listing``,
``Task.read_labels``); it never decodes an image (that is what ``paf-ray data check`` and the
loader do). What does not fit is dropped and counted: labels without an image, images without
any label, and (``drop_overlap``) training frames whose stem is also a validation frame. A frame
of the second image set (10k) whose bytes equal its twin of the first (100k) is one record with
the tasks of both.

It is built once per dataset state: ``load_index`` (runs, Tune trials, ``paf-ray data index``)
keeps the built index with the listing it came from (names, sizes, modification times) in
``<root>/.paf_ray_index/`` (or ``data.index_dir``), and reuses it while a new listing of the
root is the same; any added, removed or rewritten file makes it build a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from paf_ray.data import bdd100k as B
from paf_ray.data.contracts import DatasetError
from paf_ray.runtime import files, storage

log = logging.getLogger(__name__)

RECORD_KEYS = ("name", "image", "image_set", "split", "labels", "attributes")
INDEX_DIR = ".paf_ray_index"  # below the dataset root, unless data.index_dir names another place
INDEX_FORMAT = 2  # bump when records or stats change shape: older kept indexes are then rebuilt
READ_THREADS = 16  # concurrent listings / reads: on object storage each one is a round trip

# folder or file (relative to the root) -> [(name, size, mtime_ns)]
Listing = dict[str, list[tuple[str, int, int]]]


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def read_listing(root: str, tasks) -> Listing:
    """What the index is built from: every image folder's files and each task's label folders and files."""
    folders = [B.IMAGES_DIR.format(image_set=s, split=split) for split in B.SPLITS for s in B.IMAGE_SETS]
    label_files = []
    for split in B.SPLITS:
        for task in tasks:
            for entry in task.listing(split):
                (folders if entry.kind == "dir" else label_files).append(entry.path)
    with ThreadPoolExecutor(min(READ_THREADS, len(folders))) as pool:
        listed = list(pool.map(lambda f: storage.list_file_infos(storage.join(root, f)), folders))
    out: Listing = dict(zip(folders, [[tuple(i) for i in entries] for entries in listed]))
    for path in label_files:
        info = storage.file_info(storage.join(root, path))
        out[path] = [(os.path.basename(path), *info)] if info is not None else []
    return out


def _empty_stats(tasks) -> dict:
    keys = [f"images_{s}" for s in B.IMAGE_SETS] + ["records", "merged", "dropped_overlap", "unlabelled_images",
                                                    "skipped"]
    keys += [f"{t.name}_without_image" for t in tasks]
    return {**{k: 0 for k in keys}, "problems": []}


def _sha1(path: str) -> str:
    return hashlib.sha1(storage.read_bytes(path)).hexdigest()


def build_index(root: str, tasks, splits=B.SPLITS, drop_overlap: bool = True, on_bad_sample: str = "error",
                stats: dict | None = None, listing: Listing | None = None) -> dict[str, list[dict]]:
    """Records per split (docs/architecture.md §1), sorted by name, with the labels of `tasks`.

    ``on_bad_sample="error"`` raises DatasetError on a bad label (naming file, frame, label and
    field); ``"skip"`` drops that frame's record and counts it. What was dropped for other reasons
    is counted too; pass a dict as ``stats`` to receive the counts.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    root = storage.normalize_root(root)
    if not storage.is_dir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    stats = stats if stats is not None else {}
    listing = read_listing(root, tasks) if listing is None else listing
    # Stems of every validation frame, for dropping overlapping training frames.
    val_stems: set[str] = set()
    if drop_overlap:
        for s in B.SPLITS:
            if s != "train":
                for image_set in B.IMAGE_SETS:
                    val_stems.update(_stem(n) for n in _images(listing, s, image_set))
    out = {}
    for split in splits:
        st = stats.setdefault(split, _empty_stats(tasks))
        drop = val_stems if (drop_overlap and split == "train") else set()
        out[split] = _index_split(root, split, tasks, on_bad_sample, drop, st, listing)
        dropped = {k: v for k, v in st.items() if v and k not in ("problems", "records", "merged")
                   and not k.startswith("images_")}
        log.info("index %s/%s: %d records (%d merged)%s", root, split, st["records"], st["merged"],
                 f"; dropped {dropped}" if dropped else "")
    return out


def _images(listing: Listing, split: str, image_set: str) -> list[str]:
    folder = B.IMAGES_DIR.format(split=split, image_set=image_set)
    return [n for n, _, _ in listing.get(folder, []) if n.lower().endswith((".jpg", ".jpeg", ".png"))]


def _index_split(root: str, split: str, tasks, on_bad_sample: str, drop_stems: set[str], st: dict,
                 listing: Listing) -> list[dict]:
    images = {s: _images(listing, split, s) for s in B.IMAGE_SETS}
    for s in B.IMAGE_SETS:
        st[f"images_{s}"] = len(images[s])
    stems = {s: {_stem(n): n for n in images[s]} for s in B.IMAGE_SETS}
    labels = {t.name: t.read_labels(root, split, listing) for t in tasks}
    bad: set[tuple[str, str]] = set()  # (image set, stem) of frames whose labels are bad
    for task in tasks:
        found = labels[task.name]
        st[f"{task.name}_without_image"] = sum(s not in stems[task.image_set] for s in found.by_stem)
        for stem, problem in found.problems:
            if on_bad_sample == "error":
                raise DatasetError(problem)
            st["problems"].append(problem)
            bad.add((task.image_set, stem))

    def image_path(image_set, name):
        return storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split), name)

    records: dict[tuple[str, str], dict] = {}
    for image_set in B.IMAGE_SETS:
        ours = [t for t in tasks if t.image_set == image_set]
        for stem, name in stems[image_set].items():
            if (image_set, stem) in bad:
                st["skipped"] += 1
                continue
            frame_labels = {t.name: labels[t.name].by_stem[stem] for t in ours if stem in labels[t.name].by_stem}
            if not frame_labels:
                st["unlabelled_images"] += 1
                continue
            attributes = {}
            for t in ours:
                attributes.update(labels[t.name].attributes.get(stem, {}))
            records[(image_set, stem)] = {"name": name, "image": image_path(image_set, name), "image_set": image_set,
                                          "split": split, "labels": frame_labels, "attributes": attributes}
    _merge_twins(records, listing, split)
    st["merged"] = sum(1 for r in records.values() if r.pop("_merged", False))
    kept = []
    for (_, stem), rec in records.items():
        if stem in drop_stems:
            st["dropped_overlap"] += 1
            continue
        kept.append(rec)
    kept.sort(key=lambda r: (r["name"], r["image_set"]))
    st["records"] = len(kept)
    return kept


def _merge_twins(records: dict, listing: Listing, split: str) -> None:
    """A frame of a later image set whose stem and bytes equal a frame of the first set is the same
    frame (BDD100K ships some in both): one record with the labels of both. Only pairs of equal size
    can be, and those are hashed concurrently."""
    first, others = B.IMAGE_SETS[0], B.IMAGE_SETS[1:]

    def sizes(image_set):
        return {n: size for n, size, _ in listing.get(B.IMAGES_DIR.format(split=split, image_set=image_set), [])}

    size_first = sizes(first)
    for image_set in others:
        size_other = sizes(image_set)
        pairs = [(records[(first, stem)], rec) for (s, stem), rec in records.items()
                 if s == image_set and (first, stem) in records
                 and size_other.get(rec["name"]) == size_first.get(records[(first, stem)]["name"])]
        paths = [p for a, b in pairs for p in (a["image"], b["image"])]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            hashes = dict(zip(paths, pool.map(_sha1, paths)))
        for twin, rec in pairs:
            if hashes[twin["image"]] == hashes[rec["image"]]:
                twin["labels"].update(rec["labels"])
                twin["attributes"] = {**rec["attributes"], **twin["attributes"]}
                twin["_merged"] = True
                del records[(image_set, os.path.splitext(rec["name"])[0])]


def write_index(records: list[dict], path: str) -> None:
    """JSON lines, one record per line, written whole."""
    files.write_text(path, "".join(json.dumps(rec, separators=(",", ":")) + "\n" for rec in records))


def read_index(path: str) -> list[dict]:
    """Records from a JSON-lines index; DatasetError naming the file and line on a bad line."""
    text = storage.read_bytes(path).decode("utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DatasetError(f"{path}: line {lineno}: malformed JSON: {str(e)[:120]}") from None
        missing = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(RECORD_KEYS)
        if missing:
            raise DatasetError(f"{path}: line {lineno}: record is missing {', '.join(missing)}")
        records.append(rec)
    return records


# --------------------------------------------------------------------------- built once


def index_location(root: str, index_dir: str | None = None) -> str:
    """The folder (path or URI) that keeps the built indexes of `root`."""
    return storage.normalize_root(index_dir) if index_dir else storage.join(storage.normalize_root(root), INDEX_DIR)


def _index_key(root: str, listing: Listing, tasks, drop_overlap: bool, on_bad_sample: str) -> str:
    text = json.dumps({"format": INDEX_FORMAT, "root": root, "listing": listing, "tasks": sorted(t.name for t in tasks),
                       "drop_overlap": drop_overlap, "on_bad_sample": on_bad_sample}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_kept(path: str) -> dict | None:
    """A kept index, or None (with a line saying so) when the file is cut short or not an index."""
    try:
        kept = json.loads(storage.read_bytes(path))
        if not isinstance(kept, dict) or not isinstance(kept.get("splits"), dict) or "stats" not in kept:
            raise ValueError("not an index")
        return kept
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        log.warning("index %s is unreadable (%s: %s); building it again", path, type(e).__name__, str(e)[:80])
        return None


def load_index(root: str, tasks, drop_overlap: bool = True, on_bad_sample: str = "error",
               index_dir: str | None = None, stats: dict | None = None) -> dict[str, list[dict]]:
    """The records of every split: the kept index when the root's listing is unchanged, else built
    now and kept (in `index_dir`, default `<root>/.paf_ray_index`; where that is not writable, in
    this node's cache). Each split's stats say ``"index": "reused"`` or ``"built"``."""
    root = storage.normalize_root(root)
    if not storage.is_dir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    stats = stats if stats is not None else {}
    listing = read_listing(root, tasks)
    name = f"index-{_index_key(root, listing, tasks, drop_overlap, on_bad_sample)}.json"
    node_cache = os.path.join(storage.cache_dir(), "index", hashlib.sha256(root.encode()).hexdigest()[:16])
    places = [index_location(root, index_dir), node_cache]
    for place in places:
        path = storage.join(place, name)
        if storage.exists(path):
            kept = _read_kept(path)
            if kept is None:
                continue
            for split, st in kept["stats"].items():
                stats[split] = {**st, "index": "reused"}
            log.info("index %s: reused %s", root, path)
            return kept["splits"]
    built_stats: dict = {}
    splits = build_index(root, tasks, splits=B.SPLITS, drop_overlap=drop_overlap, on_bad_sample=on_bad_sample,
                         stats=built_stats, listing=listing)
    text = json.dumps({"format": INDEX_FORMAT, "root": root, "listing": listing, "stats": built_stats,
                       "splits": splits}, separators=(",", ":"))
    for place in places:
        try:
            files.write_bytes(storage.join(place, name), text.encode("utf-8"))
            break
        except OSError as e:  # a read-only dataset root: keep it on this node instead
            log.warning("index %s: cannot write %s (%s)", root, place, e)
    for split, st in built_stats.items():
        stats[split] = {**st, "index": "built"}
    return splits
