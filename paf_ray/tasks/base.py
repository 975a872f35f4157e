"""The task protocol: everything paf_ray knows about one perception task, in one object.

A task is one module under ``paf_ray/tasks/`` that makes a :class:`Task` and registers it
(``TASKS.register(MyTask())``); its dataset facts (label layout, class lists) sit in the BDD100K
facts module. Nothing else in paf_ray names a task: the index, the Ray Data rows and batches, the
model's heads and losses, the evaluator and its metric keys, ``score``, ``predict``, ``export``,
the overlay, ``data check``, the study's Δ_MTL and Tune's metrics ask the registry.

The data path, for task ``t`` (docs/architecture.md walks it with lane marking as the example):

    index       listing(split), read_labels(...)   -> record["labels"][t]   (JSON: a path, or boxes)
    decode      files(label), decode(label, ...)   -> target                (numpy, frame resolution)
    transform   transform(target | None, geometry) -> the row's t columns   (numpy, network input)
    collate     collate(columns, good rows)        -> batch["targets"][t]   (torch)
    model       build_head(section, ...)           -> a head: head.losses(...) in training, head(...) in eval
    evaluate    evaluator(section): update/state; merge(states); compute(state) -> flat metrics "t/..."
    predict     postprocess(output of one image)   -> a prediction at frame resolution (numpy)
    write       frame_files / frame_record / final_files: the official output formats
    overlay     draw(image, prediction)
    export      export_outputs(outputs, frame)     -> named tensors of the deployable model

A task module imports no torch when it is imported: Ray Data's decode workers load the task
objects with every row map, and a worker that imports torch holds ~430 MB more. The torch side
(heads, losses, collation) is imported inside the methods that need it.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from paf_ray.data.transforms import Geometry

if TYPE_CHECKING:  # no torch at import time (module docstring)
    import torch
    from torch import nn


@dataclass(frozen=True)
class ListingEntry:
    """A folder (its files) or one file under the dataset root that the index lists and keys on."""

    path: str  # relative to the root, e.g. "labels/sem_seg/masks/train"
    kind: str = "dir"  # "dir" | "file"


@dataclass
class Labels:
    """What a task found for one split: per frame stem its label (JSON-able), the frames' attributes
    where the labels carry them, and the problems of frames whose labels are bad (stem, message)."""

    by_stem: dict[str, Any]
    attributes: dict[str, dict]
    problems: list[tuple[str, str]]
    orphans: int = 0  # labels whose image is missing from the listing


@dataclass(frozen=True)
class HeadInput:
    """What a task head sees: the shared pyramid (this task's view of it) and the network input."""

    pyramid: "dict[str, torch.Tensor]"  # FPN levels "0".. (finest first) plus the extra levels a task asked for
    levels: "list[torch.Tensor]"  # the FPN levels of the backbone's stages, finest first
    images: "torch.Tensor"  # the normalised network input [B, 3, H, W]
    score_map: "torch.Tensor | None" = None  # the LV-Adapter's pixel-text scores for this task [B, K, h, w]

    def select(self, idx: "torch.Tensor") -> "HeadInput":
        """The same input for the images `idx` only."""
        return HeadInput({k: v[idx] for k, v in self.pyramid.items()}, [f[idx] for f in self.levels],
                         self.images[idx], None if self.score_map is None else self.score_map[idx])


class Task(abc.ABC):
    """One task. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]  # the key: model.tasks, metric prefixes, row columns, output folders
    title: ClassVar[str]  # what it is, in words
    classes: ClassVar[tuple[str, ...]]  # what the head predicts (for tables and the LV-Adapter)
    prompt_names: ClassVar[tuple[str, ...]]  # the classes as CLIP prompts read them (LV-Adapter)
    image_set: ClassVar[str]  # the BDD100K frame set its labels cover
    headline: ClassVar[str]  # the metric that stands for the task: score, Δ_MTL, Tune, study tables
    higher_is_better: ClassVar[bool] = True
    table_metrics: ClassVar[tuple[str, ...]]  # the metrics tables and logs show, headline first
    config: ClassVar[type | None] = None  # the dataclass of its section model.heads.<name>
    draw_order: ClassVar[int] = 0  # overlays paint lower numbers first

    # ----------------------------------------------------------------- config

    def check(self, section: Any, model_cfg: Any) -> list[tuple[str, str]]:
        """(key, reason) problems of its section given the model config; checked once, at load."""
        return []

    # ----------------------------------------------------------------- index

    @abc.abstractmethod
    def listing(self, split: str) -> list[ListingEntry]:
        """What the index lists for this split (its key covers these files' names, sizes, times)."""

    @abc.abstractmethod
    def read_labels(self, root: str, split: str, listing: dict[str, list[tuple[str, int, int]]]) -> Labels:
        """The split's labels by frame stem, from the listing (and, for label files, their content)."""

    # ----------------------------------------------------------------- decode and transform (numpy)

    def files(self, label: Any) -> list[str]:
        """Files this frame's label needs read (concurrently with the image)."""
        return []

    @abc.abstractmethod
    def decode(self, label: Any, data: dict[str, bytes], size: tuple[int, int], where: str) -> Any:
        """The label -> the target at the frame's resolution `size` = (w, h); DatasetError naming the file."""

    @abc.abstractmethod
    def transform(self, target: Any | None, geometry: Geometry) -> dict[str, np.ndarray]:
        """The row columns of this task (named ``<name>`` or ``<name>_<field>``); `target` None = the
        frame has no label for the task: the columns hold "nothing" in the same shapes."""

    def image_labels(self, target: Any) -> np.ndarray | None:
        """Which classes appear in the frame (0/1 per class), for image-level pretraining; None = not offered."""
        return None

    # ----------------------------------------------------------------- batch and model (torch)

    @abc.abstractmethod
    def collate(self, columns: dict[str, Any], good: list[int]) -> Any:
        """The good rows' columns -> batch["targets"][name] (torch)."""

    def select(self, target: Any, idx: "torch.Tensor") -> Any:
        """The batch targets of the frames `idx` (a long tensor; the frames that have the task)."""
        return target[idx.to(target.device)]

    @abc.abstractmethod
    def build_head(self, section: Any, channels: int, num_levels: int, extra_channels: int) -> "nn.Module":
        """The head on the shared pyramid: ``head.losses(HeadInput, target)`` -> {name: loss, name_*: parts}
        in training, ``head(HeadInput)`` -> the task's outputs in eval. `extra_channels`: the LV-Adapter's
        score-map channels the head takes as extra input (0 without). A head whose class says
        ``compilable = True`` (static shapes) is torch.compiled with the dense part."""

    def pyramid_extra(self, section: Any, channels: int) -> "nn.Module | None":
        """An extra block for the FPN (coarser levels this task's head reads), or None."""
        return None

    def alignment_loss(self, score_map: "torch.Tensor", target: Any) -> "torch.Tensor | None":
        """LV-Adapter: the loss supervising this task's pixel-text score map [B, K, h, w] with its
        targets (already the frames that have the task), or None when the task has no such signal."""
        return None

    # ----------------------------------------------------------------- evaluate

    @abc.abstractmethod
    def evaluator(self, section: Any) -> "TaskEvaluator":
        """A fresh accumulator of this task's evaluation on one worker."""

    @abc.abstractmethod
    def merge(self, states: list[Any]) -> Any:
        """Merge several workers' evaluator states."""

    @abc.abstractmethod
    def compute(self, state: Any) -> dict[str, float]:
        """Flat metrics ``<name>/...`` in percent (undefined values left out, never NaN)."""

    # ----------------------------------------------------------------- predict, write, draw, export

    @abc.abstractmethod
    def postprocess(self, output: Any, scale: float, frame_hw: tuple[int, int], score_thr: float) -> Any:
        """One image's model output -> the prediction at the frame's resolution (numpy)."""

    @abc.abstractmethod
    def frame_files(self, stem: str, prediction: Any) -> dict[str, bytes]:
        """Per-frame output files in the official format: {path relative to the output folder: bytes}."""

    def frame_record(self, name: str, prediction: Any) -> Any:
        """A per-frame entry of an output file that holds every frame (final_files), or None."""
        return None

    def final_files(self, records: list[Any]) -> dict[str, bytes]:
        """Output files that hold every frame, from the frame records: {relative path: bytes}."""
        return {}

    @abc.abstractmethod
    def draw(self, image: np.ndarray, prediction: Any) -> np.ndarray:
        """The prediction painted over an RGB frame."""

    @abc.abstractmethod
    def export_outputs(self, outputs: Any, frame: "FrameMap") -> "dict[str, torch.Tensor]":
        """The deployable model's outputs for this task (one frame), mapped to the frame's pixels."""

    export_kinds: ClassVar[dict[str, str]] = {}  # output name -> "boxes" | "scores" | "labels" | "logits"

    # ----------------------------------------------------------------- score and check

    @abc.abstractmethod
    def add_score_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The arguments of ``paf-ray score <name>`` (ground truth and predictions)."""

    @abc.abstractmethod
    def score(self, args: argparse.Namespace) -> dict:
        """Score files in the official format; MetricsInputError naming the file on bad input."""

    @abc.abstractmethod
    def score_table(self, result: dict) -> str:
        """The table ``paf-ray score`` prints."""

    def score_json(self, result: dict) -> dict:
        return result

    @abc.abstractmethod
    def check_labels(self, root: str, split: str, image_sizes: dict[str, tuple[int, int] | None],
                     report: "CheckSink") -> None:
        """``paf-ray data check``: decode every label of the split, report problems and counts."""


class TaskEvaluator(abc.ABC):
    """One worker's accumulator: ``update`` per batch, a picklable ``state()`` to gather."""

    @abc.abstractmethod
    def update(self, output: Any, batch: dict) -> None:
        """This task's outputs for a batch, and the batch (its targets, has-flags, names, scales)."""

    @abc.abstractmethod
    def state(self) -> Any:
        """What merge/compute need, picklable and small."""


class CheckSink(abc.ABC):
    """Where a task's label check writes: problems and per-task counts."""

    @abc.abstractmethod
    def error(self, file: str, problem: str) -> None: ...

    @abc.abstractmethod
    def warning(self, file: str, problem: str) -> None: ...

    @abc.abstractmethod
    def labelled(self, stem: str) -> None:
        """The frame `stem` has a readable label of this task."""

    @abc.abstractmethod
    def count(self, what: str, n: int = 1) -> None:
        """Add to a named count of this task in this split (e.g. "boxes/car")."""


@dataclass(frozen=True)
class FrameMap:
    """How the deployable model's network input maps back to the frame: network pixels per frame
    pixel (`scale`), the content size in the input (the rest is padding) and the frame size."""

    scale: float
    content_hw: tuple[int, int]
    frame_hw: tuple[int, int]


class MetricsInputError(ValueError):
    """Input to a metric is malformed (unknown category, missing field, shape mismatch...)."""
