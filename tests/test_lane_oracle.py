"""paf_ray's lane, semantic and drivable scorers against the official BDD100K toolkit.

tests/data/oracle/ holds mask cases and the toolkit's scores for them (expected.json; made by
scripts/oracle_cases.py, see tests/data/NOTICE). The toolkit itself is not needed here.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest

from argparse import Namespace

from paf_ray.tasks import TASKS
from paf_ray.tasks.lane_metrics import (
    BOUND_PIXELS,
    LANE_ATTRIBUTES,
    LANE_BACKGROUND,
    LANE_CATEGORIES,
    LaneFScore,
    LaneInputError,
    decode_lane,
    encode_lane,
    frame_fscores,
)
from paf_ray.tasks.masks import read_mask_file as read_lane_mask


def _score(task: str, gt_dir: str, pred_dir: str) -> dict:
    """What `paf-ray score TASK GT PRED` computes."""
    return TASKS[task].score(Namespace(gt=gt_dir, pred=pred_dir))


def score_lane(gt_dir, pred_dir):
    return _score("lane", gt_dir, pred_dir)


def score_sem(gt_dir, pred_dir):
    return _score("sem", gt_dir, pred_dir)


def score_drv(gt_dir, pred_dir):
    return _score("drv", gt_dir, pred_dir)

ORACLE = os.path.join(os.path.dirname(__file__), "data", "oracle")
TOL = 1e-6


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(ORACLE, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


def _toolkit_lane_flat(result: dict) -> dict[str, float]:
    """The toolkit's LaneResult (per tolerance: direction, style, category, attributes, average) as our keys."""
    flat = {}
    for t in BOUND_PIXELS:
        blocks = result[f"F1_pix{t}"]
        for i, (attribute, names) in enumerate(LANE_ATTRIBUTES.items()):
            for name in names:
                flat[f"F1_pix{t}/{attribute}/{name}"] = blocks[i][name]
            flat[f"F1_pix{t}/{attribute}"] = blocks[3][attribute.upper()]
        flat[f"F1_pix{t}"] = blocks[4]["AVERAGE"]
    return flat


def test_lane_fscore_matches_toolkit(expected):
    want = _toolkit_lane_flat(expected["lane"]["result"])
    got = score_lane(os.path.join(ORACLE, "lane", "gt"), os.path.join(ORACLE, "lane", "pred"))
    assert len(want) == 3 * (1 + 3 + 12)
    for key, value in want.items():
        assert abs(got[key] - value) <= TOL, (key, got[key], value)
    assert got["missing_predictions"] == 1 and got["extra_predictions"] == 1
    # the cases are not trivial: each tolerance gives another score, none is 0 or 100
    assert 0 < got["F1_pix1"] < got["F1_pix2"] < got["F1_pix5"] < 100


def test_lane_fscore_per_frame_matches_toolkit(expected):
    gt_dir, pred_dir = os.path.join(ORACLE, "lane", "gt"), os.path.join(ORACLE, "lane", "pred")
    per_frame = expected["lane"]["per_frame"]
    assert len(per_frame) == len(os.listdir(gt_dir))
    for name, want in per_frame.items():
        gt = read_lane_mask(os.path.join(gt_dir, name))
        pred_path = os.path.join(pred_dir, name)
        pred = read_lane_mask(pred_path) if os.path.exists(pred_path) else None
        got = frame_fscores(gt, pred)
        want_rows = np.concatenate([np.asarray(want[a], float) for a in LANE_ATTRIBUTES])
        np.testing.assert_allclose(got, want_rows, atol=TOL, rtol=0, err_msg=name)


