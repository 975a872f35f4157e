"""Per-step time of adapt vs finetune on this machine, measured side by side.

    paf-ray bench --config CONFIG [--set KEY=VALUE ...] [--steps 5] [--threads N]
    paf-ray bench --config CONFIG --compare KEY=VALUE [--compare ...]   # finetune step,
                                                  # the config vs the config with these changes
    (or python -m paf_ray.bench.step_time [CONFIG] [same options])

One train step = the training loop's `train_step` (forward, backward, clip, optimizer step,
with the lr and grad_clip of the config's stage of that kind) on a synthetic batch (random image,
6 boxes, full sem/drv masks) at `data.input_size` and `data.batch_size`. The two stages'
steps alternate so that machine load hits both alike; the median is reported, as wall
time and as this process's CPU time (steadier on a shared machine; with --threads 1 it
is the work done). On a busy 2-core box, --threads 1 avoids OpenMP threads waiting on
each other and is several times faster than the default 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from paf_ray.config import StageConfig, load_config
from paf_ray.data.bdd100k import DET_CLASSES, SEM_CLASSES
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import apply_stage
from paf_ray.train.step import StepCounter, make_trainee, train_step


def synthetic_batch(batch_size: int, width: int, height: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(batch_size):
        xy = torch.rand(6, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
        wh = 8 + torch.rand(6, 2, generator=g) * torch.tensor([width * 0.2, height * 0.2])
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, len(DET_CLASSES), (6,), generator=g))
    return {
        "image": torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=g),
        "boxes": boxes, "labels": labels, "ignore_boxes": [torch.zeros(0, 4)] * batch_size,
        "sem": torch.randint(0, len(SEM_CLASSES), (batch_size, height, width), generator=g),
        "drv": torch.randint(0, 3, (batch_size, height, width), generator=g),
        "has_det": torch.ones(batch_size, dtype=torch.bool),
        "has_sem": torch.ones(batch_size, dtype=torch.bool),
        "has_drv": torch.ones(batch_size, dtype=torch.bool),
    }


def _timed_steps(cases: dict, cfg, steps: int) -> dict:
    """cases: name -> (model cfg, StageConfig). Their train steps alternate; medians in ms."""
    width, height = cfg.data.input_size
    batch = synthetic_batch(cfg.data.batch_size, width, height)
    runs = {}
    device = torch.device("cpu")
    for name, (model_cfg, stage) in cases.items():
        torch.manual_seed(0)
        model = build_model(model_cfg, cfg.data.input_size, load_weights=False)
        apply_stage(model, stage.kind, model_cfg)
        model.train()
        trainee = make_trainee(model, model, replace(stage, accum_steps=1), device, amp=False,
                               total_updates=steps + 1, name=f"step_time {name}")
        runs[name] = (trainee, StepCounter(), [])

    def step(trainee, counter):
        t0, c0 = time.perf_counter(), time.process_time()
        outcome = train_step(trainee, batch, counter)
        if not outcome.updated:
            raise RuntimeError(f"{trainee.name}: the training step was skipped ({outcome.skipped})")
        return time.perf_counter() - t0, time.process_time() - c0

    for trainee, counter, _ in runs.values():
        step(trainee, counter)  # warm-up
    for _ in range(steps):
        for trainee, counter, times in runs.values():
            times.append(step(trainee, counter))
    wall = {k: round(1000 * statistics.median(w for w, _ in t), 1) for k, (_, _, t) in runs.items()}
    cpu = {k: round(1000 * statistics.median(c for _, c in t), 1) for k, (_, _, t) in runs.items()}
    return {"ms_per_step": wall, "cpu_ms_per_step": cpu, "batch_size": cfg.data.batch_size,
            "input_size": [width, height], "threads": torch.get_num_threads(), "steps": steps}


def stage_of(cfg, kind: str) -> StageConfig:
    """The config's stage of this kind (its lr, grad_clip, ...), or the defaults if it has none."""
    return next((s for s in cfg.train.stages if s.kind == kind), StageConfig(kind=kind))


def measure(cfg, steps: int = 5) -> dict:
    r = _timed_steps({"adapt": (cfg.model, stage_of(cfg, "adapt")),
                      "finetune": (cfg.model, stage_of(cfg, "finetune"))}, cfg, steps)
    wall, cpu = r["ms_per_step"], r["cpu_ms_per_step"]
    return {**r, "adapt_over_finetune": round(wall["adapt"] / wall["finetune"], 3),
            "adapt_over_finetune_cpu": round(cpu["adapt"] / cpu["finetune"], 3)}


def compare(config_path, overrides: list[str], changes: list[str], steps: int = 5) -> dict:
    """Finetune step time of the config vs the config with `changes` (KEY=VALUE), side by side."""
    base = load_config(config_path, overrides)
    variant = load_config(config_path, list(overrides) + list(changes))
    r = _timed_steps({"base": (base.model, stage_of(base, "finetune")),
                      "variant": (variant.model, stage_of(variant, "finetune"))}, base, steps)
    wall, cpu = r["ms_per_step"], r["cpu_ms_per_step"]
    return {**r, "changes": list(changes), "variant_over_base": round(wall["variant"] / wall["base"], 3),
            "variant_over_base_cpu": round(cpu["variant"] / cpu["base"], 3)}


def step_time_command(args) -> int:
    """`paf-ray bench --config ...`: prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        print(json.dumps(compare(args.config, args.overrides, args.compare, args.steps)))
    else:
        print(json.dumps(measure(load_config(args.config, args.overrides), args.steps)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paf_ray.bench.step_time", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="time the finetune step with these config changes against the config as is")
    return step_time_command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
