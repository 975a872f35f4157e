"""Input pipeline: Ray Data vs a plain torch DataLoader over the same row function and collate.

Both sides run the pipeline's own per-record function (``pipeline.load_row``: read the 1280x720
JPEG and its masks, decode, train transform to the training size) at the same CPU priority
(``data.decode_priority``), its own collate (``pipeline.BatchCollate``), with the same number of
CPUs: Ray Data's map capped at N CPUs (``data.cpus = N``) vs ``DataLoader(num_workers=N)``.

- **pipeline passes**: one epoch over the frames, consumed as fast as it comes. Ray Data builds
  and starts a new execution every pass (what a stage start costs); the DataLoader keeps its
  workers (``persistent_workers=True``, its best case). Per pass: time to first batch, and
  steady-state rows/s = the rows after the pass's first fifth / the time they took (ratios:
  the median of each repeat's Ray Data / DataLoader, its two passes back to back). Time to first batch
  is compared like for like: a new Ray Data execution against a new DataLoader (its workers
  start); against the persistent DataLoader's epoch start it is reported too.
- **consumer stages**: what a training loop sees over a stage of several epochs, each batch
  followed by fixed work (``FixedWork``, the same arithmetic every batch, on one torch thread).
  The Ray Data side reads the stage's stream (``build_dataset(epochs=E)``) through one
  ``streaming_split`` (a ``SplitCoordinator`` actor), as a Train worker's ``get_dataset_shard``
  does for a stage; the DataLoader side runs the same E epochs on its persistent workers.
  Rows/s over the stage's epochs after the first (its steady state, epoch boundaries included),
  and over the whole stage from its start.
- **stream** (``measure_stream``): the stage's stream of two epochs (``build_dataset(epochs=2)``)
  under the consumer: the first 10 steps of each epoch against the median step; and the
  consumer's rows/s with an object store that holds a quarter of an epoch vs the whole epoch.

Passes alternate between the two sides, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

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
    """torch Dataset over index records, each loaded with the Ray Data map's own row function."""

    def __init__(self, records: list[dict], data_cfg, train: bool):
        self.records, self.data_cfg, self.train = records, data_cfg, train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from paf_ray.data.pipeline import load_row, run_at_idle_priority

        if self.data_cfg.decode_priority == "idle":
            return run_at_idle_priority(load_row, self.records[i], self.data_cfg, self.train)
        return load_row(self.records[i], self.data_cfg, self.train)


def collate_rows(rows: list[dict]) -> dict:
    from paf_ray.data.pipeline import BatchCollate

    return BatchCollate()(rows_to_columns(rows))


def batch_from_records(records: list[dict], data_cfg, batch_size: int) -> dict:
    """One deterministic training batch (val transform) from the first `batch_size` records."""
    if len(records) < batch_size:
        raise ValueError(f"bench: {len(records)} records, fewer than the batch of {batch_size}")
    ds = RecordDataset(records[:batch_size], data_cfg, train=False)
    return collate_rows([ds[i] for i in range(batch_size)])


# --------------------------------------------------------------------------- consumers


class FixedWork:
    """The consumer's step: the same float32 matrix products every call, on one torch thread."""

    def __init__(self, products: int, n: int = 384):
        import torch

        self.products = products
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g)

    def __call__(self) -> None:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            x = self.a
            for _ in range(self.products):
                x = torch.tanh(x @ self.a)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def lasting(cls, seconds: float) -> FixedWork:
        """Work that takes about `seconds` now (calibrated once; then fixed for every pass)."""
        probe = cls(4)
        probe()
        t0 = time.perf_counter()
        probe()
        per_product = (time.perf_counter() - t0) / 4
        return cls(max(1, round(seconds / per_product)))


STEADY_SKIP = 0.2  # the part of a pass before its steady state: the start and the rows made before the first batch


