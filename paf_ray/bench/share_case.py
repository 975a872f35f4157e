"""Training beside idle-priority decoding: how much of the cores a training step leaves free.

On a machine without spare cores the pipeline decodes at idle CPU priority (``data.decode_priority``),
so it runs only where training leaves a core idle. A training step on two torch threads waits
hundreds of times (OpenMP barriers, one thread's tail of work); how a waiting thread waits decides
whether the core is idle: libgomp lets it spin 300,000 times first, and a spinning thread is
running. This case times the same step alone and then beside a process that decodes rows with the
pipeline's row function, at the pipeline's idle priority, as fast as it is let; the step's process
runs with OpenMP's default waiting or with a training worker's (``train.step.TRAIN_PROCESS_ENV``).
The decoder's rows/s is the share of the cores a training worker leaves to the input pipeline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time


def decode_until_stopped(records: list[dict], data_cfg, stop, rows) -> None:
    """The decoder process: the pipeline's row function on `records` in turn, each on the
    pipeline's idle-priority thread, until `stop` is set; `rows` counts the rows made."""
    from paf_ray.data.pipeline import load_row, run_at_idle_priority

    i = 0
    while not stop.is_set():
        run_at_idle_priority(load_row, records[i % len(records)], data_cfg, True)
        i += 1
        with rows.get_lock():
            rows.value += 1


def _timed(step, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    return times


def steps_beside_decoder(spec: dict) -> dict:
    """spec: a step case (``step_case.build_case``) plus "decoder_records" and "decoder_data" (the
    ``data`` section of a config). The step timed alone, then beside the decoder (started first and timed from its
    first row on, so its start-up is not counted)."""
    import torch

    from paf_ray.bench.step_case import _updates, build_case, make_step
    from paf_ray.train.step import OPENMP_WAIT_VARS

    torch.set_num_threads(int(spec["threads"]))
    _, model, stage, batch, device = build_case(spec)
    _, step = make_step(model, stage, batch, device, bool(spec["amp"]), _updates(spec))
    for _ in range(int(spec["warmup"])):
        step()
    repeats = int(spec["repeats"])
    alone = _timed(step, repeats)

    from paf_ray.config import from_dict

    data_cfg = from_dict({"data": spec["decoder_data"]}, "<bench idle_share>", rules=False).data
    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's torch threads
    stop, rows = ctx.Event(), ctx.Value("l", 0)
    decoder = ctx.Process(target=decode_until_stopped, args=(spec["decoder_records"], data_cfg, stop, rows),
                          daemon=True)
    decoder.start()
    try:
        deadline = time.time() + 120
        while rows.value == 0:
            if not decoder.is_alive() or time.time() > deadline:
                raise RuntimeError(f"bench idle_share: the decoder made no row (exit code {decoder.exitcode})")
            time.sleep(0.05)
        rows_before, t0 = rows.value, time.perf_counter()
        beside = _timed(step, repeats)
        rows_s = (rows.value - rows_before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        decoder.join(timeout=60)
        if decoder.is_alive():
            decoder.kill()
    return {"alone_ms": statistics.median(alone), "beside_ms": statistics.median(beside), "decoder_rows_s": rows_s,
            "alone_ms_all": alone, "beside_ms_all": beside, "threads": torch.get_num_threads(),
            "openmp_wait": {name: os.environ.get(name) for name in OPENMP_WAIT_VARS}}
