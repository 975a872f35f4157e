"""Handler of `paf-ray inspect` (arguments in paf_ray/cli.py); imports the model code when it runs."""

from __future__ import annotations

import json


def inspect_command(args) -> int:
    from paf_ray.config import load_config
    from paf_ray.models.inspect import inspect_model, report_text

    cfg = load_config(args.config, args.overrides)
    report = inspect_model(cfg, args.stage)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0