def timed_pass(batches, work: FixedWork | None = None) -> dict:
    """Consume one pass; {"rows", "first_s" (time to first batch), "total_s", "step_s" (per batch,
    the wait for it included), "wait_s" (per batch, the wait alone), "rows_s" (rows / total_s),
    "after_first_rows_s" (the rows after the first batch / the time after it), "steady_rows_s"}.

    ``steady_rows_s`` counts the batches after the pass's first STEADY_SKIP, over the time they
    took: rows decoded before the first batch arrived (up to a block per decode task on Ray
    Data's side, a batch per worker on the DataLoader's) are handed on at once after it, and
    would count as made in no time."""
    t0 = time.perf_counter()
    rows, first, step_s, wait_s, batch_rows, t_prev = 0, None, [], [], [], t0
    for batch in batches:
        n = int(batch["image"].shape[0])
        now = time.perf_counter()
        wait_s.append(now - t_prev)
        if first is None:
            first = now - t0
        rows += n
        if work is not None:
            work()
        now = time.perf_counter()
        step_s.append(now - t_prev)
        batch_rows.append(n)
        t_prev = now
    total = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("bench data: a pass yielded no batch")
    after = total - first
    skip = max(1, round(STEADY_SKIP * len(step_s)))
    steady_s = sum(step_s[skip:])
    return {"rows": rows, "first_s": first, "total_s": total, "step_s": step_s, "wait_s": wait_s,
            "rows_s": rows / total,
            "after_first_rows_s": (rows - batch_rows[0]) / after if after > 0 else float("nan"),
            "steady_rows_s": sum(batch_rows[skip:]) / steady_s if steady_s > 0 else float("nan")}


def ray_data_batches(records: list[dict], data_cfg, split: bool, epochs: int = 1):
    """One pass (or `epochs` of the stage stream) of Ray Data batches, whole batches only (as
    run.make_datasets cuts a stage's epochs); through a SplitCoordinator actor when `split`, as
    Ray Train's `get_dataset_shard` reads."""
    from paf_ray.data.pipeline import build_dataset, iter_train_batches

    rows = len(records) // data_cfg.batch_size * data_cfg.batch_size
    ds = build_dataset(records, data_cfg, train=True, epochs=epochs, rows_per_epoch=rows)
    source = ds.streaming_split(1, equal=True)[0] if split else ds
    return iter_train_batches(source, data_cfg.batch_size)


def make_dataloader(records: list[dict], data_cfg, workers: int, pin_memory: bool):
    import torch

    return torch.utils.data.DataLoader(
        RecordDataset(records, data_cfg, train=True),
        batch_size=data_cfg.batch_size,
        shuffle=True,
        drop_last=True,  # whole batches only, as Ray Data's side (and run.make_datasets) cut them
        num_workers=workers,
        collate_fn=collate_rows,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # not fork: this process runs Ray's threads
        multiprocessing_context="forkserver" if workers > 0 else None,
    )


def dataloader_epochs(loader, epochs: int):
    """The DataLoader's batches over `epochs` epochs: a training loop's ``for epoch: for batch``."""
    for _ in range(epochs):
        yield from loader


def later_epochs_rows_s(p: dict, batches_per_epoch: int, batch_size: int) -> float:
    """Rows/s of a timed stage over its epochs after the first (whole batches: every batch has
    `batch_size` rows)."""
    later = p["step_s"][batches_per_epoch:]
    return len(later) * batch_size / sum(later) if later else float("nan")


def _median(passes: list[dict], key: str) -> float:
    return statistics.median(p[key] for p in passes)


def _paired_ratio(passes: dict[str, list], key: str) -> float:
    return statistics.median(r[key] / d[key] for r, d in zip(passes["ray_data"], passes["dataloader"]))


