"""The input pipeline: Ray Data against a torch DataLoader on the same rows, collate, priority and CPUs.

Both run `pipeline.load_row` (a 1280x720 JPEG and its masks to a train row) at `data.decode_priority`
and collate with `collate.collate_rows`: Ray Data's map capped at N CPUs against
`DataLoader(num_workers=N, persistent_workers=True)`, alternating, so a change of the machine's load
hits both alike. Pipeline passes (one epoch, consumed as fast as it comes; a new Ray Data execution
each) and consumer stages (3 epochs through one `streaming_split`, as a Train worker reads a stage,
each batch followed by `FixedWork`); docs/benchmarks.md says what each number is.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np

CONSUMER_EPOCHS = 3
STEADY_SKIP = 0.2  # the part of a pass before its steady state


class RecordDataset:
    """torch Dataset over index records, each loaded with the Ray Data map's own row function."""

    def __init__(self, records: list[dict], data_cfg, tasks, train: bool):
        from paf_ray.data.pipeline import RowSettings

        self.records, self.settings, self.tasks, self.train = records, RowSettings.of(data_cfg), tasks, train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from paf_ray.data.pipeline import load_row, run_at_idle_priority

        row = (self.records[i], self.settings, self.tasks, self.train)
        return run_at_idle_priority(load_row, *row) if self.settings.decode_priority == "idle" else load_row(*row)


class CollateRows:
    """The DataLoader's collate: rows -> Ray Data's numpy columns -> the pipeline's batch."""

    def __init__(self, tasks):
        self.tasks = tasks

    def __call__(self, rows: list[dict]) -> dict:
        from paf_ray.data.collate import collate_rows, stack_rows

        return collate_rows(stack_rows(rows), self.tasks)


class FixedWork:
    """The consumer's step: the same float32 matrix products every call, on one torch thread."""

    def __init__(self, products: int, n: int = 384):
        import torch

        self.products = products
        self.a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))

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
        """Work that takes about `seconds` now (calibrated once, then the same for every pass)."""
        probe = cls(4)
        probe()
        t0 = time.perf_counter()
        probe()
        return cls(max(1, round(seconds / ((time.perf_counter() - t0) / 4))))


def timed_pass(batches, work: FixedWork | None = None) -> dict:
    """Consume `batches`, calling `work` after each: {"rows", "first_s" (time to first batch), "total_s",
    "step_s" and "wait_s" (per batch: the step and the wait for the batch), "rows_s", "steady_rows_s"
    (the batches after the first STEADY_SKIP of the pass / the time they took)}."""
    t0 = time.perf_counter()
    rows, first, step_s, wait_s, batch_rows, t_prev = 0, None, [], [], [], t0
    for batch in batches:
        arrived = time.perf_counter()
        wait_s.append(arrived - t_prev)
        first = arrived - t0 if first is None else first
        batch_rows.append(int(batch["image"].shape[0]))
        rows += batch_rows[-1]
        if work is not None:
            work()
        now = time.perf_counter()
        step_s.append(now - t_prev)
        t_prev = now
    total = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("bench data: a pass yielded no batch")
    skip = max(1, round(STEADY_SKIP * len(step_s)))
    steady_s = sum(step_s[skip:])
    return {"rows": rows, "first_s": first, "total_s": total, "step_s": step_s, "wait_s": wait_s,
            "rows_s": rows / total,
            "steady_rows_s": sum(batch_rows[skip:]) / steady_s if steady_s > 0 else float("nan")}


def ray_data_batches(records: list[dict], data_cfg, tasks, split: bool, epochs: int = 1):
    """A pass (or a stage stream of `epochs`) of Ray Data batches, whole batches only, as
    `train.run.make_datasets` cuts them; through a SplitCoordinator when `split`, as Ray Train reads."""
    from paf_ray.data.pipeline import build_dataset, iter_train_batches

    rows = len(records) // data_cfg.batch_size * data_cfg.batch_size
    ds = build_dataset(records, data_cfg, tasks, train=True, epochs=epochs, rows_per_epoch=rows)
    return iter_train_batches(ds.streaming_split(1, equal=True)[0] if split else ds, tasks, data_cfg.batch_size)


