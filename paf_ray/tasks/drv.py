"""Drivable area (`drv`): direct / alternative / background per pixel, on BDD100K's 100k frames.

The official mIoU (``bdd100k/eval/seg.py`` with a confusion of size 3) leaves ground-truth
background out: mIoU = mean(IoU direct, IoU alternative), so painting background as drivable is
never penalised. ``drv/mIoU3`` counts all three values, which makes over-segmentation visible.
"""

from __future__ import annotations

import numpy as np

from paf_ray.data import bdd100k as B
from paf_ray.tasks.masks import MaskTask, finite, fmt, seg_metrics
from paf_ray.tasks.registry import TASKS


def drv_metrics(conf: np.ndarray) -> dict:
    """From a 4x4 confusion (3 values + invalid): the official 2-class `mIoU` (background ground
    truth dropped, a background prediction counted as "other") and `mIoU3` over all three values."""
    k = B.DRV_OFFICIAL_CLASSES
    conf = np.asarray(conf, np.int64)
    official = np.zeros((k + 1, k + 1), dtype=np.int64)
    official[:k, :k] = conf[:k, :k]
    official[:k, k] = conf[:k, k:].sum(1)
    two = seg_metrics(official, B.DRV_CLASSES[:k])
    three = seg_metrics(conf, B.DRV_CLASSES)
    return {"mIoU": two["mIoU"], "mIoU3": three["mIoU"], "per_class": two["per_class"],
            "per_class3": three["per_class"], "pAcc": two["pAcc"]}


class DrivableArea(MaskTask):
    name = "drv"
    title = "drivable area (direct, alternative)"
    classes = B.DRV_CLASSES
    prompt_names = B.DRV_PROMPT_NAMES
    image_set = B.DRV_IMAGE_SET
    masks_dir = B.DRV_MASKS_DIR
    palette = B.DRV_PALETTE
    overlay_alpha = 0.5
    overlay_skip = (B.DRV_BACKGROUND,)
    headline = "drv/mIoU"
    table_metrics = ("drv/mIoU", "drv/mIoU3")
    draw_order = 1

    @property
    def allowed_values(self) -> np.ndarray:
        allowed = np.zeros(256, bool)  # drivable masks have no "unlabelled" value
        allowed[: self.num_classes] = True
        return allowed

    def compute(self, state: np.ndarray) -> dict[str, float]:
        m = drv_metrics(state)
        out = {"drv/mIoU": m["mIoU"], "drv/mIoU3": m["mIoU3"], **{f"drv/IoU/{c}": v for c, v in m["per_class"].items()}}
        return {k: float(v) for k, v in out.items() if finite(v)}

    def score_metrics(self, conf: np.ndarray) -> dict:
        return drv_metrics(conf)

    def score_table(self, result: dict) -> str:
        lines = [f"{'class':<16}{'IoU':>8}"]
        lines += [f"{name:<16}{fmt(v):>8}" for name, v in result["per_class"].items()]
        lines.append(f"{'mIoU':<16}{fmt(result['mIoU']):>8}")
        lines.append(f"{'mIoU3':<16}{fmt(result['mIoU3']):>8}  (direct, alternative, background)")
        lines.append(f"({result['images']} images, {result['missing_predictions']} without prediction; "
                     "'-' = class absent from the ground truth)")
        return "\n".join(lines)


TASKS.register(DrivableArea())
