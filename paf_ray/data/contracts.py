"""The shapes data takes on its way to the model, typed in one place.

    index ──▶ Record ──decode──▶ Sample ──joint transforms──▶ Row ──collate──▶ Batch ──▶ model

Only the common fields are fixed here; each task adds its own (``paf_ray/tasks/base.py``):
a Record's ``labels[task]`` (JSON: a mask path, or boxes), a Sample's ``targets[task]`` (numpy at
the frame's resolution), a Row's task columns (``<task>`` or ``<task>_<field>``, numpy at the
network input), a Batch's ``targets[task]`` (torch). ``has_<task>`` in a row and ``has[task]`` in a
batch say which frames carry the task's labels: a task's loss and metrics count only those.
Boxes are x1y1x2y2; in a Record and a Sample in pixels of the original frame, in a Row and a Batch
in pixels of the network input (``scale`` = input pixels per original pixel). A mask value of 255
(``IGNORE_INDEX``) means "not labelled".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from paf_ray.data.bdd100k import IGNORE_INDEX  # noqa: F401  "no label" in every mask we read, carry or write

if TYPE_CHECKING:  # no torch at import: the processes that decode rows never need it
    import torch


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


class Record(TypedDict):
    """One entry of the dataset index (JSON): where a frame's files are and its tasks' labels."""

    name: str  # "<stem>.jpg"
    image: str  # path or URI of the JPEG
    image_set: str  # the frame set ("100k", "10k")
    split: str
    labels: dict[str, Any]  # task -> its label (only the tasks the frame has)
    attributes: dict[str, Any]  # weather, scene, timeofday where the labels say


class Sample(TypedDict):
    """A decoded Record, at the original resolution (``decode.load_sample``)."""

    image: np.ndarray  # uint8 (h0, w0, 3) RGB
    targets: dict[str, Any]  # task -> its decoded target (only the tasks the frame has)


# A Row is a flat dict of numpy values (what Ray Data carries):
ROW_FIELDS = {
    "image": "uint8 (H, W, 3), H x W = data.input_size, content top-left, zero pad",
    "name": "str",
    "scale": "float32: network-input pixels per original pixel",
    "orig_size": "int64 (2,): the original (height, width)",
    "error": "str: '' for a good row, else the problem of a bad sample kept under on_bad_sample: skip",
}
# plus, for every task t of the run: "has_<t>" (bool) and the task's own columns.


class Batch(TypedDict):
    """What the model and the evaluator take (``pipeline.BatchCollate``)."""

    image: "torch.Tensor"  # uint8 [B, 3, H, W]
    name: list[str]
    scale: "torch.Tensor"  # float32 [B]
    orig_size: "torch.Tensor"  # int64 [B, 2]
    has: "dict[str, torch.Tensor]"  # task -> bool [B]
    targets: dict[str, Any]  # task -> its batch of targets (task.collate)
    skipped: int  # bad rows dropped from this batch (counted into the run summary)


def has_column(task: str) -> str:
    return f"has_{task}"
