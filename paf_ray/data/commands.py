"""Handlers of ``paf-ray data synth | index | check`` (arguments are declared in paf_ray/cli.py).

Like every area's ``commands.py``, they import what they run when they run (`paf-ray --help` stays
fast), and wire the parts below: here the registered tasks into the index and the checks."""

from __future__ import annotations

import json
import sys
import time



def synth_command(args) -> int:
    from paf_ray.data.bdd100k.synth import write_synthetic

    size = args.size
    try:
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
    from paf_ray.data.contracts import DatasetError
    from paf_ray.data.index import index_location, load_index, write_index
    from paf_ray.tasks import DEFAULT_TASKS, TASKS

    splits = tuple(args.split or ("train", "val"))
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        tasks = TASKS.get_many(args.tasks.split(",") if args.tasks else DEFAULT_TASKS)
    except KeyError as e:
        print(f"paf-ray data index: --tasks: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        records = load_index(args.root, tasks, drop_overlap=not args.keep_overlap, index_dir=args.index_dir,
                             stats=stats)
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
        per_task = ", ".join(f"{t.name} {sum(1 for r in records[split] if t.name in r['labels'])}" for t in tasks)
        dropped = {k: v for k, v in st.items()
                   if v and k not in ("problems", "records", "merged", "skipped", "index") and not k.startswith("images_")}
        print(f"{split}: {st['records']} records ({per_task}; {st['merged']} frames in both sets merged)"
              + (f"; dropped {dropped}" if dropped else ""))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def check_command(args) -> int:
    from paf_ray.data.check import check_dataset, format_report
    from paf_ray.data.decode import MAX_IMAGE_PIXELS
    from paf_ray.tasks import TASKS

    report = check_dataset(args.root, list(TASKS), splits=tuple(args.split or ("train", "val")),
                           max_pixels=args.max_image_pixels or MAX_IMAGE_PIXELS)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
