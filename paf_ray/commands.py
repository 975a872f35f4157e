"""Handlers of the commands whose area is one module: predict, export, study, submit, cluster, bench.

Like every area's ``commands.py``, they import what they run when they run, so that
`paf-ray --help` loads none of torch or Ray (arguments in paf_ray/cli.py).
"""

from __future__ import annotations

import json
import os
import sys


def predict_command(args) -> int:
    from paf_ray.predict import PredictInputError, load_predictor, predict_distributed, predict_files, resolve_inputs

    out_dir = os.path.abspath(args.out)
    try:
        paths = resolve_inputs(args.inputs)
        if args.distributed:
            report = predict_distributed(args.checkpoint, paths, out_dir, batch_size=args.batch_size,
                                         workers=args.workers, device=args.device, score_thr=args.score_thr,
                                         stop_on_bad_image=args.stop_on_bad_image, max_pixels=args.max_image_pixels)
        else:
            predictor = load_predictor(args.checkpoint, device=args.device, score_thr=args.score_thr,
                                       max_pixels=args.max_image_pixels)
            report = predict_files(predictor, paths, out_dir, batch_size=args.batch_size,
                                   stop_on_bad_image=args.stop_on_bad_image)
    except (PredictInputError, FileNotFoundError) as e:
        print(f"paf-ray predict: {e}", file=sys.stderr)
        return 2
    skipped = f", {len(report.skipped)} skipped (unreadable or too large)" if report.skipped else ""
    print(f"predicted {report.frames} images{skipped} -> {out_dir}")
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        print(f"  {name}: {path}/<stem>.png" if os.path.isdir(path) else f"  {name}: {path}")
    return 1 if report.skipped else 0


def export_command(args) -> int:
    from paf_ray.export import export_model, print_report

    try:
        report = export_model(args.checkpoint, args.out, fmt=args.format, frame_size=args.frame_size,
                              sample=args.sample)
    except (ValueError, FileNotFoundError) as e:
        print(f"paf-ray export: {e}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


def study_command(args) -> int:
    from paf_ray.cluster import check_workers_can_start
    from paf_ray.study import load_study, report_folder, run_study
    from paf_ray.tune.search import sweep_dir

    cfg = load_study(args.config, args.overrides, quick=args.quick)
    if args.report:
        out_dir = sweep_dir(cfg, args.out)
        summary = {"out_dir": out_dir, **report_folder(cfg, out_dir)}
        print(summary["markdown"])
        print(f"[study] results of the cells finished so far written to {out_dir}")
        return 0
    check_workers_can_start(cfg)  # on a cluster it joins: fail now if no node type can hold a cell's worker
    summary = run_study(cfg, out=args.out, resume=args.resume, source=args.config)
    print(summary["markdown"])
    print(f"[study] folder: {summary['out_dir']} (study.md, study.csv, study.json, study.png), {summary['wall_s']} s")
    return 0 if summary["complete"] else 1


def submit_command(args) -> int:
    from paf_ray.jobs import submit

    return submit(args)


def cluster_check_command(args) -> int:
    from paf_ray.cluster import cluster_check_command as check

    return check(args)


def bench_command(args) -> int:
    from paf_ray.bench import bench_command as run

    return run(args)
