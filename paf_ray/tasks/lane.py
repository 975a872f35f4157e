"""Lane marking (`lane`): per pixel a lane category, its direction and its style, on the 100k frames.

Labels: ``labels/lane/masks/{split}/<stem>.png``, one byte a pixel (docs/bdd100k.md, "Lane
marking"): bit 5 direction (parallel / vertical), bit 4 style (solid / dashed), bit 3 background,
bits 0-2 the category (crosswalk, double other, double white, double yellow, road curb, single
other, single white, single yellow).

The head predicts three things per pixel from the shared pyramid: the category or "no lane"
(9 logits), and, where there is a lane, its direction (2) and style (2). The official metric
(``bdd100k.eval.lane``) is a boundary F-score per value of each attribute at 1, 2 and 5 px;
the headline is their toolkit mean at 2 px (``lane/F1_pix2``). ``lane/IoU_fg`` is the
YOLOP-family number (IoU of the lane foreground), a different protocol reported beside it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

from paf_ray.data import bdd100k as B
from paf_ray.data.contracts import IGNORE_INDEX
from paf_ray.tasks.base import TaskEvaluator
from paf_ray.tasks.lane_metrics import LANE_HEADLINE, LaneFScore, decode_lane, encode_lane
from paf_ray.data.decode import MAX_IMAGE_PIXELS
from paf_ray.tasks.masks import MaskTask, finite, fmt, mask_pairs
from paf_ray.viz import blend_mask
from paf_ray.tasks.registry import TASKS

NUM_CATEGORIES = len(B.LANE_CATEGORIES)
# Rows pad lane masks with this (the official masks hold 0..63 and 255 = no lane): "not labelled"
LANE_PAD = 254
NO_LANE = NUM_CATEGORIES  # the category logit that stands for "no lane here"
HEAD_SPLIT = (NUM_CATEGORIES + 1, len(B.LANE_DIRECTIONS), len(B.LANE_STYLES))


@dataclass
class LaneHeadConfig:
    """model.heads.lane."""

    channels: int = 64  # width of the head's convolutions
    # category pixels weighted by (1 / class share in the batch) ** this: lane pixels are a few % of a frame
    class_balance: float = 0.5
    attribute_weight: float = 1.0  # weight of the direction and style losses beside the category's


def lane_targets(target):
    """uint8 [B, H, W] lane bytes (LANE_PAD = not labelled) -> (category 0..8 with 8 = no lane, direction,
    style), int64, 255 where unlabelled (direction and style: also where there is no lane)."""
    import torch

    t = target.long()
    labelled = t != LANE_PAD
    lane = labelled & ((t >> B.LANE_BACKGROUND_BIT) & 1 == 0)
    ignore = torch.full_like(t, IGNORE_INDEX)
    category = torch.where(lane, t & B.LANE_CATEGORY_MASK, torch.full_like(t, NO_LANE))
    category = torch.where(labelled, category, ignore)
    direction = torch.where(lane, (t >> B.LANE_DIRECTION_BIT) & 1, ignore)
    style = torch.where(lane, (t >> B.LANE_STYLE_BIT) & 1, ignore)
    return category, direction, style


class LaneEvaluator(TaskEvaluator):
    """The official boundary F-score and the foreground IoU, on each frame's content (padding cut off)."""

    def __init__(self, task: "LaneMarking"):
        self.task = task
        self.score = LaneFScore()

    def update(self, output, batch: dict) -> None:
        has = batch["has"]["lane"].numpy().astype(bool)
        if not has.any():
            return
        gt = batch["targets"]["lane"].cpu().numpy()
        scales = batch["scale"].numpy().reshape(-1)
        sizes = batch["orig_size"].numpy()
        for i in np.flatnonzero(has):
            h = min(gt.shape[1], max(1, round(sizes[i][0] * scales[i])))
            w = min(gt.shape[2], max(1, round(sizes[i][1] * scales[i])))
            self.score.update(gt[i, :h, :w], self.task.predict_ids(output[i, :, :h, :w]))

    def state(self):
        return self.score.state()