def test_lane_state_merges_like_one_pass():
    gt_dir, pred_dir = os.path.join(ORACLE, "lane", "gt"), os.path.join(ORACLE, "lane", "pred")
    names = sorted(os.listdir(gt_dir))
    one, parts = LaneFScore(), [LaneFScore(), LaneFScore(), LaneFScore()]
    for i, name in enumerate(names):
        gt = read_lane_mask(os.path.join(gt_dir, name))
        path = os.path.join(pred_dir, name)
        pred = read_lane_mask(path) if os.path.exists(path) else None
        one.update(gt, pred)
        parts[i % 3].update(gt, pred)
    states = [pickle.loads(pickle.dumps(p.state())) for p in parts]
    assert len(pickle.dumps(states[0])) < 2000  # sums and counts, no per-frame lists
    merged = LaneFScore.compute(LaneFScore.merge(states))
    whole = LaneFScore.compute(one.state())
    assert merged.keys() == whole.keys()
    for key in whole:
        assert abs(merged[key] - whole[key]) <= 1e-9, key
    assert LaneFScore.compute(LaneFScore.merge([])) == {}


def test_lane_binary_iou_is_its_own_protocol():
    gt = np.full((10, 20), LANE_BACKGROUND, np.uint8)
    pred = gt.copy()
    gt[4, 2:12] = 6  # 10 lane pixels
    pred[4, 7:17] = 0x17  # 10 predicted: 5 on the truth, 5 beside it; other attributes do not matter
    scorer = LaneFScore()
    scorer.update(gt, pred)
    out = LaneFScore.compute(scorer.state())
    assert out["IoU_fg"] == pytest.approx(100 * 5 / 15)
    assert out["Acc_fg"] == pytest.approx(50.0)
    assert out["pAcc_binary"] == pytest.approx(100 * 190 / 200)


def test_sem_scorer_matches_toolkit(expected):
    got = score_sem(os.path.join(ORACLE, "sem", "gt"), os.path.join(ORACLE, "sem", "pred"))
    want = expected["sem"]["result"]
    assert abs(got["mIoU"] - want["IoU"][1]["AVERAGE"]) <= TOL
    for name, value in want["IoU"][0].items():
        if not math.isnan(got["per_class"][name]):  # the toolkit prints 0 for classes absent from the GT
            assert abs(got["per_class"][name] - value) <= TOL, name
    assert abs(got["pAcc"] - want["pAcc"]) <= TOL
    assert abs(got["fIoU"] - want["fIoU"]) <= TOL
    assert math.isnan(got["per_class"]["train"]) and got["missing_predictions"] == 1


def test_drv_scorer_matches_toolkit(expected):
    got = score_drv(os.path.join(ORACLE, "drv", "gt"), os.path.join(ORACLE, "drv", "pred"))
    want = expected["drv"]["result"]
    assert abs(got["mIoU"] - want["IoU"][1]["AVERAGE"]) <= TOL
    for name in ("direct", "alternative"):
        assert abs(got["per_class"][name] - want["IoU"][0][name]) <= TOL, name
    assert abs(got["pAcc"] - want["pAcc"]) <= TOL


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    shape = (7, 9)
    fg = rng.random(shape) < 0.5
    cat, direction, style = rng.integers(0, 8, shape), rng.integers(0, 2, shape), rng.integers(0, 2, shape)
    mask = encode_lane(fg, cat, direction, style)
    assert mask.dtype == np.uint8
    assert (mask[~fg] == LANE_BACKGROUND).all()  # what the official masks write where there is no lane
    f2, c2, d2, s2 = decode_lane(mask)
    assert (f2 == fg).all()
    assert (c2[fg] == cat[fg]).all() and (d2[fg] == direction[fg]).all() and (s2[fg] == style[fg]).all()
    # every byte a foreground pixel can have, and back
    all_values = np.array([c | s << 4 | d << 5 for d in range(2) for s in range(2) for c in range(8)], np.uint8)
    f3, c3, d3, s3 = decode_lane(all_values)
    assert f3.all()
    assert (encode_lane(f3, c3, d3, s3) == all_values).all()
    assert LANE_CATEGORIES[int(decode_lane(np.array([0x23], np.uint8))[1][0])] == "double yellow"
    assert int(decode_lane(np.array([0x23], np.uint8))[2][0]) == 1  # vertical


def test_encode_decode_reject_bad_input():
    with pytest.raises(LaneInputError, match="category"):
        encode_lane(np.ones((2, 2), bool), 8, 0, 0)
    with pytest.raises(LaneInputError, match="uint8"):
        decode_lane(np.zeros((2, 2), np.int32))
    with pytest.raises(LaneInputError, match="one size"):
        frame_fscores(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
