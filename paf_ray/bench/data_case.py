"""Input pipeline: Ray Data vs a plain torch DataLoader over the same decode + transform code.

Both sides run the pipeline's own per-record function (``pipeline.LoadRow``: decode the
1280x720 JPEG and its masks, train transform to the training size) and its own collate
(``pipeline.BatchCollate``) with the same number of CPU workers: Ray Data's map capped at
N CPUs (``data.cpus = N``) vs ``DataLoader(num_workers=N)``. A pass is one epoch over the
frames, from the first request to the last batch in the consumer, start-up included
(Ray Data plans and starts its executor every epoch; the DataLoader keeps its workers,
``persistent_workers=True``, as a tuned loop would). Timed passes alternate between the two.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import numpy as np


def rows_to_columns(rows: list[dict]) -> dict:
    """A list of rows -> the numpy batch Ray Data hands a collate: equal-shape arrays stacked,
    everything else (ragged boxes, strings) as object arrays."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray) and values[0].dtype != object and all(
            isinstance(v, np.ndarray) and v.shape == values[0].shape for v in values
        ):
            out[key] = np.stack(values)
        else:
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[key] = col
    return out


class RecordDataset:
    """torch Dataset over index records, loading each with the Ray Data map's own function."""

    def __init__(self, records: list[dict], data_cfg, train: bool):
        from paf_ray.data.pipeline import LoadRow

        self.items = [{"record": json.dumps(r)} for r in records]
        self.load_row = LoadRow(data_cfg, train)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.load_row(self.items[i])


def collate_rows(rows: list[dict]) -> dict:
    from paf_ray.data.pipeline import BatchCollate

    return BatchCollate()(rows_to_columns(rows))


def batch_from_records(records: list[dict], data_cfg, batch_size: int) -> dict:
    """One deterministic training batch (val transform) from the first `batch_size` records."""
    if len(records) < batch_size:
        raise ValueError(f"bench: {len(records)} records, fewer than the batch of {batch_size}")
    ds = RecordDataset(records[:batch_size], data_cfg, train=False)
    return collate_rows([ds[i] for i in range(batch_size)])


def _rate(run_pass) -> float:
    """Images/s of one pass; `run_pass()` consumes one epoch and returns its image count."""
    t0 = time.perf_counter()
    n = run_pass()
    return n / (time.perf_counter() - t0)


def ray_data_pass(records: list[dict], data_cfg):
    from paf_ray.data.pipeline import build_dataset, iter_train_batches

    ds = build_dataset(records, data_cfg, train=True)

    def run_pass() -> int:
        return sum(int(b["image"].shape[0]) for b in iter_train_batches(ds, data_cfg.batch_size, device="cpu"))

    return run_pass


def dataloader_pass(records: list[dict], data_cfg, workers: int, pin_memory: bool):
    import torch

    loader = torch.utils.data.DataLoader(
        RecordDataset(records, data_cfg, train=True),
        batch_size=data_cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_rows,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # not fork: this process runs Ray's threads
        multiprocessing_context="forkserver" if workers > 0 else None,
    )

    def run_pass() -> int:
        return sum(int(b["image"].shape[0]) for b in loader)

    return run_pass


def measure_input_pipeline(records: list[dict], data_cfg, workers: int, warmup: int, repeats: int,
                           pin_memory: bool = False) -> dict:
    """{"ray_data_img_s", "dataloader_img_s", "ratio", ...}; ratio = Ray Data / DataLoader."""
    data_cfg = replace(data_cfg, cpus=float(workers))
    dl_pass = dataloader_pass(records, data_cfg, workers, pin_memory)
    rd_pass = ray_data_pass(records, data_cfg)
    for _ in range(warmup):
        dl_pass()
        rd_pass()
    dl, rd = [], []
    for _ in range(repeats):  # alternating passes: a load change on a shared machine hits both alike
        dl.append(_rate(dl_pass))
        rd.append(_rate(rd_pass))
    del dl_pass  # stops the DataLoader's persistent workers
    ray_img_s, dl_img_s = statistics.median(rd), statistics.median(dl)
    return {
        "ray_data_img_s": ray_img_s,
        "dataloader_img_s": dl_img_s,
        "ratio": ray_img_s / dl_img_s,
        "ray_data_img_s_all": rd,
        "dataloader_img_s_all": dl,
        "workers": workers,
        "images_per_pass": len(records),
        "batch": data_cfg.batch_size,
        "input_size": list(data_cfg.input_size),
    }
