"""Data-layer costs: the synthetic generator, the CPU time of a train row, the Ray Data pipeline's frames/s.

    python scripts/data_costs.py [--synth-images 60] [--pipeline-images 48] [--cpus 2]   # JSON on stdout

1. generator: `write_synthetic` at 640x360 in this process (wall and CPU seconds);
2. rows: CPU milliseconds per row of `pipeline.load_row` (decode + train transform), the work a Ray
   Data task does per frame, in this process: 320x180 frames to 320x192 (the demo) and 1280x720
   frames to 640x384;
3. pipeline: 1280x720 synthetic frames -> index -> Ray Data decode + train transform to 640x384 ->
   `iter_train_batches` on a local Ray with `--cpus` CPUs, all of them given to data. The first
   epoch includes the workers' start; the second is the steady-state number.

What it measured: README's generator and row-cost rows, and the row cost docs/benchmarks.md quotes
("Colour jitter without BLAS").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def default_tasks():
    """The tasks a config trains when it names none (the registry's objects)."""
    from paf_ray.config import from_dict
    from paf_ray.tasks import TASKS

    return TASKS.get_many(from_dict({}, rules=False).model.tasks)


def bench_synth(images: int, size=(640, 360)) -> dict:
    from paf_ray.data.bdd100k.synth import write_synthetic

    with tempfile.TemporaryDirectory() as d:
        w0, c0 = time.perf_counter(), time.process_time()
        write_synthetic(os.path.join(d, "s"), images=images, seed=0, size=size)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"images": images, "size": list(size), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "frames_per_s": round(images / wall, 1), "frames_per_cpu_s": round(images / cpu, 1)}


def bench_rows(images: int, size, input_size, repeats: int = 3) -> dict:
    from paf_ray.config import DataConfig
    from paf_ray.data.pipeline import RowSettings, load_records, load_row
    from paf_ray.data.bdd100k.synth import write_synthetic

    with tempfile.TemporaryDirectory() as d:
        root = write_synthetic(os.path.join(d, "s"), images=images, seed=0, size=size, val_fraction=0.0)
        cfg = DataConfig(input_size=input_size)
        tasks, settings = default_tasks(), RowSettings.of(cfg)
        items = load_records(cfg, root, "train", tasks)
        load_row(items[0], settings, tasks, True)  # warm-up
        c0 = time.process_time()
        for _ in range(repeats):
            for item in items:
                load_row(item, settings, tasks, True)
        cpu = time.process_time() - c0
    return {"frame": f"{size[0]}x{size[1]}", "input": f"{input_size[0]}x{input_size[1]}",
            "rows": repeats * len(items), "cpu_ms_per_row": round(1000 * cpu / (repeats * len(items)), 2)}


def bench_pipeline(images: int, cpus: int, batch_size: int = 4) -> dict:
    from paf_ray.config import DataConfig
    from paf_ray.data.pipeline import build_dataset, iter_train_batches, load_records
    from paf_ray.data.bdd100k.synth import write_synthetic
    from paf_ray.runtime.ray import init_ray

    with tempfile.TemporaryDirectory() as d:
        root = write_synthetic(os.path.join(d, "s"), images=images, seed=0, size=(1280, 720), val_fraction=0.0)
        cfg = DataConfig(input_size=(640, 384), cpus=float(cpus), batch_size=batch_size)
        init_ray(address="local", num_cpus=cpus, object_store_mb=512)
        tasks = default_tasks()
        records = load_records(cfg, root, "train", tasks)
        ds = build_dataset(records, cfg, tasks, train=True)
        epochs = []
        for _ in range(2):
            t0, n = time.perf_counter(), 0
            for batch in iter_train_batches(ds, tasks, batch_size):
                n += len(batch["name"])
            epochs.append((n, time.perf_counter() - t0))
    (n1, t1), (n2, t2) = epochs
    return {"frames": n2, "input": "1280x720 JPEG", "output": "640x384 train transform", "cpus": cpus,
            "first_epoch_frames_per_s": round(n1 / t1, 1), "frames_per_s": round(n2 / t2, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synth-images", type=int, default=60)
    p.add_argument("--pipeline-images", type=int, default=48)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args(argv)
    out = {"load_average_at_start": os.getloadavg(), "synth": bench_synth(args.synth_images),
           "rows": [bench_rows(40, (320, 180), (320, 192)), bench_rows(12, (1280, 720), (640, 384))],
           "pipeline": bench_pipeline(args.pipeline_images, args.cpus)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
