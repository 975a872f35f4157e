"""`paf-ray bench --config CONFIG`: a config's training steps on this machine, side by side; one JSON line.

    paf-ray bench --config CONFIG [--set K=V ...] [--steps 5] [--threads N]   # adapt vs finetune step
    paf-ray bench --config CONFIG --compare K=V [--compare ...]  # finetune step: the config vs the changed config

The step is the loop's `train_step` (with the lr and grad_clip of the config's stage of that kind) on
a batch of synthetic frames at `data.input_size` and `data.batch_size`, on CPU, weights random. The
steps of the two sides alternate (machine load hits both alike); medians of wall time and of this
process's CPU time (steadier on a shared machine; with --threads 1 it is the work done).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from paf_ray.config import StageConfig, load_config


def stage_of(cfg, kind: str) -> StageConfig:
    """The config's stage of this kind (its lr, grad_clip, ...), or the defaults if it has none."""
    return next((s for s in cfg.train.stages if s.kind == kind), StageConfig(kind=kind))


def side_by_side(cases: dict, cfg, steps: int) -> dict:
    """cases: name -> (model config, StageConfig); their steps alternate after one warm-up step each."""
    from paf_ray.bench.run import synthetic_batch
    from paf_ray.bench.step_case import make_step
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import apply_stage

    batch = synthetic_batch(cfg.data.input_size, cfg.data.batch_size)
    runs = {}
    for name, (model_cfg, stage) in cases.items():
        torch.manual_seed(0)
        model = build_model(model_cfg, cfg.data.input_size, load_weights=False)
        apply_stage(model, stage.kind, model_cfg)
        model.train()
        runs[name] = make_step(model, stage, batch, torch.device("cpu"), amp=False, total_updates=steps + 1)[1]
        runs[name]()  # warm-up
    wall: dict[str, list] = {k: [] for k in runs}
    cpu: dict[str, list] = {k: [] for k in runs}
    for _ in range(steps):
        for name, step in runs.items():
            c0 = time.process_time()
            t0, t_end = step()
            wall[name].append(1000 * (t_end - t0))
            cpu[name].append(1000 * (time.process_time() - c0))
    return {"ms_per_step": {k: round(statistics.median(v), 1) for k, v in wall.items()},
            "cpu_ms_per_step": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
            "batch_size": cfg.data.batch_size, "input_size": list(cfg.data.input_size),
            "threads": torch.get_num_threads(), "steps": steps}


def _ratios(r: dict, a: str, b: str) -> dict:
    return {f"{a}_over_{b}": round(r["ms_per_step"][a] / r["ms_per_step"][b], 3),
            f"{a}_over_{b}_cpu": round(r["cpu_ms_per_step"][a] / r["cpu_ms_per_step"][b], 3)}


def step_time_command(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if args.compare:
        variant = load_config(args.config, list(args.overrides) + list(args.compare))
        r = side_by_side({"base": (cfg.model, stage_of(cfg, "finetune")),
                          "variant": (variant.model, stage_of(variant, "finetune"))}, cfg, args.steps)
        r.update(changes=list(args.compare), **_ratios(r, "variant", "base"))
    else:
        r = side_by_side({kind: (cfg.model, stage_of(cfg, kind)) for kind in ("adapt", "finetune")}, cfg, args.steps)
        r.update(_ratios(r, "adapt", "finetune"))
    print(json.dumps(r))
    return 0
