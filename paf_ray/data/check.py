"""``paf-ray data check``: decode every file of a dataset root and report what is wrong.

Errors (each naming the file and the problem): unreadable or corrupt image, an image or mask with
more pixels than the limit (``data.max_image_pixels``; refused from its header, never decoded), a
label file a task cannot read (a mask of the wrong size, format or values, a box outside the
image, an unknown category, malformed JSON...), a label for a missing image, a root without images
in any split (saying what layout was expected, and where the images seem to be). Warnings: images
without labels, an empty split, training frames whose stem is also a val frame. What each task checks in its labels is the task's
(``Task.check_labels``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from paf_ray.data import bdd100k as B
from paf_ray.data.contracts import DatasetError
from paf_ray.data.decode import MAX_IMAGE_PIXELS, decode_image
from paf_ray.runtime import storage


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    file: str
    problem: str


@dataclass
class SplitReport:
    images: dict[str, int] = field(default_factory=lambda: {s: 0 for s in B.IMAGE_SETS})
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> what -> n ("labelled", "boxes/car")
    errors: int = 0
    warnings: int = 0


@dataclass
class CheckReport:
    root: str
    tasks: list[str] = field(default_factory=list)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "tasks": self.tasks,
                "splits": {k: asdict(v) for k, v in self.splits.items()}, "problems": [asdict(p) for p in self.problems]}


class _Sink:
    """Where one task writes its problems and counts for one split (tasks/base.CheckSink)."""

    def __init__(self, report: CheckReport, split: SplitReport, task: str):
        self.report, self.split, self.task = report, split, task
        self.stems: set[str] = set()
        split.counts.setdefault(task, {"labelled": 0})

    def error(self, file: str, problem: str) -> None:
        self.report.problems.append(Problem("error", file, problem))

    def warning(self, file: str, problem: str) -> None:
        self.report.problems.append(Problem("warning", file, problem))

    def labelled(self, stem: str) -> None:
        self.stems.add(stem)
        self.count("labelled")

    def count(self, what: str, n: int = 1) -> None:
        counts = self.split.counts[self.task]
        counts[what] = counts.get(what, 0) + n


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def check_dataset(root: str, tasks, splits=B.SPLITS, max_pixels: int = MAX_IMAGE_PIXELS) -> CheckReport:
    """Check every image of the root and every label of `tasks`; `max_pixels`: data.max_image_pixels."""
    root = storage.normalize_root(root)
    report = CheckReport(root, [t.name for t in tasks])
    if not storage.is_dir(root):
        report.problems.append(Problem("error", root, "dataset root does not exist or is not a folder"))
        return report
    stems_by_split = {}
    for split in splits:
        sr = report.splits[split] = SplitReport()
        before = len(report.problems)
        stems_by_split[split] = _check_split(root, split, tasks, sr, report, max_pixels)
        new = report.problems[before:]
        sr.errors = sum(p.severity == "error" for p in new)
        sr.warnings = len(new) - sr.errors
    if not any(sum(sr.images.values()) for sr in report.splits.values()):
        report.problems.append(Problem("error", root, f"no images in any split ({', '.join(splits)}): "
                                                      f"{layout_hint(root, splits)}"))
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


def layout_hint(root: str, splits) -> str:
    """What layout a root without images should have, and where the images seem to be instead."""
    expected = (f"expected the official layout ROOT/images/{{{','.join(B.IMAGE_SETS)}}}/{{{','.join(splits)}}}/*.jpg "
                "(ROOT holds images/ and labels/)")
    names = set(storage.list_dirs(root))
    sets, split_dirs = sorted(names & set(B.IMAGE_SETS)), sorted(names & set(splits))
    if sets:
        return f"{expected}; {root} looks like the images/ folder (it holds {'/, '.join(sets)}/): point at its parent"
    if split_dirs:
        return (f"{expected}; {root} looks like one image set's folder (it holds {'/, '.join(split_dirs)}/): "
                "point at the folder 2 levels up")
    below = sorted(n for n in names if storage.is_dir(storage.join(root, n, "images")))
    if below:
        return f"{expected}; the dataset seems to be in {storage.join(root, below[0])}"
    return expected


def _check_split(root: str, split: str, tasks, sr: SplitReport, report: CheckReport,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> set[str]:
    sizes: dict[str, dict[str, tuple[int, int] | None]] = {}
    for image_set in B.IMAGE_SETS:
        folder = storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split))
        names = [n for n in storage.list_files(folder) if n.lower().endswith((".jpg", ".jpeg", ".png"))]
        sr.images[image_set] = len(names)
        sizes[image_set] = {}
        for name in names:
            path = storage.join(folder, name)
            try:
                img = decode_image(path, max_pixels=max_pixels)
                sizes[image_set][_stem(name)] = (img.shape[1], img.shape[0])
            except DatasetError as e:
                report.problems.append(Problem("error", path, str(e).removeprefix(path + ": ")))
                sizes[image_set][_stem(name)] = None  # exists, but unreadable
    if not any(sr.images.values()):
        report.problems.append(Problem("warning", storage.join(root, "images"), f"split {split!r} has no images"))
    labelled: dict[str, set[str]] = {s: set() for s in B.IMAGE_SETS}
    for task in tasks:
        sink = _Sink(report, sr, task.name)
        task.check_labels(root, split, sizes[task.image_set], sink)
        labelled[task.image_set] |= sink.stems
    for image_set in B.IMAGE_SETS:
        unlabelled = set(sizes[image_set]) - labelled[image_set]
        if unlabelled:
            folder = storage.join(root, B.IMAGES_DIR.format(image_set=image_set, split=split))
            report.problems.append(Problem("warning", folder, f"{len(unlabelled)} image(s) without any label "
                                                              f"(e.g. {sorted(unlabelled)[0]}.jpg)"))
    return set().union(*(set(v) for v in sizes.values()))


def format_report(report: CheckReport) -> str:
    """The human-readable table printed by ``paf-ray data check``."""
    splits = list(report.splits)
    lines = [f"dataset: {report.root}", ""]
    w = max([12] + [len(s) + 2 for s in splits])

    def row(label, values):
        return f"{label:<28}" + "".join(f"{v:>{w}}" for v in values)

    lines.append(row("", splits))
    for image_set in B.IMAGE_SETS:
        lines.append(row(f"images {image_set}", [report.splits[s].images[image_set] for s in splits]))
    for task in report.tasks:
        whats = list(dict.fromkeys(k for s in splits for k in report.splits[s].counts.get(task, {})))
        for what in whats:
            label = f"{task} {what}" if what == "labelled" else f"  {what}"
            lines.append(row(label, [report.splits[s].counts.get(task, {}).get(what, 0) for s in splits]))
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
