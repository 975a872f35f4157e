"""The three shapes data takes on its way to the model, typed in one place.

    index ──▶ Record ──decode──▶ Sample ──joint transforms──▶ Row ──collate──▶ Batch ──▶ model

Boxes are x1y1x2y2. In a Record and a Sample they are in pixels of the original frame; in a Row and
a Batch in pixels of the network input (``Row.scale`` = input pixels per original pixel). ``labels``
index ``DET_CLASSES``; ignore regions (``other person``, ``other vehicle``, ``trailer``, crowd boxes)
are kept apart with the class they hide. A mask value of 255 (``IGNORE_INDEX``) means "not labelled".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, TypedDict

import numpy as np

from paf_ray.data.bdd100k import IGNORE_INDEX

if TYPE_CHECKING:  # no torch at import: the processes that decode rows never need it
    import torch


class Record(TypedDict):
    """One line of the dataset index (JSON): where a frame's files are and its box labels."""

    name: str  # "<stem>.jpg"
    image: str  # path or URI of the JPEG
    image_set: str  # "100k" (det, drivable) or "10k" (sem)
    split: str
    has_det: bool  # the frame has an entry in the det labels (an entry with no boxes is an empty frame)
    boxes: list[list[float]]
    labels: list[int]
    ignore_boxes: list[list[float]]
    ignore_labels: list[int]
    sem: Optional[str]  # path or URI of the semantic mask, None if the frame has none
    drv: Optional[str]  # path or URI of the drivable mask
    attributes: dict[str, Any]  # weather, scene, timeofday


class Sample(TypedDict):
    """A decoded Record, at the original resolution (``decode.load_sample``)."""

    image: np.ndarray  # uint8 (h0, w0, 3) RGB
    boxes: np.ndarray  # float32 (k, 4)
    labels: np.ndarray  # int64 (k,)
    ignore_boxes: np.ndarray  # float32 (m, 4)
    ignore_labels: np.ndarray  # int64 (m,)
    has_det: bool
    sem: Optional[np.ndarray]  # uint8 (h0, w0) or None
    drv: Optional[np.ndarray]


class Row(TypedDict):
    """A training/eval row as Ray Data carries it (``transforms.transform_sample`` + ``pipeline.load_row``)."""

    image: np.ndarray  # uint8 (H, W, 3), H x W = data.input_size, content top-left, zero pad
    boxes: np.ndarray  # float32 (k, 4) network-input pixels
    labels: np.ndarray  # int64 (k,)
    ignore_boxes: np.ndarray  # float32 (m, 4)
    ignore_labels: np.ndarray  # int64 (m,)
    sem: np.ndarray  # uint8 (H, W), 255 where absent or padding
    drv: np.ndarray  # uint8 (H, W)
    has_det: bool
    has_sem: bool
    has_drv: bool
    name: str
    scale: np.float32  # network-input pixels per original pixel
    orig_size: np.ndarray  # int64 (2,) = original (height, width)
    error: str  # "" for a good row; the problem for a bad sample kept under on_bad_sample: skip


class Batch(TypedDict):
    """What the model and the evaluator take (``pipeline.BatchCollate``)."""

    image: torch.Tensor  # uint8 [B, 3, H, W]
    boxes: list[torch.Tensor]  # B x float32 [k, 4]
    labels: list[torch.Tensor]  # B x int64 [k]
    ignore_boxes: list[torch.Tensor]
    ignore_labels: list[torch.Tensor]
    sem: torch.Tensor  # uint8 [B, H, W], 255 = ignore (the model takes int64 on its device)
    drv: torch.Tensor
    has_det: torch.Tensor  # bool [B]
    has_sem: torch.Tensor
    has_drv: torch.Tensor
    name: list[str]
    scale: torch.Tensor  # float32 [B]
    orig_size: torch.Tensor  # int64 [B, 2]
    skipped: int  # bad rows dropped from this batch (counted into the run summary)


def placeholder_row(name: str, error: str) -> Row:
    """A bad sample kept under on_bad_sample=skip: tiny arrays and the reason; the collate drops it."""
    return Row(
        image=np.zeros((1, 1, 3), np.uint8),
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros((0,), np.int64),
        ignore_boxes=np.zeros((0, 4), np.float32),
        ignore_labels=np.zeros((0,), np.int64),
        sem=np.full((1, 1), IGNORE_INDEX, np.uint8),
        drv=np.full((1, 1), IGNORE_INDEX, np.uint8),
        has_det=False, has_sem=False, has_drv=False,
        name=name,
        scale=np.float32(0.0),
        orig_size=np.zeros((2,), np.int64),
        error=error,
    )


def empty_batch(skipped: int) -> Batch:
    """The batch of a collate whose every row was bad."""
    import torch

    no_flags = torch.zeros(0, dtype=torch.bool)
    return Batch(
        image=torch.zeros((0, 3, 1, 1), dtype=torch.uint8), boxes=[], labels=[], ignore_boxes=[], ignore_labels=[],
        sem=torch.zeros((0, 1, 1), dtype=torch.uint8), drv=torch.zeros((0, 1, 1), dtype=torch.uint8),
        has_det=no_flags, has_sem=no_flags.clone(), has_drv=no_flags.clone(),
        name=[], scale=torch.zeros(0), orig_size=torch.zeros((0, 2), dtype=torch.int64), skipped=skipped,
    )