def measure_input_pipeline(records: list[dict], data_cfg, workers: int, warmup: int, repeats: int,
                           step_s: float, consumer_epochs: int, pin_memory: bool = False) -> dict:
    """Pipeline passes and consumer stages of `consumer_epochs` epochs, alternating between Ray
    Data and the DataLoader."""
    data_cfg = replace(data_cfg, cpus=float(workers))
    loader = make_dataloader(records, data_cfg, workers, pin_memory)
    work = FixedWork.lasting(step_s)
    batches_per_epoch = len(records) // data_cfg.batch_size
    passes = {"ray_data": lambda: ray_data_batches(records, data_cfg, split=False),
              "dataloader": lambda loader=loader: iter(loader)}
    stages = {"ray_data": lambda: ray_data_batches(records, data_cfg, split=True, epochs=consumer_epochs),
              "dataloader": lambda loader=loader: dataloader_epochs(loader, consumer_epochs)}
    for _ in range(warmup):
        for make in passes.values():
            timed_pass(make())
    plain: dict[str, list] = {k: [] for k in passes}
    consumer: dict[str, list] = {k: [] for k in passes}
    fresh_first_s = []  # a new DataLoader (its workers start): a stage start, like a new Ray Data execution
    for _ in range(repeats):
        for name, make in passes.items():
            plain[name].append(timed_pass(make()))
        fresh = iter(make_dataloader(records, data_cfg, workers, pin_memory))
        t0 = time.perf_counter()
        next(fresh)
        fresh_first_s.append(time.perf_counter() - t0)
        del fresh
        for name, make in stages.items():
            stage = timed_pass(make(), work)
            stage["later_epochs_rows_s"] = later_epochs_rows_s(stage, batches_per_epoch, data_cfg.batch_size)
            consumer[name].append(stage)
    names = list(passes)
    del passes, stages, loader  # stops the DataLoader's persistent workers
    out: dict = {}
    for name in names:
        out[f"{name}_first_batch_s"] = _median(plain[name], "first_s")
        out[f"{name}_rows_s"] = _median(plain[name], "steady_rows_s")
        out[f"{name}_consumer_rows_s"] = _median(consumer[name], "later_epochs_rows_s")
        out[f"{name}_consumer_stage_rows_s"] = _median(consumer[name], "rows_s")
        out[f"{name}_passes"] = [{k: v for k, v in p.items() if k not in ("step_s", "wait_s")}
                                 for p in plain[name] + consumer[name]]
    out["dataloader_new_first_batch_s"] = statistics.median(fresh_first_s)
    out.update({
        # medians of each repeat's ratio: the two passes of a repeat run back to back, so a drift
        # of the machine's speed over the run (up to 20% here) cancels
        "steady_ratio": _paired_ratio(plain, "steady_rows_s"),
        # both start a pipeline: a new Ray Data execution vs a new DataLoader (its workers start)
        "first_batch_ratio": out["ray_data_first_batch_s"] / out["dataloader_new_first_batch_s"],
        # vs the DataLoader's epoch start with persistent workers (the stage stream has no epoch start)
        "first_batch_vs_persistent": out["ray_data_first_batch_s"] / out["dataloader_first_batch_s"],
        # the stage's epochs after its first: the steady state a training loop sees, epoch boundaries included
        "consumer_ratio": _paired_ratio(consumer, "later_epochs_rows_s"),
        # the whole stage from its start: Ray Data's stream (and its coordinator) start against the
        # persistent DataLoader's first epoch start (its workers started before)
        "consumer_stage_ratio": _paired_ratio(consumer, "rows_s"),
        "consumer_epochs": consumer_epochs,
        "consumer_step_s": step_s,
        "consumer_products": work.products,
        "workers": workers,
        "images_per_pass": len(records),
        "batch": data_cfg.batch_size,
        "input_size": list(data_cfg.input_size),
        "decode_priority": data_cfg.decode_priority,
    })
    return out


# --------------------------------------------------------------------------- the stage stream


