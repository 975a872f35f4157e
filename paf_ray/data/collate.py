"""Rows -> the training batch (contracts.Batch): the common fields here, each task's own by its
``Task.collate``. No Ray: Ray Data's collate (``pipeline.BatchCollate``) and the benchmark's step
cases, which run where Ray is not installed, both call ``collate_rows``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from paf_ray.data.contracts import Batch, has_column

log = logging.getLogger(__name__)


def collate_rows(columns: dict[str, Any], tasks) -> Batch:
    """Columns of rows (Ray Data's numpy batch, or ``stack_rows``) -> the batch; rows with an
    error (bad samples kept under on_bad_sample: skip) are dropped and counted."""
    import torch

    errors = columns["error"]
    good = [i for i, e in enumerate(errors) if not e]
    for i, e in enumerate(errors):
        if e:
            log.warning("skipped bad sample %s: %s", columns["name"][i], e)
    skipped = len(errors) - len(good)
    if not good:  # every row of this batch was bad
        return empty_batch(skipped, tasks)
    images = columns["image"]
    if skipped or images.dtype == object:
        images = np.stack([np.asarray(images[i]) for i in good])

    def flags(key):
        return torch.from_numpy(np.asarray([bool(columns[key][i]) for i in good]))

    return Batch(
        image=torch.from_numpy(images if images.flags.writeable else images.copy()).permute(0, 3, 1, 2),
        name=[str(columns["name"][i]) for i in good],
        scale=torch.from_numpy(np.asarray([columns["scale"][i] for i in good], np.float32)),
        orig_size=torch.from_numpy(np.stack([np.asarray(columns["orig_size"][i], np.int64) for i in good])),
        has={t.name: flags(has_column(t.name)) for t in tasks},
        targets={t.name: t.collate(columns, good) for t in tasks},
        skipped=skipped,
    )


def empty_batch(skipped: int, tasks) -> Batch:
    """The batch of a collate whose every row was bad: zero frames."""
    import torch

    none = torch.zeros(0, dtype=torch.bool)
    return Batch(image=torch.zeros((0, 3, 1, 1), dtype=torch.uint8), name=[], scale=torch.zeros(0),
                 orig_size=torch.zeros((0, 2), dtype=torch.int64), has={t.name: none.clone() for t in tasks},
                 targets={t.name: None for t in tasks}, skipped=skipped)


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> columns as Ray Data batches them: one array per key, stacked where the rows' values
    have one shape, an object array (one entry per row) where they do not (boxes)."""
    columns = {}
    for key in rows[0]:
        values = [np.asarray(r[key]) for r in rows]
        if all(v.shape == values[0].shape for v in values) and values[0].dtype != object:
            columns[key] = np.stack(values)
        else:
            columns[key] = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                columns[key][i] = v
    return columns


def to_device(obj, device):
    """Every tensor in `obj` (a tensor, or dicts and lists of them) on `device`; other values as they are."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def batch_to_device(batch: dict, device) -> dict:
    """Move every tensor of a batch (also those in its targets) to `device`."""
    import torch

    return batch if torch.device(device).type == "cpu" else to_device(batch, torch.device(device))
