"""BDD100K lane marking: the mask byte layout and the official boundary F-score, in numpy.

The byte of a lane mask pixel, bit 7 first: ``- - d s b c c c``

- ``d`` (bit 5) direction: 0 parallel, 1 vertical
- ``s`` (bit 4) style: 0 solid, 1 dashed
- ``b`` (bit 3) background: 1 = no lane here (the official masks write 255 there)
- ``c`` (bits 0-2) category: 0 crosswalk ... 7 single yellow (``LANE_CATEGORIES``)

``LaneFScore`` reproduces ``bdd100k.eval.lane.evaluate_lane_marking`` (bdd100k 1.0.1):

1. Per frame, for each attribute (direction, style, category) and each of its values, the
   foreground pixels of that value form a ground-truth mask G and a predicted mask P.
2. For each tolerance t in 1, 2, 5 px both are dilated by a disk of radius t (skimage's
   ``disk(t)``: the offsets with dx^2 + dy^2 <= t^2; pixels outside the frame count as empty).
   precision = |P within dilated G| / |P|, recall = |G within dilated P| / |G|,
   F = 2PR / (P + R). Both empty: F = 1; exactly one empty: F = 0.
3. Each value's F is averaged over all frames (frames where the value is absent on both sides
   count as 1), times 100; an attribute's score is the mean over its values; ``F1_pix{t}`` is
   the mean of the three attributes.

A frame without a prediction is scored by the toolkit against an all-zero mask, i.e. every pixel
predicted as a parallel solid crosswalk: pass ``pred=None`` to ``update`` for the same.

The tolerances are in pixels of the masks as given: the official numbers are at 1280x720; at a
smaller evaluation size the same tolerance is wider in the scene, so such numbers are not
comparable with official ones.

Keys of ``compute`` (no task prefix; percent)::

    F1_pix{t}                        mean of the three attributes  (headline: F1_pix2, LANE_HEADLINE)
    F1_pix{t}/{attribute}            direction | style | category: mean over the attribute's values
    F1_pix{t}/{attribute}/{value}    e.g. F1_pix1/category/double yellow
    IoU_fg, Acc_fg, pAcc_binary      the YOLOP-family numbers, see below

The YOLOP-family numbers are a different protocol: the binary lane foreground (lane vs no lane)
is scored as one 2x2 confusion over the whole split; ``IoU_fg`` is the IoU of the lane class,
``Acc_fg`` YOLOP's "line accuracy" (TP / (TP + FN)) and ``pAcc_binary`` the overall pixel
accuracy. YOLOP, HybridNets and their peers train and score on their own widened lane labels
at their own resolution, so neither these numbers nor theirs compare with the official F-score.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from paf_ray.data.bdd100k import (  # the byte layout (module docstring); re-exported here
    LANE_BACKGROUND,
    LANE_BACKGROUND_BIT,
    LANE_CATEGORIES,
    LANE_CATEGORY_MASK,
    LANE_DIRECTION_BIT,
    LANE_DIRECTIONS,
    LANE_STYLE_BIT,
    LANE_STYLES,
)

LANE_ATTRIBUTES = {"direction": LANE_DIRECTIONS, "style": LANE_STYLES, "category": LANE_CATEGORIES}
BOUND_PIXELS = (1, 2, 5)
LANE_HEADLINE = "F1_pix2"

# Each (attribute, value) gets one bit of a uint16 "slot" word: direction 0-1, style 2-3, category 4-11.
_SLOT_BASE = {"direction": 0, "style": 2, "category": 4}
_NUM_SLOTS = 12
_SLOT_SHIFTS = np.arange(_NUM_SLOTS, dtype=np.uint16)


class LaneInputError(ValueError):
    """A lane mask that cannot be scored (wrong type or shape); the message names the problem."""


def decode_lane(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(foreground bool, category, direction, style) of a uint8 lane mask; the last three are uint8.

    Where foreground is False the attribute arrays hold the raw bits, which mean nothing.
    Bits 6 and 7 are ignored, as the toolkit does.
    """
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        raise LaneInputError(f"lane mask must be uint8, got {mask.dtype}")
    foreground = (mask & (1 << LANE_BACKGROUND_BIT)) == 0
    category = mask & LANE_CATEGORY_MASK
    direction = (mask >> LANE_DIRECTION_BIT) & 1
    style = (mask >> LANE_STYLE_BIT) & 1
    return foreground, category, direction, style


