"""Handlers of ``paf-ray data synth | index | check`` (arguments are declared in paf_ray/cli.py)."""

from __future__ import annotations

import json
import sys
import time

from paf_ray.data.index import DatasetError


def parse_size(text: str) -> tuple[int, int]:
    """'640x360' -> (640, 360)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 640x360") from None
    return w, h


def synth_command(args) -> int:
    from paf_ray.data.synth import write_synthetic

    try:
        size = parse_size(args.size)
        t0 = time.perf_counter()
        out = write_synthetic(args.out, images=args.images, seed=args.seed, size=size, val_fraction=args.val_fraction)
    except ValueError as e:
        print(f"paf-ray data synth: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"wrote {args.images} synthetic frames ({size[0]}x{size[1]}, seed {args.seed}) to {out} "
          f"in {dt:.1f} s ({args.images / max(dt, 1e-9):.1f} frames/s)")
    return 0


def index_command(args) -> int:
    from paf_ray.data.index import index_location, load_index, write_index

    splits = tuple(args.split or ("train", "val"))
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        records = load_index(args.root, drop_overlap=not args.keep_overlap, index_dir=args.index_dir, stats=stats)
    except DatasetError as e:
        print(f"paf-ray data index: {e}", file=sys.stderr)
        return 1
    how = stats[splits[0]].get("index", "built")
    print(f"index {how} in {time.perf_counter() - t0:.1f} s, kept in {index_location(args.root, args.index_dir)} "
          "(runs reuse it while the files are unchanged)")
    if args.out:
        write_index([r for s in splits for r in records[s]], args.out)
    for split in splits:
        st = stats[split]
        tasks = {t: sum(1 for r in records[split] if (r["has_det"] if t == "det" else r[t])) for t in ("det", "sem", "drv")}
        dropped = {k: v for k, v in st.items()
                   if k not in ("problems", "records", "merged", "images_100k", "images_10k", "skipped") and v}
        print(f"{split}: {st['records']} records (det {tasks['det']}, sem {tasks['sem']}, drv {tasks['drv']}; "
              f"{st['merged']} frames in both sets merged)" + (f"; dropped {dropped}" if dropped else ""))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def check_command(args) -> int:
    from paf_ray.data.check import check_dataset, format_report

    report = check_dataset(args.root, splits=tuple(args.split or ("train", "val")))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
