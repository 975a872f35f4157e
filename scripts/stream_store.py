"""The stage stream under a training-bound consumer: epoch starts, and an object store of a quarter
epoch against one that holds the whole epoch, with and without Ray Data's executor fixes.

    python scripts/stream_store.py [--frames 256] [--size 640x384] [--batch 4] [--cpus 2] [--step-s 0.3]
                                   [--root DIR]    # JSON on stdout; --quick: 16 tiny frames, a smoke run

What it measured (docs/benchmarks.md, "One stream per stage, and the object store"): the stream a
stage trains from (`pipeline.build_dataset(epochs=2)`, every epoch in one execution), read through
`streaming_split` by a consumer whose fixed work per batch (`bench.data_case.FixedWork`, ~0.3 s)
outlasts a batch's decoding, so decoded rows pile up against the object store. Each setting runs
on a fresh local Ray with `--cpus` + 1 CPUs:

- whole: a store whose Ray Data half holds the epoch's rows (2.5x an epoch);
- quarter: a store of a quarter epoch (at least 80 MB: Ray refuses less than 75);
- quarter_unfixed: the same with Ray Data's executor as Ray 2.60 ships it (the executor fixes of
  `runtime.ray.EXECUTOR_FIXES` removed from the dataset's context).

Per run: each epoch's first 10 steps against the median step (`epoch_start_ratios`), rows/s after the
stage's first batch (both runs decode the same rows in it; epoch 2 alone would credit the whole store
with rows it decoded ahead during epoch 1), per epoch the consumer's wait for a batch and the CPU-ms a
step of the consumer and of every other process (`bench.step_case.cpu_by_process`). Needs Ray; starts
and stops its own local Rays, so run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

EPOCH_START_STEPS = 10


def stream_run(records: list[dict], data_cfg, tasks, work, fixed: bool) -> dict:
    """One stage stream of 2 epochs on the running Ray, timed by `timed_pass`, with a CPU snapshot of
    every process as each epoch's first batch arrives and at the end."""
    from paf_ray.bench.data_case import timed_pass
    from paf_ray.bench.step_case import cpu_by_process, cpu_ms_per_step
    from paf_ray.data.pipeline import build_dataset, iter_train_batches
    from paf_ray.runtime.ray import EXECUTOR_FIXES

    per_epoch = len(records) // data_cfg.batch_size
    ds = build_dataset(records, data_cfg, tasks, train=True, epochs=2, rows_per_epoch=per_epoch * data_cfg.batch_size)
    if not fixed:
        ds.context.custom_execution_callback_classes = [
            c for c in ds.context.custom_execution_callback_classes if c not in EXECUTOR_FIXES]
    snapshots: list = []

    def with_snapshots(batches):
        for k, batch in enumerate(batches):
            if k % per_epoch == 0:
                snapshots.append(cpu_by_process())
            yield batch
        snapshots.append(cpu_by_process())

    p = timed_pass(with_snapshots(iter_train_batches(ds.streaming_split(1, equal=True)[0], tasks, data_cfg.batch_size)), work)
    epochs = [slice(e * per_epoch, (e + 1) * per_epoch) for e in range(2)]
    median = statistics.median(p["step_s"])
    first_rows = data_cfg.batch_size
    out = {
        "epoch_start_ratios": [statistics.fmean(p["step_s"][e][:EPOCH_START_STEPS]) / median for e in epochs],
        "after_first_rows_s": (p["rows"] - first_rows) / (p["total_s"] - p["first_s"]),
        "epoch_rows_s": [per_epoch * data_cfg.batch_size / sum(p["step_s"][e]) for e in epochs],
        "epoch_wait_ms": [1000 * statistics.fmean(p["wait_s"][e]) for e in epochs],
        "epoch_cpu_ms": [],
        "first_s": p["first_s"],
    }
    for before, after in zip(snapshots, snapshots[1:]):
        used = cpu_ms_per_step(before, after, os.getpid(), per_epoch)
        out["epoch_cpu_ms"].append({"consumer": used.pop("self", 0.0), "others": sum(used.values())})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=256, help="frames an epoch")
    p.add_argument("--size", default="640x384", help="WxH the rows are transformed to")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cpus", type=int, default=2, help="decode CPUs (Ray gets one more for the consumer)")
    p.add_argument("--step-s", type=float, default=0.3, help="the consumer's work per batch")
    p.add_argument("--root", default=None, help="where the synthetic 1280x720 frames go (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="16 frames at 256x160, batch 2, 0.05 s: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size, args.batch, args.step_s = 16, "256x160", 2, 0.05

    import ray

    from paf_ray.bench.data_case import FixedWork
    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import load_records, row_bytes
    from paf_ray.tasks import TASKS
    from paf_ray.data.bdd100k.synth import write_synthetic
    from paf_ray.runtime.ray import init_ray

    root = args.root or os.path.join(tempfile.mkdtemp(prefix="stream_store_"), "synth")
    write_synthetic(root, images=args.frames + args.frames // 20 + 2, seed=0, size=(1280, 720), val_fraction=0.02)
    width, height = (int(v) for v in args.size.lower().split("x"))
    data = {"input_size": [width, height], "batch_size": args.batch, "cpus": float(args.cpus)}
    cfg = from_dict({"data": data}, rules=False)  # the data section and the default tasks
    data_cfg, tasks = cfg.data, TASKS.get_many(cfg.model.tasks)
    records = load_records(data_cfg, root, "train", tasks)[:args.frames]
    epoch_mb = len(records) * row_bytes(data_cfg, tasks) / 2**20
    stores = {"whole": max(80, int(2.5 * epoch_mb)), "quarter": max(80, int(epoch_mb / 4))}  # Ray Data takes half
    work = FixedWork.lasting(args.step_s)
    runs = {}
    for name, store, fixed in (("whole", "whole", True), ("quarter", "quarter", True),
                               ("quarter_unfixed", "quarter", False)):
        ray.shutdown()
        init_ray(address="local", num_cpus=args.cpus + 1, object_store_mb=stores[store])
        print(f"[stream_store] {name}: {len(records)} frames an epoch ({epoch_mb:.0f} MB of rows), "
              f"store {stores[store]} MB ...", file=sys.stderr, flush=True)
        runs[name] = stream_run(records, data_cfg, tasks, work, fixed)
    ray.shutdown()
    whole = runs["whole"]
    print(json.dumps({
        "epoch_start_ratio": whole["epoch_start_ratios"][1], "first_epoch_start_ratio": whole["epoch_start_ratios"][0],
        "backpressure_ratio": runs["quarter"]["after_first_rows_s"] / whole["after_first_rows_s"],
        "backpressure_ratio_unfixed": runs["quarter_unfixed"]["after_first_rows_s"] / whole["after_first_rows_s"],
        "backpressure_ratio_epoch2": runs["quarter"]["epoch_rows_s"][1] / whole["epoch_rows_s"][1],
        "object_store_mb": stores, "consumer_step_s": args.step_s, "frames_per_epoch": len(records),
        "batch": args.batch, "input_size": [width, height], "decode_cpus": args.cpus, "runs": runs,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