def encode_lane(foreground, category, direction, style) -> np.ndarray:
    """The uint8 lane mask: ``category | style << 4 | direction << 5`` on the foreground, 255 elsewhere."""
    foreground = np.asarray(foreground, dtype=bool)
    category, direction, style = (np.broadcast_to(np.asarray(a), foreground.shape) for a in (category, direction, style))
    for name, values, limit in (("category", category, 8), ("direction", direction, 2), ("style", style, 2)):
        v = values[foreground]
        if v.size and (v.min() < 0 or v.max() >= limit):
            raise LaneInputError(f"lane {name} values must be in 0..{limit - 1}, got {int(v.min())}..{int(v.max())}")
    value = (category.astype(np.uint8) | (style.astype(np.uint8) << LANE_STYLE_BIT)
             | (direction.astype(np.uint8) << LANE_DIRECTION_BIT))
    return np.where(foreground, value, np.uint8(LANE_BACKGROUND)).astype(np.uint8)


def _slots(mask: np.ndarray) -> np.ndarray:
    """uint16 word per pixel: one bit per (attribute, value) the pixel belongs to; 0 off the foreground."""
    foreground, category, direction, style = decode_lane(mask)
    one = np.uint16(1)
    word = ((one << direction.astype(np.uint16))
            | (one << (style.astype(np.uint16) + _SLOT_BASE["style"]))
            | (one << (category.astype(np.uint16) + _SLOT_BASE["category"])))
    return np.where(foreground, word, np.uint16(0))


def _disk_half_widths(radius: int) -> list[int]:
    """Half width of skimage's disk(radius) on each row dy = 0..radius (dx^2 + dy^2 <= radius^2)."""
    return [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]


def _dilations(words: np.ndarray, radii: Sequence[int]) -> list[np.ndarray]:
    """Bitwise-OR dilation of `words` by disk(r) for each r (exact; outside the array = empty)."""
    rows = [words]  # rows[k]: OR over horizontal offsets -k..k
    for k in range(1, max(radii) + 1):
        nxt = rows[-1].copy()
        nxt[:, k:] |= words[:, :-k]
        nxt[:, :-k] |= words[:, k:]
        rows.append(nxt)
    out = []
    for radius in radii:
        half = _disk_half_widths(radius)
        dil = rows[half[0]].copy()
        for dy in range(1, radius + 1):
            src = rows[half[dy]]
            dil[dy:, :] |= src[:-dy, :]
            dil[:-dy, :] |= src[dy:, :]
        out.append(dil)
    return out


def _bit_counts(words: np.ndarray) -> np.ndarray:
    """How many of `words` have each of the 12 slot bits set."""
    if words.size == 0:
        return np.zeros(_NUM_SLOTS, np.int64)
    return ((words[:, None] >> _SLOT_SHIFTS) & 1).sum(0, dtype=np.int64)


