"""Handlers of `paf-ray run | eval | demo | pretrain` (arguments in paf_ray/cli.py).

Command modules are the top floor: each handler imports what it runs when it runs, so that
`paf-ray --help` loads none of torch or Ray.
"""

from __future__ import annotations

import json
import sys


def run_command(args) -> int:
    from paf_ray.config import load_config
    from paf_ray.runtime.runs import RunExistsError
    from paf_ray.train.run import run_config

    cfg = load_config(args.config, args.overrides)
    try:
        run_config(cfg, args.out, args.resume)
    except RunExistsError as e:
        print(f"paf-ray run: {e}", file=sys.stderr)
        return 2
    return 0


def eval_command(args) -> int:
    from paf_ray.train.run import eval_checkpoint

    eval_checkpoint(args.checkpoint, args.overrides, as_json=args.json)
    return 0


def demo_command(args) -> int:
    from paf_ray.train.demo import run_demo

    run_demo(args.config, args.out, args.overrides)
    return 0


def pretrain_command(args) -> int:
    """`paf-ray pretrain CONFIG --method M --out FILE`: on the config's training frames and backbone."""
    from dataclasses import replace

    from paf_ray.config import PretrainConfig, load_config
    from paf_ray.tasks import ordered
    from paf_ray.train.pretrain import pretrain_checkpoint
    from paf_ray.train.run import prepare_data

    cfg = load_config(args.config, args.overrides)
    pc = PretrainConfig(method=args.method, seed=args.seed)
    for name in ("steps", "batch_size", "lr"):
        if getattr(args, name) is not None:
            pc = replace(pc, **{name: getattr(args, name)})
    if args.size:
        pc = replace(pc, size=args.size)
    cfg, train_records, _ = prepare_data(cfg)
    print(f"[pretrain] {pc.method} on {len(train_records)} frames of {cfg.data.root}, backbone "
          f"{cfg.model.backbone.name}, {pc.steps} steps -> {args.out}", flush=True)
    summary = pretrain_checkpoint(cfg.model.backbone, train_records, ordered(cfg.model.tasks), args.out, pc)
    print(json.dumps(summary, indent=2))
    print(f"[pretrain] use it with: --set model.backbone.weights={args.out} "
          f"--set model.backbone.format={summary['format']}")
    return 0