def epoch_steps(step_s: list[float], steps_per_epoch: int) -> dict:
    """Per epoch of a stream: mean of its first 10 steps / the median step of the whole stream."""
    from paf_ray.train.loop import EPOCH_START_STEPS

    median = statistics.median(step_s)
    ratios = []
    for e in range(len(step_s) // steps_per_epoch):
        first = step_s[e * steps_per_epoch:e * steps_per_epoch + EPOCH_START_STEPS]
        ratios.append(statistics.fmean(first) / median)
    return {"median_step_s": median, "epoch_start_ratios": ratios}


def cpu_at_epochs(batches, steps_per_epoch: int, snapshots: list):
    """`batches` unchanged; a CPU snapshot of every process (``step_case.cpu_by_process``) as the
    first batch of each epoch arrives, and one at the end."""
    from paf_ray.bench.step_case import cpu_by_process

    for k, batch in enumerate(batches):
        if k % steps_per_epoch == 0:
            snapshots.append(cpu_by_process())
        yield batch
    snapshots.append(cpu_by_process())


def stream_pass(records: list[dict], data_cfg, work: FixedWork, epochs: int) -> dict:
    """One stage stream of `epochs` epochs; besides timed_pass's keys (``step_s`` and ``wait_s``
    dropped), per epoch: its start ratio, its rows/s (``epoch_rows_s``: the epoch's rows / the
    time its steps took), the consumer's wait for data (``epoch_wait_ms``, ms a step) and the CPU
    of the consumer and of every other process (``epoch_cpu_ms``, CPU-ms a step: where the
    epoch's rows were decoded)."""
    import os

    from paf_ray.bench.step_case import cpu_ms_per_step

    per_epoch = len(records) // data_cfg.batch_size
    snapshots: list = []
    p = timed_pass(cpu_at_epochs(ray_data_batches(records, data_cfg, split=True, epochs=epochs), per_epoch,
                                 snapshots), work)
    p.update(epoch_steps(p["step_s"], per_epoch))
    epoch = [slice(e * per_epoch, (e + 1) * per_epoch) for e in range(epochs)]
    p["epoch_rows_s"] = [per_epoch * data_cfg.batch_size / sum(p["step_s"][e]) for e in epoch]
    p["epoch_wait_ms"] = [1000 * statistics.fmean(p["wait_s"][e]) for e in epoch]
    p["epoch_cpu_ms"] = []
    for before, after in zip(snapshots, snapshots[1:]):
        used = cpu_ms_per_step(before, after, os.getpid(), per_epoch)
        consumer = used.pop("self", 0.0)
        p["epoch_cpu_ms"].append({"consumer": consumer, "others": sum(used.values())})
    p["steps_per_epoch"] = per_epoch
    del p["step_s"], p["wait_s"]
    return p


def measure_stream(records: list[dict], data_cfg, workers: int, step_s: float, object_store_mb: dict) -> dict:
    """The stage stream under a training-bound consumer, each setting on a fresh local Ray.

    `object_store_mb`: {"whole": MB that hold an epoch's rows, "quarter": MB for a quarter}.
    Runs, 2 epochs each: whole store (epoch starts, throughput); quarter store, with and without
    the executor fixes (``ray_setup.EXECUTOR_FIXES``). Stores are compared on the stage's rows/s
    after its first batch: both runs decode the stage's rows in it (the whole store, with its bigger
    blocks, a few more before its first batch). Epoch 2 alone would credit the
    whole store with rows it decoded ahead during epoch 1 (while the consumer of epoch 1 shared
    the CPUs with it); its ratio is reported beside it."""
    import os

    import ray

    from paf_ray.train.ray_setup import EXECUTOR_FIX_ENV, init_ray

    data_cfg = replace(data_cfg, cpus=float(workers))
    work = FixedWork.lasting(step_s)
    runs = {}
    for name, store, fixed in (("whole", "whole", True), ("quarter", "quarter", True),
                               ("quarter_unfixed", "quarter", False)):
        ray.shutdown()
        init_ray(num_cpus=workers + 1, object_store_mb=object_store_mb[store])
        os.environ[EXECUTOR_FIX_ENV] = "1" if fixed else "0"
        try:
            runs[name] = stream_pass(records, data_cfg, work, epochs=2)
        finally:
            del os.environ[EXECUTOR_FIX_ENV]
    ray.shutdown()
    whole, quarter = runs["whole"], runs["quarter"]
    return {
        "epoch_start_ratio": max(whole["epoch_start_ratios"][1:]),
        "first_epoch_start_ratio": whole["epoch_start_ratios"][0],
        # the stage after its first batch (both epochs): both runs decode the stage's rows in it
        "whole_store_rows_s": whole["after_first_rows_s"],
        "quarter_store_rows_s": quarter["after_first_rows_s"],
        "quarter_store_unfixed_rows_s": runs["quarter_unfixed"]["after_first_rows_s"],
        "backpressure_ratio": quarter["after_first_rows_s"] / whole["after_first_rows_s"],
        "backpressure_ratio_unfixed": runs["quarter_unfixed"]["after_first_rows_s"] / whole["after_first_rows_s"],
        "backpressure_ratio_epoch2": quarter["epoch_rows_s"][1] / whole["epoch_rows_s"][1],
        "object_store_mb": object_store_mb,
        "runs": runs,
        "consumer_step_s": step_s,
        "consumer_products": work.products,
        "workers": workers,
        "images_per_epoch": len(records),
        "batch": data_cfg.batch_size,
        "input_size": list(data_cfg.input_size),
    }