def frame_fscores(gt: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """One frame's F (0..1) per (attribute value, tolerance): shape (12, len(BOUND_PIXELS)).

    Rows: direction values, style values, category values, in ``LANE_ATTRIBUTES`` order.
    """
    gt = np.asarray(gt)
    pred = np.zeros_like(gt, dtype=np.uint8) if pred is None else np.asarray(pred)
    if gt.ndim != 2 or pred.shape != gt.shape:
        raise LaneInputError(f"lane masks must be 2-D and of one size: ground truth {gt.shape}, prediction {pred.shape}")
    g, p = _slots(gt), _slots(pred)
    # Work on the box around both foregrounds, grown by the widest tolerance: nothing outside it matters.
    any_rows = np.flatnonzero((g | p).any(axis=1))
    scores = np.ones((_NUM_SLOTS, len(BOUND_PIXELS)), np.float64)
    if any_rows.size == 0:
        return scores
    any_cols = np.flatnonzero((g | p).any(axis=0))
    pad = max(BOUND_PIXELS)
    y0, y1 = max(0, any_rows[0] - pad), min(gt.shape[0], any_rows[-1] + pad + 1)
    x0, x1 = max(0, any_cols[0] - pad), min(gt.shape[1], any_cols[-1] + pad + 1)
    g, p = g[y0:y1, x0:x1], p[y0:y1, x0:x1]
    g_on, p_on = g != 0, p != 0
    g_words, p_words = g[g_on], p[p_on]
    n_gt, n_pd = _bit_counts(g_words), _bit_counts(p_words)
    g_dil, p_dil = _dilations(g, BOUND_PIXELS), _dilations(p, BOUND_PIXELS)
    for j in range(len(BOUND_PIXELS)):
        pd_match = _bit_counts(p_words & g_dil[j][p_on])
        gt_match = _bit_counts(g_words & p_dil[j][g_on])
        for s in range(_NUM_SLOTS):
            if n_gt[s] == 0 and n_pd[s] == 0:
                continue  # F = 1
            if n_gt[s] == 0 or n_pd[s] == 0:
                scores[s, j] = 0.0
                continue
            precision = pd_match[s] / float(n_pd[s])
            recall = gt_match[s] / float(n_gt[s])
            scores[s, j] = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return scores


class LaneFScore:
    """Accumulates the official lane F-score and the binary-foreground confusion over frames.

    ``update(gt, pred)`` per frame (uint8 masks of one size; ``pred=None`` = no prediction);
    ``state()`` is a small picklable dict (sums and counts); ``merge(states)`` adds states from
    several workers; ``compute(state)`` gives the flat metrics (module docstring). A frame
    evaluated on two workers is counted twice: give each worker its own frames.
    """

    def __init__(self):
        self._state = self.empty_state()

    @staticmethod
    def empty_state() -> dict[str, Any]:
        return {
            "frames": 0,
            "f_sum": np.zeros((_NUM_SLOTS, len(BOUND_PIXELS)), np.float64),
            "fg_conf": np.zeros((2, 2), np.int64),  # rows GT (0 background, 1 lane), columns prediction
        }

    def update(self, gt: np.ndarray, pred: np.ndarray | None) -> None:
        gt = np.asarray(gt)
        pred_arr = np.zeros_like(gt, dtype=np.uint8) if pred is None else np.asarray(pred)
        self._state["f_sum"] += frame_fscores(gt, pred_arr)
        self._state["frames"] += 1
        g = decode_lane(gt)[0].reshape(-1).astype(np.int64)
        p = decode_lane(pred_arr)[0].reshape(-1).astype(np.int64)
        self._state["fg_conf"] += np.bincount(g * 2 + p, minlength=4).reshape(2, 2)

    def state(self) -> dict[str, Any]:
        s = self._state
        return {"frames": s["frames"], "f_sum": s["f_sum"].copy(), "fg_conf": s["fg_conf"].copy()}

    @staticmethod
    def merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        merged = LaneFScore.empty_state()
        for s in states:
            merged["frames"] += int(s["frames"])
            merged["f_sum"] += s["f_sum"]
            merged["fg_conf"] += s["fg_conf"]
        return merged

    @staticmethod
    def compute(state: dict[str, Any]) -> dict[str, float]:
        """Flat metrics in percent; empty when no frame was scored."""
        out: dict[str, float] = {}
        frames = int(state["frames"])
        if frames == 0:
            return out
        per_value = state["f_sum"] / frames * 100.0  # (12, tolerances)
        for j, t in enumerate(BOUND_PIXELS):
            attribute_scores = []
            for attribute, names in LANE_ATTRIBUTES.items():
                base = _SLOT_BASE[attribute]
                values = per_value[base:base + len(names), j]
                for name, v in zip(names, values):
                    out[f"F1_pix{t}/{attribute}/{name}"] = float(v)
                attribute_scores.append(values.mean())
                out[f"F1_pix{t}/{attribute}"] = float(attribute_scores[-1])
            out[f"F1_pix{t}"] = float(np.mean(attribute_scores))
        conf = state["fg_conf"]
        tp, fn, fp, tn = int(conf[1, 1]), int(conf[1, 0]), int(conf[0, 1]), int(conf[0, 0])
        if tp + fp + fn:
            out["IoU_fg"] = 100.0 * tp / (tp + fp + fn)
        if tp + fn:
            out["Acc_fg"] = 100.0 * tp / (tp + fn)
        out["pAcc_binary"] = 100.0 * (tp + tn) / max(1, tp + tn + fp + fn)
        return out
