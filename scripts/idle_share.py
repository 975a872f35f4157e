"""A training step alone and beside an idle-priority decoder, with OpenMP's default waiting and with a
training worker's (`GOMP_SPINCOUNT=30000`): the share of the cores training leaves to decoding.

    python scripts/idle_share.py [--quick] [--root DIR]   # JSON on stdout

What it measured (docs/benchmarks.md, "OpenMP's waiting: GOMP_SPINCOUNT"): where cores are short the
pipeline decodes at idle CPU priority (`data.decode_priority: idle`), so it runs only where training
leaves a core idle. A 2-thread training step waits hundreds of times (OpenMP barriers); libgomp lets
a waiting thread spin 300,000 times before it sleeps, and a spinning thread holds its core. Each
variant is a fresh process (OpenMP reads its settings at load), in the order default, worker,
worker, default: the bench's `ray_overhead` finetune step (R18, FPN 64, 320x192, batch 2, 2 torch
threads) timed alone, then beside a process that decodes rows (`pipeline.load_row`, 1280x720 frames
to 640x384) on the pipeline's idle-priority thread as fast as it is let. The decoder's rows/s is the
share of the cores the training process leaves to decoding. Imports Ray (the pipeline's module) but
starts none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def default_tasks():
    """The tasks a config trains when it names none (the registry's objects)."""
    from paf_ray.config import from_dict
    from paf_ray.tasks import TASKS

    return TASKS.get_many(from_dict({}, rules=False).model.tasks)


def decode_until_stopped(records: list[dict], data_cfg, stop, rows) -> None:
    """The decoder process: the pipeline's row function on `records` in turn, each on the pipeline's
    idle-priority thread, until `stop` is set; `rows` counts the rows made."""
    from paf_ray.data.pipeline import RowSettings, load_row, run_at_idle_priority

    tasks, settings, i = default_tasks(), RowSettings.of(data_cfg), 0
    while not stop.is_set():
        run_at_idle_priority(load_row, records[i % len(records)], settings, tasks, True)
        i += 1
        with rows.get_lock():
            rows.value += 1


def measure(spec: dict) -> dict:
    """In the variant's process: the step timed alone, then beside the decoder (started first and
    timed from its first row on, so its start is not counted)."""
    import multiprocessing as mp

    import torch

    from paf_ray.bench.step_case import build_case, make_step
    from paf_ray.config import from_dict

    torch.set_num_threads(spec["threads"])
    model, stage, batch, device = build_case(spec["case"])
    _, step = make_step(model, stage, batch, device, amp=False, total_updates=2 + 2 * spec["repeats"])
    step()  # warm-up

    def timed() -> list[float]:
        return [1000 * (lambda t: t[1] - t[0])(step()) for _ in range(spec["repeats"])]

    alone = timed()
    data_cfg = from_dict({"data": spec["decoder_data"]}, rules=False).data
    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's torch threads
    stop, rows = ctx.Event(), ctx.Value("l", 0)
    decoder = ctx.Process(target=decode_until_stopped, args=(spec["records"], data_cfg, stop, rows), daemon=True)
    decoder.start()
    try:
        deadline = time.time() + 120
        while rows.value == 0:
            if not decoder.is_alive() or time.time() > deadline:
                raise RuntimeError(f"idle_share: the decoder made no row (exit code {decoder.exitcode})")
            time.sleep(0.05)
        rows_before, t0 = rows.value, time.perf_counter()
        beside = timed()
        rows_s = (rows.value - rows_before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        decoder.join(timeout=60)
        if decoder.is_alive():
            decoder.kill()
    return {"alone_ms": statistics.median(alone), "beside_ms": statistics.median(beside), "decoder_rows_s": rows_s,
            "openmp_wait": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny network, one round: a smoke run")
    p.add_argument("--root", default=None, help="where the synthetic 1280x720 frames go (default: a temp folder)")
    p.add_argument("--measure", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)  # a variant's process
    args = p.parse_args(argv)
    if args.measure:
        with open(args.measure[0], encoding="utf-8") as f:
            result = measure(json.load(f))
        with open(args.measure[1], "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    from paf_ray.bench.run import case_spec
    from paf_ray.bench.settings import bench_settings
    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import load_records
    from paf_ray.data.bdd100k.synth import write_synthetic
    from paf_ray.train.step import OPENMP_WAIT_VARS, TRAIN_PROCESS_ENV

    s, work = bench_settings("cpu", args.quick), tempfile.mkdtemp(prefix="idle_share_")
    root = write_synthetic(args.root or os.path.join(work, "synth"), images=24, seed=0, size=(1280, 720),
                           val_fraction=0.1)
    spec = {"case": case_spec(s, work, "finetune", "small"), "threads": s.threads,
            "repeats": 20 if args.quick else s.small_repeats,  # tiny steps: 20 give the decoder a few rows
            "decoder_data": {"input_size": [640, 384], "decode_priority": "idle"}}
    spec["records"] = load_records(from_dict({"data": spec["decoder_data"]}, rules=False).data, root, "train",
                                   default_tasks())[:16]
    variants = {"openmp_default": {}, "train_worker": dict(TRAIN_PROCESS_ENV)}
    order = ["openmp_default", "train_worker"] + ([] if args.quick else ["train_worker", "openmp_default"])
    runs: dict[str, list] = {name: [] for name in variants}
    with open(os.path.join(work, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    for i, name in enumerate(order):
        env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARS}
        env.update(variants[name], OMP_NUM_THREADS=str(s.threads))
        out = os.path.join(work, f"{i}_{name}.json")
        subprocess.run([sys.executable, __file__, "--measure", os.path.join(work, "spec.json"), out], env=env,
                       check=True, timeout=1200)
        with open(out, encoding="utf-8") as f:
            runs[name].append(json.load(f))
        print(f"[idle_share] {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    mean = {name: {k: statistics.fmean(r[k] for r in rs) for k in ("alone_ms", "beside_ms", "decoder_rows_s")}
            for name, rs in runs.items()}
    base, worker = mean["openmp_default"], mean["train_worker"]
    print(json.dumps({**mean, "decoder_share_ratio": worker["decoder_rows_s"] / base["decoder_rows_s"]
                      if base["decoder_rows_s"] else None,
                      "alone_ratio": worker["alone_ms"] / base["alone_ms"],
                      "beside_ratio": worker["beside_ms"] / base["beside_ms"], "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
