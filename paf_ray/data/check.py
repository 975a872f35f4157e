"""``paf-ray data check``: decode every file of a dataset root and report what is wrong.

Errors (each naming the file and the problem): unreadable or corrupt image, mask of the
wrong size / format or with values outside the allowed set, box outside the image,
x2 < x1, NaN coordinate, unknown category, malformed JSON, a label or mask for a missing
image. Warnings: images without labels, training frames whose stem is also a val frame.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from paf_ray.data import bdd100k as B
from paf_ray.data import storage
from paf_ray.data.decode import box_problems, decode_image, decode_mask
from paf_ray.data.index import DatasetError, det_targets, load_det_json


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    file: str
    problem: str


@dataclass
class SplitReport:
    images: dict[str, int] = field(default_factory=lambda: {"100k": 0, "10k": 0})
    labelled: dict[str, int] = field(default_factory=lambda: {t: 0 for t in B.TASKS})
    boxes_per_class: dict[str, int] = field(default_factory=lambda: {c: 0 for c in B.DET_CLASSES})
    ignore_boxes: int = 0
    errors: int = 0
    warnings: int = 0


@dataclass
class CheckReport:
    root: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "splits": {k: asdict(v) for k, v in self.splits.items()},
                "problems": [asdict(p) for p in self.problems]}


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def check_dataset(root: str, splits=("train", "val")) -> CheckReport:
    root = storage.normalize_root(root)
    report = CheckReport(root)
    if not storage.is_dir(root):
        report.problems.append(Problem("error", root, "dataset root does not exist or is not a folder"))
        return report
    stems_by_split = {}
    for split in splits:
        sr = report.splits[split] = SplitReport()
        before = len(report.problems)
        stems_by_split[split] = _check_split(root, split, sr, report.problems)
        new = report.problems[before:]
        sr.errors = sum(p.severity == "error" for p in new)
        sr.warnings = len(new) - sr.errors
    if "train" in stems_by_split:
        val = set().union(*(v for k, v in stems_by_split.items() if k != "train")) if len(stems_by_split) > 1 else set()
        overlap = sorted(stems_by_split["train"] & val)
        if overlap:
            report.problems.append(Problem(
                "warning", storage.join(root, "images"),
                f"{len(overlap)} train frame(s) share a stem with a val frame (e.g. {overlap[0]}); "
                "the index drops them unless --keep-overlap"))
            report.splits["train"].warnings += 1
    return report


def _check_split(root: str, split: str, sr: SplitReport, problems: list[Problem]) -> set[str]:
    def error(path, msg):
        problems.append(Problem("error", path, msg))

    def from_exc(e: DatasetError, path: str):
        text = str(e)
        prefix = path + ": "
        error(path, text[len(prefix):] if text.startswith(prefix) else text)

    sizes: dict[str, dict[str, tuple[int, int] | None]] = {}
    for image_set in ("100k", "10k"):
        folder = storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split))
        names = [n for n in storage.list_files(folder) if n.lower().endswith((".jpg", ".jpeg", ".png"))]
        sr.images[image_set] = len(names)
        sizes[image_set] = {}
        for name in names:
            path = storage.join(folder, name)
            try:
                img = decode_image(path)
                sizes[image_set][_stem(name)] = (img.shape[1], img.shape[0])
            except DatasetError as e:
                from_exc(e, path)
                sizes[image_set][_stem(name)] = None  # exists, but unreadable

    labelled = {"100k": set(), "10k": set()}
    det_path = storage.join(root, B.DET_LABELS.format(split=split))
    if storage.exists(det_path):
        try:
            frames = load_det_json(det_path)
        except DatasetError as e:
            from_exc(e, det_path)
            frames = []
        seen = set()
        for frame in frames:
            name = frame["name"]
            stem = _stem(name)
            if name in seen:
                problems.append(Problem("warning", det_path, f"frame {name!r} appears more than once"))
            seen.add(name)
            targets, frame_problems = det_targets(frame, det_path)
            for msg in frame_problems:
                error(det_path, msg[len(det_path) + 2:])
            if stem not in sizes["100k"]:
                error(det_path, f"frame {name!r}: label for a missing image "
                                f"({B.IMAGES_DIR.format(image_set='100k', split=split)}/{name})")
                continue
            sr.labelled["det"] += 1
            labelled["100k"].add(stem)
            size = sizes["100k"][stem]
            if size is not None:
                for msg in box_problems(targets.boxes + targets.ignore_boxes, size[0], size[1], f"frame {name!r}"):
                    error(det_path, msg)
            for cls in targets.labels:
                sr.boxes_per_class[B.DET_CLASSES[cls]] += 1
            sr.ignore_boxes += len(targets.ignore_boxes)
    elif sr.images["100k"]:
        problems.append(Problem("warning", det_path, "no detection labels for this split"))

    for task, template, image_set in (("drv", B.DRV_MASKS_DIR, "100k"), ("sem", B.SEM_MASKS_DIR, "10k")):
        folder = storage.join(root, template.format(split=split))
        for name in storage.list_files(folder):
            path = storage.join(folder, name)
            if not name.lower().endswith(".png"):
                problems.append(Problem("warning", path, "not a PNG mask; ignored"))
                continue
            stem = _stem(name)
            if stem not in sizes[image_set]:
                error(path, f"{task} mask for a missing image "
                            f"({B.IMAGES_DIR.format(image_set=image_set, split=split)}/{stem}.jpg)")
                continue
            try:
                decode_mask(path, task, sizes[image_set][stem])
            except DatasetError as e:
                from_exc(e, path)
                continue
            sr.labelled[task] += 1
            labelled[image_set].add(stem)

    for image_set in ("100k", "10k"):
        unlabelled = set(sizes[image_set]) - labelled[image_set]
        if unlabelled:
            folder = storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split))
            problems.append(Problem("warning", folder, f"{len(unlabelled)} image(s) without any label "
                                                       f"(e.g. {sorted(unlabelled)[0]}.jpg)"))
    return set(sizes["100k"]) | set(sizes["10k"])


def format_report(report: CheckReport) -> str:
    """The human-readable table printed by ``paf-ray data check``."""
    splits = list(report.splits)
    lines = [f"dataset: {report.root}", ""]
    w = max([12] + [len(s) + 2 for s in splits])

    def row(label, values):
        return f"{label:<24}" + "".join(f"{v:>{w}}" for v in values)

    lines.append(row("", splits))
    for image_set in ("100k", "10k"):
        lines.append(row(f"images {image_set}", [report.splits[s].images[image_set] for s in splits]))
    for task, what in (("det", "det (boxes)"), ("sem", "sem (masks)"), ("drv", "drv (masks)")):
        lines.append(row(f"labelled {what}", [report.splits[s].labelled[task] for s in splits]))
    lines.append("boxes per class:")
    for cls in B.DET_CLASSES:
        lines.append(row(f"  {cls}", [report.splits[s].boxes_per_class[cls] for s in splits]))
    lines.append(row("  ignore regions", [report.splits[s].ignore_boxes for s in splits]))
    lines.append(row("errors", [report.splits[s].errors for s in splits]))
    lines.append(row("warnings", [report.splits[s].warnings for s in splits]))
    lines.append("")
    if not report.problems:
        lines.append("no problems found")
    for p in report.problems:
        lines.append(f"{p.severity.upper():<8}{p.file}: {p.problem}")
    errors = len(report.errors)
    lines.append("")
    lines.append(f"{errors} error(s), {len(report.problems) - errors} warning(s)")
    return "\n".join(lines)