class LaneMarking(MaskTask):
    name = "lane"
    title = "lane marking (8 categories, direction, style)"
    classes = B.LANE_CATEGORIES
    prompt_names = B.LANE_PROMPT_NAMES
    image_set = B.LANE_IMAGE_SET
    masks_dir = B.LANE_MASKS_DIR
    palette = B.LANE_PALETTE
    overlay_alpha = 0.85
    headline = f"lane/{LANE_HEADLINE}"
    table_metrics = ("lane/F1_pix2", "lane/F1_pix1", "lane/F1_pix5", "lane/IoU_fg")
    config = LaneHeadConfig
    draw_order = 2

    @property
    def head_channels(self) -> int:
        return sum(HEAD_SPLIT)

    @property
    def allowed_values(self) -> np.ndarray:
        allowed = np.zeros(256, bool)  # the bytes the official masks write
        allowed[:64] = True
        allowed[B.LANE_BACKGROUND] = True
        return allowed

    def transform(self, target, geometry) -> dict[str, np.ndarray]:
        return {self.name: geometry.mask(target, LANE_PAD)}

    def image_labels(self, target: np.ndarray) -> np.ndarray:
        present = np.zeros(NUM_CATEGORIES, np.float32)
        lane, category, _, _ = decode_lane(target)
        present[np.unique(category[lane])] = 1.0
        return present

    def check(self, section: LaneHeadConfig, model_cfg) -> list[tuple[str, str]]:
        problems = []
        if section.channels < 1:
            problems.append(("model.heads.lane.channels", f"must be >= 1, got {section.channels}"))
        if section.class_balance < 0 or section.attribute_weight < 0:
            problems.append(("model.heads.lane", "class_balance and attribute_weight must be >= 0"))
        return problems

    # ----------------------------------------------------------------- torch side

    def build_head(self, section: LaneHeadConfig, channels: int, num_levels: int, extra_channels: int):
        from paf_ray.tasks.seg_head import MaskHead

        return MaskHead(self, channels, section.channels, self.head_channels, num_levels, extra_channels,
                        {"class_balance": section.class_balance, "attribute_weight": section.attribute_weight})

    def loss(self, logits, target, class_balance: float, attribute_weight: float):
        from paf_ray.tasks.seg_head import seg_loss

        category, direction, style = lane_targets(target)
        cat_logits, dir_logits, style_logits = logits.split(HEAD_SPLIT, dim=1)
        parts = {"lane_category": seg_loss(cat_logits, category, class_balance),
                 "lane_direction": seg_loss(dir_logits, direction), "lane_style": seg_loss(style_logits, style)}
        total = parts["lane_category"] + attribute_weight * (parts["lane_direction"] + parts["lane_style"])
        return {"lane": total, **{k: v.detach() for k, v in parts.items()}}

    def alignment_loss(self, score_map, target):
        """Image-level: each category's best-matching pixel against whether the frame has that category
        (lane lines are a few pixels wide: at the score map's stride they vanish as pixel targets)."""
        import torch
        import torch.nn.functional as F

        category, _, _ = lane_targets(target)
        wanted = torch.stack([(category == c).flatten(1).any(1) for c in range(NUM_CATEGORIES)], dim=1).float()
        return F.binary_cross_entropy_with_logits(score_map.float().flatten(2).amax(dim=-1), wanted)

    def predict_ids(self, logits):
        """[13, h, w] logits -> uint8 lane bytes (numpy)."""
        cat_logits, dir_logits, style_logits = logits.float().split(HEAD_SPLIT, dim=0)
        category = cat_logits.argmax(0).cpu().numpy()
        lane = category != NO_LANE
        return encode_lane(lane, np.where(lane, category, 0), dir_logits.argmax(0).cpu().numpy(),
                           style_logits.argmax(0).cpu().numpy())

    # ----------------------------------------------------------------- evaluate

    def evaluator(self, section) -> LaneEvaluator:
        return LaneEvaluator(self)

    def merge(self, states: list) -> Any:
        return LaneFScore.merge(states)

    def compute(self, state) -> dict[str, float]:
        return {f"lane/{k}": float(v) for k, v in LaneFScore.compute(state).items() if finite(v)}

    # ----------------------------------------------------------------- draw and score

    def draw(self, image: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        lane, category, _, _ = decode_lane(prediction)
        ids = np.where(lane, category, 255).astype(np.uint8)
        return blend_mask(image, ids, self.palette, self.overlay_alpha)

    def score(self, args: argparse.Namespace) -> dict:
        """The official boundary F-score over every ground-truth mask of the folder; a frame without a
        prediction is scored against an all-zero mask, as the toolkit does (every pixel a crosswalk)."""
        pairs, counts = mask_pairs(args.gt, args.pred, getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS))
        score = LaneFScore()
        for _, gt, pred in pairs:
            score.update(gt, pred)
        return {**LaneFScore.compute(score.state()), **counts}

    def score_table(self, result: dict) -> str:
        lines = [f"{'':<28}" + "".join(f"{f'{t} px':>8}" for t in (1, 2, 5))]
        for key, label in (("direction", "direction"), ("style", "style"), ("category", "category"), ("", "mean (official)")):
            cells = [result.get(f"F1_pix{t}" + (f"/{key}" if key else "")) for t in (1, 2, 5)]
            lines.append(f"{'F-score ' + label:<28}" + "".join(f"{fmt(v):>8}" for v in cells))
        lines.append(f"{'lane IoU (YOLOP protocol)':<28}{fmt(result.get('IoU_fg')):>8}")
        lines.append(f"({result['images']} images, {result['missing_predictions']} without prediction)")
        return "\n".join(lines)


TASKS.register(LaneMarking())