def make_dataloader(records: list[dict], data_cfg, tasks, workers: int, pin_memory: bool):
    import torch

    return torch.utils.data.DataLoader(
        RecordDataset(records, data_cfg, tasks, train=True), batch_size=data_cfg.batch_size, shuffle=True,
        drop_last=True,  # whole batches only, as Ray Data's side
        num_workers=workers, collate_fn=CollateRows(tasks), persistent_workers=workers > 0, pin_memory=pin_memory,
        multiprocessing_context="forkserver" if workers > 0 else None)  # not fork: this process runs Ray's threads


def _paired_ratio(passes: dict[str, list], key: str) -> float:
    """The median of each repeat's Ray Data / DataLoader: the two ran back to back, so a drift of the
    machine's speed over the run cancels."""
    return statistics.median(r[key] / d[key] for r, d in zip(passes["ray_data"], passes["dataloader"]))


def measure_input_pipeline(records: list[dict], data_cfg, tasks, workers: int, repeats: int, step_s: float,
                           pin_memory: bool = False) -> dict:
    """A warm-up pass of each side, then `repeats` rounds of: a pass of each side, a new DataLoader's
    first batch, a consumer stage of each side."""
    data_cfg = replace(data_cfg, cpus=float(workers))
    loader = make_dataloader(records, data_cfg, tasks, workers, pin_memory)
    work = FixedWork.lasting(step_s)
    per_epoch = len(records) // data_cfg.batch_size
    passes = {"ray_data": lambda: ray_data_batches(records, data_cfg, tasks, split=False), "dataloader": lambda: iter(loader)}
    stages = {"ray_data": lambda: ray_data_batches(records, data_cfg, tasks, split=True, epochs=CONSUMER_EPOCHS),
              "dataloader": lambda: (b for _ in range(CONSUMER_EPOCHS) for b in loader)}  # for epoch: for batch
    for make in passes.values():
        timed_pass(make())
    plain: dict[str, list] = {k: [] for k in passes}
    consumer: dict[str, list] = {k: [] for k in passes}
    new_loader_first_s = []
    for _ in range(repeats):
        for name, make in passes.items():
            plain[name].append(timed_pass(make()))
        fresh = iter(make_dataloader(records, data_cfg, tasks, workers, pin_memory))
        t0 = time.perf_counter()
        next(fresh)
        new_loader_first_s.append(time.perf_counter() - t0)
        del fresh
        for name, make in stages.items():
            stage = timed_pass(make(), work)
            later = stage["step_s"][per_epoch:]  # the epochs after the first, epoch boundaries included
            stage["later_epochs_rows_s"] = len(later) * data_cfg.batch_size / sum(later)
            consumer[name].append(stage)
    del passes, stages, loader  # stops the DataLoader's workers
    out: dict = {}
    for name in plain:
        out[f"{name}_first_batch_s"] = statistics.median(p["first_s"] for p in plain[name])
        out[f"{name}_rows_s"] = statistics.median(p["steady_rows_s"] for p in plain[name])
        out[f"{name}_consumer_rows_s"] = statistics.median(p["later_epochs_rows_s"] for p in consumer[name])
        out[f"{name}_consumer_stage_rows_s"] = statistics.median(p["rows_s"] for p in consumer[name])
        out[f"{name}_passes"] = [{k: v for k, v in p.items() if k not in ("step_s", "wait_s")}
                                 for p in plain[name] + consumer[name]]
    out["dataloader_new_first_batch_s"] = statistics.median(new_loader_first_s)
    out.update(
        first_batch_ratio=out["ray_data_first_batch_s"] / out["dataloader_new_first_batch_s"],
        first_batch_vs_persistent=out["ray_data_first_batch_s"] / out["dataloader_first_batch_s"],
        steady_ratio=_paired_ratio(plain, "steady_rows_s"),
        consumer_ratio=_paired_ratio(consumer, "later_epochs_rows_s"),
        consumer_stage_ratio=_paired_ratio(consumer, "rows_s"),
        consumer_epochs=CONSUMER_EPOCHS, consumer_step_s=step_s, consumer_products=work.products,
        workers=workers, images_per_pass=len(records), batch=data_cfg.batch_size,
        input_size=list(data_cfg.input_size), decode_priority=data_cfg.decode_priority)
    return out
