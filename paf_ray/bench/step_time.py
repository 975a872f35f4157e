"""`paf-ray bench --config CONFIG`: a config's training steps on this machine, side by side; one JSON line.

    paf-ray bench --config CONFIG [--set K=V ...] [--steps 5] [--threads N]   # adapt vs finetune step
    paf-ray bench --config CONFIG --compare K=V [--compare ...]  # finetune step: the config vs the changed config

The step is the loop's `train_step` (with the lr and grad_clip of the config's stage of that kind, or
the stage defaults) on a batch of synthetic frames at `data.input_size` and `data.batch_size`, on CPU,
weights random, in this process (`step_case.measure`). The two sides' steps alternate after a warm-up
step each (machine load hits both alike); medians of wall time and of this process's CPU time
(steadier on a shared machine; with --threads 1 it is the work done).
"""

from __future__ import annotations

import json
import os
import tempfile


def step_time_command(args) -> int:
    import torch

    from paf_ray.bench.step_case import measure, synthetic_batch
    from paf_ray.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.compare:
        variant = load_config(args.config, list(args.overrides) + list(args.compare))
        sides, (a, b) = {"base": (cfg, "finetune"), "variant": (variant, "finetune")}, ("variant", "base")
    else:
        sides, (a, b) = {"adapt": (cfg, "adapt"), "finetune": (cfg, "finetune")}, ("adapt", "finetune")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "batch.pt")
        tasks = list(dict.fromkeys(t for c, _ in sides.values() for t in c.model.tasks))  # every side's
        torch.save(synthetic_batch(cfg.data.input_size, cfg.data.batch_size, tasks), path)
        cases = {name: {"cfg": to_dict(c), "stage": kind, "batch_path": path, "device": "cpu", "amp": False,
                        "load_weights": False} for name, (c, kind) in sides.items()}
        r = measure({"cases": cases, "device": "cpu", "threads": args.threads or torch.get_num_threads(),
                     "warmup": 1, "repeats": args.steps, "breakdown": False})
    wall = {k: round(v["ms"], 1) for k, v in r["cases"].items()}
    cpu = {k: round(v["cpu_ms"], 1) for k, v in r["cases"].items()}
    out = {"ms_per_step": wall, "cpu_ms_per_step": cpu, "batch_size": cfg.data.batch_size,
           "input_size": list(cfg.data.input_size), "threads": r["threads"], "steps": args.steps,
           **({"changes": list(args.compare)} if args.compare else {}),
           f"{a}_over_{b}": round(wall[a] / wall[b], 3), f"{a}_over_{b}_cpu": round(cpu[a] / cpu[b], 3)}
    print(json.dumps(out))
    return 0
