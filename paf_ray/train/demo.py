"""`paf-ray demo`: the whole method end to end on synthetic BDD100K, on a local Ray.

1. synthesise a small dataset in the official BDD100K layout;
2. make an off-the-shelf checkpoint (image-level pretraining, torchvision layout), since no
   pretrained weights can be downloaded: on a second, differently seeded synthetic set, so the
   checkpoint never sees the frames (or labels) the demo then trains and evaluates on;
3. evaluate the starting model (pretrained backbone, fresh heads) -> `metrics_before`;
4. adapt (backbone frozen, adapters trained) then finetune (everything), on Ray Train;
5. print the metrics table and write `OUT/summary.json`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

from paf_ray.config import load_config
from paf_ray.data.pipeline import load_records, resolve_root
from paf_ray.runtime.files import write_json
from paf_ray.tasks import ordered
from paf_ray.train.pretrain import pretrain_backbone
from paf_ray.train.run import metrics_table, run_pipeline

PRETRAIN_MAX_STEPS = 288
PRETEXT_SEED_OFFSET = 1000  # the pretraining frames: the demo's synthetic set with seed + this
# The demo config ships inside the package (paf_ray/configs/demo.yaml links to jobs/demo.yaml in a
# checkout; a wheel carries a copy), so `paf-ray demo` works from any folder and any install.
DEFAULT_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.yaml")


def run_demo(config_path: str | None, out: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    cfg = load_config(config_path or DEFAULT_DEMO_CONFIG, overrides)
    if cfg.data.root is None:
        print(f"[demo] synthesising {cfg.data.synth.images} BDD100K-format frames ...", flush=True)
        cfg = replace(cfg, data=replace(cfg.data, root=resolve_root(cfg.data, os.path.join(out, "data"))))

    tasks = ordered(cfg.model.tasks)
    weights = os.path.join(out, "pretrained_backbone.pth")
    pretext = replace(cfg.data, root=None, synth=replace(cfg.data.synth, seed=cfg.data.synth.seed + PRETEXT_SEED_OFFSET))
    pretext_root = resolve_root(pretext, os.path.join(out, "data"))
    print(f"[demo] pretraining the {cfg.model.backbone.name} backbone on image-level labels of another synthetic "
          f"set ({pretext_root}) -> {weights}", flush=True)
    records = load_records(pretext, pretext_root, pretext.train_split, tasks)
    # about 12 passes over the frames, at most 288 batches of 16 (~30 s on 2 cores at 320x192)
    steps = min(PRETRAIN_MAX_STEPS, 12 * max(1, len(records) // 16))
    pretrain = pretrain_backbone(cfg.model.backbone, records, tasks, weights, steps=steps,
                                 size=tuple(cfg.data.input_size), seed=cfg.train.seed)
    print(f"[demo] pretraining: {pretrain}", flush=True)
    backbone = replace(cfg.model.backbone, weights=weights, format="torchvision")
    cfg = replace(cfg, model=replace(cfg.model, backbone=backbone))

    runs = os.path.join(out, "runs")
    if os.path.isdir(os.path.join(runs, cfg.name)):  # a rerun of the demo starts its run afresh
        print(f"[demo] replacing the previous demo run in {os.path.join(runs, cfg.name)}", flush=True)
        shutil.rmtree(os.path.join(runs, cfg.name))
    summary = run_pipeline(cfg, out=runs, resume=False, evaluate_initial=True)
    demo_summary = {
        "metrics": summary["metrics"],
        "metrics_before": summary["metrics_before"],
        "metrics_per_stage": summary["metrics_per_stage"],
        "checkpoint": summary["checkpoint"],
        "run_dir": summary["run_dir"],
        "pretrain": pretrain,
        "stage_wall_s": summary["stage_wall_s"],
        "skipped_samples": summary["skipped_samples"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(os.path.join(out, "summary.json"), demo_summary)
    columns = {"before adapt": summary["metrics_before"], **summary["metrics_per_stage"]}
    print(metrics_table(columns, tasks))
    print(f"[demo] done in {demo_summary['wall_s']:.0f} s; summary: {os.path.join(out, 'summary.json')}")
    print(f"[demo] final checkpoint: {summary['checkpoint']}")
    return demo_summary
