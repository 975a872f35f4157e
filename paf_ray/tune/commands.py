"""Handler of `paf-ray tune` (arguments in paf_ray/cli.py); imports Ray Tune and Optuna when it runs."""

from __future__ import annotations

import sys
from dataclasses import replace


def tune_command(args) -> int:
    from paf_ray.cluster import check_workers_can_start
    from paf_ray.config import load_config
    from paf_ray.runtime import storage
    from paf_ray.runtime.runs import RunExistsError, resolve_storage, run_name_for
    from paf_ray.train.run import check_inputs
    from paf_ray.tune.search import rows_markdown, run_sweep

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)  # before Ray starts
    check_workers_can_start(cfg)  # on a cluster it joins: fail now if no node type can hold a trial's worker
    if args.out is None:  # a new sweep folder <name>-<time>-<id> under the storage, or the newest to resume
        try:
            cfg = replace(cfg, name=run_name_for(cfg.name, resolve_storage(cfg.ray.storage_path, None),
                                                 "" if args.resume else None))
        except RunExistsError as e:
            print(f"paf-ray tune: {e}", file=sys.stderr)
            return 2
    summary = run_sweep(cfg, out=args.out, resume=args.resume, source=args.config)
    out_dir = summary["out_dir"]
    print(rows_markdown(summary["rows"], f"Sweep {cfg.name}: trials by {cfg.tune.metrics[0]}"))
    print(f"[paf-ray] sweep folder: {out_dir} ({len(summary['rows'])} trials, {summary['wall_s']} s)")
    if len(cfg.tune.metrics) > 1:
        print(f"[paf-ray] Pareto front of {', '.join(cfg.tune.metrics)}: {len(summary['front'])} trials, "
              f"{storage.join(out_dir, 'pareto.md')} (pareto.png, best-1.yaml .. best-{len(summary['front'])}.yaml)")
    if summary["best"] is None:
        if cfg.tune.pick and any(r["status"] != "error" for r in summary["rows"]):
            print(f"[paf-ray] no trial meets tune.pick {cfg.tune.pick!r}: best.yaml not written")
        else:
            print("[paf-ray] no trial produced a result; see the errors above")
        return 1
    print(f"[paf-ray] best config: {storage.join(out_dir, 'best.yaml')}  (paf-ray run it as is)")
    print(f"[paf-ray] TensorBoard: tensorboard --logdir {out_dir}")
    return 0
