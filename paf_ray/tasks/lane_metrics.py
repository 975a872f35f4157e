"""Lane-marking bytes and metrics (interim: the foreground IoU; the official boundary F-score follows)."""

from __future__ import annotations

import numpy as np

from paf_ray.data import bdd100k as B
from paf_ray.data.contracts import IGNORE_INDEX

BACKGROUND_BYTE = 1 << B.LANE_BACKGROUND_BIT


def lane_allowed_values() -> np.ndarray:
    allowed = np.zeros(256, bool)
    allowed[:64] = True
    allowed[IGNORE_INDEX] = True
    return allowed


def decode_lane(mask: np.ndarray):
    m = np.asarray(mask, np.uint8)
    lane = (m != IGNORE_INDEX) & ((m >> B.LANE_BACKGROUND_BIT) & 1 == 0)
    return lane, m & B.LANE_CATEGORY_MASK, (m >> B.LANE_DIRECTION_BIT) & 1, (m >> B.LANE_STYLE_BIT) & 1


def encode_lane(lane, category, direction, style) -> np.ndarray:
    byte = ((np.asarray(direction, np.uint8) & 1) << B.LANE_DIRECTION_BIT) | ((np.asarray(style, np.uint8) & 1) << B.LANE_STYLE_BIT) \
        | (np.asarray(category, np.uint8) & B.LANE_CATEGORY_MASK)
    return np.where(np.asarray(lane, bool), byte, BACKGROUND_BYTE).astype(np.uint8)


class LaneScore:
    def __init__(self):
        self.inter = self.union = 0

    def update(self, gt, pred) -> None:
        g, p = decode_lane(gt)[0], decode_lane(pred)[0]
        self.inter += int((g & p).sum())
        self.union += int((g | p).sum())

    def state(self):
        return {"inter": self.inter, "union": self.union}

    @staticmethod
    def merge(states):
        return {"inter": sum(s["inter"] for s in states), "union": sum(s["union"] for s in states)}

    @staticmethod
    def compute(state):
        return {"IoU_fg": 100.0 * state["inter"] / state["union"]} if state["union"] else {}
