"""`paf-ray score det|sem|drv GT PRED [--json]`: score files in the official BDD100K formats.

det: Scalabel/BDD100K JSON (a list of frames, or an object with "frames"); sem/drv: folders of
8-bit PNG masks matched by file stem. A ground-truth mask without a prediction counts as every
pixel wrong, like the official toolkit; predictions without ground truth are ignored.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

from paf_ray.data.bdd100k import DRV_CLASSES, SEM_CLASSES
from paf_ray.eval.metrics import (
    DET_METRIC_NAMES,
    MetricsInputError,
    confusion_update,
    det_metrics,
    drv_metrics,
    json_safe,
    seg_metrics,
)


def read_frames(path: str) -> list[dict]:
    """Frames of a Scalabel/BDD100K detection file (a JSON list, or a dataset object with "frames")."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MetricsInputError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise MetricsInputError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("frames"), list):
        data = data["frames"]
    if not isinstance(data, list):
        raise MetricsInputError(f"{path}: expected a list of frames (or an object with 'frames')")
    return data


def _masks_by_stem(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise MetricsInputError(f"{folder}: not a folder of PNG masks")
    return {
        os.path.splitext(name)[0]: os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.lower().endswith(".png")
    }


def read_mask(path: str) -> np.ndarray:
    """An 8-bit single-channel PNG (mode L or P: the values are the ids) as a uint8 array."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise MetricsInputError(f"{path}: expected an 8-bit single-channel mask of ids, got mode {img.mode}")
            return np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise MetricsInputError(f"{path}: cannot read the mask: {e}") from None


def score_masks(gt_dir: str, pred_dir: str, num_classes: int) -> tuple[np.ndarray, dict[str, int]]:
    """One confusion over all GT masks in `gt_dir` (size num_classes + 1) and counts of what was matched."""
    gts = _masks_by_stem(gt_dir)
    preds = _masks_by_stem(pred_dir)
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    missing = 0
    for stem, gt_path in gts.items():
        gt = read_mask(gt_path)
        if stem in preds:
            pred = read_mask(preds[stem])
            if pred.shape != gt.shape:
                raise MetricsInputError(f"{preds[stem]}: size {pred.shape[::-1]} differs from {gt_path} {gt.shape[::-1]}")
        else:
            missing += 1
            pred = np.full_like(gt, num_classes)  # an always-wrong value
        confusion_update(conf, pred, gt, num_classes)
    counts = {"images": len(gts), "missing_predictions": missing, "extra_predictions": len(set(preds) - set(gts))}
    return conf, counts


def score_det(gt_path: str, pred_path: str) -> dict[str, Any]:
    return det_metrics(read_frames(gt_path), read_frames(pred_path), gt_path, pred_path)


def score_sem(gt_dir: str, pred_dir: str) -> dict[str, Any]:
    conf, counts = score_masks(gt_dir, pred_dir, len(SEM_CLASSES))
    return {**seg_metrics(conf, SEM_CLASSES), **counts}


def score_drv(gt_dir: str, pred_dir: str) -> dict[str, Any]:
    conf, counts = score_masks(gt_dir, pred_dir, len(DRV_CLASSES))
    return {**drv_metrics(conf), **counts}


def _fmt(x: float | None) -> str:
    return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.2f}"


def format_table(task: str, result: dict[str, Any]) -> str:
    lines = []
    if task == "det":
        cols = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
        lines.append(f"{'class':<16}" + "".join(f"{c:>8}" for c in cols))
        for name, values in result["per_class"].items():
            lines.append(f"{name:<16}" + "".join(f"{_fmt(values[c]):>8}" for c in cols))
        lines.append(f"{'OVERALL':<16}" + "".join(f"{_fmt(result[c]):>8}" for c in cols))
        lines.append(f"({result['images']} images; '-' = no ground truth for the class)")
    else:
        lines.append(f"{'class':<16}{'IoU':>8}")
        for name, value in result["per_class"].items():
            lines.append(f"{name:<16}{_fmt(value):>8}")
        lines.append(f"{'mIoU':<16}{_fmt(result['mIoU']):>8}")
        if task == "drv":
            lines.append(f"{'mIoU3':<16}{_fmt(result['mIoU3']):>8}  (direct, alternative, background)")
        lines.append(
            f"({result['images']} images, {result['missing_predictions']} without prediction; "
            "'-' = class absent from the ground truth)"
        )
    return "\n".join(lines)


def json_result(task: str, result: dict[str, Any]) -> dict[str, Any]:
    """The --json object: det -> the twelve numbers + per_class {name: {...}}; sem/drv -> mIoU + per_class."""
    if task == "det":
        out = {name: result[name] for name in DET_METRIC_NAMES}
        out["per_class"] = result["per_class"]
        out["images"] = result["images"]
    else:
        out = dict(result)
    return json_safe(out)


def score_command(args) -> int:
    scorers = {"det": score_det, "sem": score_sem, "drv": score_drv}
    try:
        result = scorers[args.task](args.gt, args.pred)
    except MetricsInputError as e:
        print(f"paf-ray score {args.task}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_result(args.task, result)))
    else:
        print(format_table(args.task, result))
    return 0
