"""Fixed mask cases and the official BDD100K toolkit's scores for them (tests/data/oracle/).

    python scripts/oracle_cases.py write-cases DIR   # any python with numpy + Pillow (no toolkit)
    python scripts/oracle_cases.py expect DIR        # in a venv with `pip install bdd100k`

write-cases draws seeded ground-truth / prediction PNG pairs into DIR/{lane,sem,drv}/{gt,pred}/:
lane marking (every category, direction and style, dashed segments, near misses of 1-6 px,
empty ground truth / prediction / both, a missing prediction, bytes with stray high bits, lines on
the frame border and a 1280x720 frame drawn like the official masks: thin polylines on 255),
semantic segmentation (19 classes + 255) and drivable area (0/1/2). expect runs the toolkit's
evaluators (bdd100k.eval.lane.evaluate_lane_marking, bdd100k.eval.seg.evaluate_segmentation and
evaluate_drivable, nproc=1) on them and writes DIR/expected.json with the toolkit's version. The
toolkit is imported only there: paf_ray never depends on it.

Regenerate the fixture (the toolkit in a throw-away venv):

    python3 -m venv /tmp/bdd_oracle && /tmp/bdd_oracle/bin/pip install bdd100k
    rm -rf tests/data/oracle && python scripts/oracle_cases.py write-cases tests/data/oracle
    /tmp/bdd_oracle/bin/python scripts/oracle_cases.py expect tests/data/oracle
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("lane", "sem", "drv")
BACKGROUND = 255


def lane_byte(category: int, direction: int = 0, style: int = 0) -> int:
    """The official lane byte (bdd100k/label/to_mask.py set_lane_color): bit 5 direction, bit 4 style."""
    return category + (direction << 5) + (style << 4)


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L").save(path, optimize=True)


def _blank(w: int, h: int) -> Image.Image:
    return Image.new("L", (w, h), BACKGROUND)


def _line(img: Image.Image, pts, value: int, width: int = 1) -> None:
    ImageDraw.Draw(img).line([tuple(map(float, p)) for p in pts], fill=value, width=width)


def _dashed(img: Image.Image, p0, p1, value: int, width: int, dash: float, gap: float, phase: float = 0.0) -> None:
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    s = -phase
    while s < length:
        a, b = max(s, 0.0), min(s + dash, length)
        if b > a:
            _line(img, [(x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length),
                        (x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length)], value, width)
        s += dash + gap


# ----------------------------------------------------------------------------- lane cases


def lane_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    cases: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    # every category, parallel and vertical, solid and dashed; the prediction moves, relabels or drops some
    w, h = 160, 96
    gt, pd = _blank(w, h), _blank(w, h)
    for c in range(8):
        x = 8 + c * 18
        _line(gt, [(x, 10), (x + 6, 90)], lane_byte(c, 0, c % 2), 1 + c % 3)
        shift = (0, 1, 2, 3, -2, 5, 0, 1)[c]
        cat = (c, c, 3, c, c, 7, c, 6)[c]  # double white -> double yellow, single other -> single yellow, ...
        if c != 4:  # the road curb is missed
            _line(pd, [(x + shift, 10), (x + 6 + shift, 90)], lane_byte(cat, 0, (c + (c == 6)) % 2), 1 + c % 3)
    _line(gt, [(4, 30), (150, 34)], lane_byte(0, 1, 0), 2)  # a vertical crosswalk edge
    _line(pd, [(4, 32), (150, 36)], lane_byte(0, 1, 1), 2)
    _line(pd, [(20, 70), (60, 72)], lane_byte(6, 1, 0), 1)  # a stop line that is not there
    cases["lane_00_all_classes"] = (np.asarray(gt), np.asarray(pd))

    # dashed segments: the prediction's dashes are out of phase, or one continuous line
    w, h = 128, 72
    gt, pd = _blank(w, h), _blank(w, h)
    _dashed(gt, (10, 70), (50, 5), lane_byte(6, 0, 1), 2, dash=9, gap=7)
    _dashed(pd, (10, 70), (50, 5), lane_byte(6, 0, 1), 2, dash=9, gap=7, phase=6)
    _dashed(gt, (70, 70), (90, 5), lane_byte(7, 0, 1), 1, dash=5, gap=5)
    _line(pd, [(71, 70), (91, 5)], lane_byte(7, 0, 1), 1)
    _dashed(gt, (110, 70), (100, 5), lane_byte(2, 0, 1), 3, dash=12, gap=4)
    _dashed(pd, (110, 70), (100, 5), lane_byte(2, 0, 0), 2, dash=12, gap=4, phase=2)
    cases["lane_01_dashed"] = (np.asarray(gt), np.asarray(pd))

    # near misses: one category per offset, straight and diagonal (|d| = 1, sqrt 2, 2, 3, 4, 5 (3-4-5), 5.66, 6)
    w, h = 120, 80
    gt, pd = _blank(w, h), _blank(w, h)
    offsets = ((1, 0), (1, 1), (0, 2), (3, 0), (0, 4), (3, 4), (4, 4), (6, 0))
    for c, (dx, dy) in enumerate(offsets):
        x = 6 + c * 14
        _line(gt, [(x, 8), (x, 40)], lane_byte(c, 0, 0), 1)
        _line(pd, [(x + dx, 8 + dy), (x + dx, 40 + dy)], lane_byte(c, 0, 0), 1)
    for c, d in enumerate((1, 2, 3, 5)):  # horizontal lines, vertical offsets
        y = 50 + c * 7
        _line(gt, [(10, y), (100, y)], lane_byte(c + 4, 1, 1), 1)
        _line(pd, [(10, y + d), (100, y + d)], lane_byte(c + 4, 1, 1), 1)
    cases["lane_02_near_misses"] = (np.asarray(gt), np.asarray(pd))

    w, h = 96, 64
    lines = _blank(w, h)
    _line(lines, [(5, 60), (40, 5)], lane_byte(6, 0, 0), 2)
    _line(lines, [(90, 60), (55, 5)], lane_byte(3, 0, 0), 1)
    empty = np.full((h, w), BACKGROUND, np.uint8)
    cases["lane_03_empty_gt"] = (empty, np.asarray(lines))
    cases["lane_04_empty_pred"] = (np.asarray(lines), empty.copy())
    cases["lane_05_both_empty"] = (empty.copy(), empty.copy())
    cases["lane_06_missing_pred"] = (np.asarray(lines), None)  # the toolkit scores it against zeros

    # lines on the frame border (dilation must treat the outside as empty)
    w, h = 80, 48
    gt, pd = _blank(w, h), _blank(w, h)
    _line(gt, [(0, 0), (79, 0)], lane_byte(4, 0, 0), 1)
    _line(pd, [(0, 1), (79, 2)], lane_byte(4, 0, 0), 1)
    _line(gt, [(79, 0), (79, 47)], lane_byte(5, 1, 1), 1)
    _line(pd, [(77, 0), (78, 47)], lane_byte(5, 1, 1), 1)
    _line(gt, [(0, 47), (40, 47)], lane_byte(0, 1, 0), 1)
    _line(pd, [(0, 47), (0, 20)], lane_byte(0, 1, 0), 1)
    cases["lane_07_border"] = (np.asarray(gt), np.asarray(pd))

    # stray bytes: high bits set, non-official values, sprinkled noise
    w, h = 64, 48
    gt = _blank(w, h)
    _line(gt, [(5, 40), (30, 5)], lane_byte(7, 0, 1), 2)
    _line(gt, [(60, 40), (35, 5)], lane_byte(1, 1, 0), 1)
    pd = np.asarray(gt).copy()
    noise = rng.random((h, w)) < 0.05
    pd[noise] = rng.integers(0, 256, int(noise.sum()), dtype=np.uint8)
    on = pd != BACKGROUND
    pd[on & (rng.random((h, w)) < 0.5)] |= 0b11000000
    cases["lane_08_stray_bytes"] = (np.asarray(gt), pd)

    # random frames: random polylines of random attributes, predictions jittered and relabelled
    for k in range(4):
        w, h = 128, 72
        gt, pd = _blank(w, h), _blank(w, h)
        for _ in range(int(rng.integers(2, 7))):
            c, d, s = int(rng.integers(8)), int(rng.integers(2)), int(rng.integers(2))
            pts = rng.uniform([0, 0], [w, h], (int(rng.integers(2, 4)), 2))
            width = int(rng.integers(1, 4))
            _line(gt, pts, lane_byte(c, d, s), width)
            if rng.random() < 0.85:
                jit = pts + rng.normal(0, 1.5, pts.shape)
                if rng.random() < 0.2:
                    c = int(rng.integers(8))
                if rng.random() < 0.15:
                    s = 1 - s
                _line(pd, jit, lane_byte(c, d, s), int(rng.integers(1, 4)))
        cases[f"lane_1{k}_random"] = (np.asarray(gt), np.asarray(pd))

    cases["lane_20_real_shaped"] = _real_shaped_lane(rng)
    return cases


def _real_shaped_lane(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1280x720 like the official masks: 255 background, polylines of 2-3 px converging ahead."""
    w, h = 1280, 720
    vx, vy = 650.0, 380.0
    gt, pd = _blank(w, h), _blank(w, h)

    def ground(x_bottom: float, t: float) -> tuple[float, float]:  # t=0 at the bottom edge, 1 at the horizon
        return x_bottom + (vx - x_bottom) * t, h + (vy - h) * t

    lanes = [  # x at the bottom edge, category, style
        (-260.0, 4, 0),   # road curb, left
        (-120.0, 6, 0),   # road edge, single white solid
        (310.0, 3, 0),    # double yellow, two lines
        (340.0, 3, 0),
        (760.0, 6, 1),    # single white dashed
        (1230.0, 6, 0),
        (1420.0, 4, 0),   # road curb, right
    ]
    for x, c, s in lanes:
        p0, p1 = ground(x, 0.0), ground(x, 0.93)
        width = 3 if c != 4 else 2
        _line(gt, [p0, p1], lane_byte(c, 0, s), width)
        # the prediction: the far end bends a few px, the width differs, the dashed line is found as dashes
        q1 = (p1[0] + rng.normal(0, 3), p1[1] + rng.normal(0, 2))
        if s == 1:
            _dashed(pd, (p0[0] + 2, p0[1]), q1, lane_byte(c, 0, s), 2, dash=60, gap=25)
        elif c == 4 and x > 0:
            continue  # the right curb is missed
        else:
            _line(pd, [(p0[0] + rng.normal(0, 2), p0[1]), q1], lane_byte(c, 0, s), 2)
    for y, c in ((560.0, 0), (600.0, 0), (640.0, 6)):  # crosswalk edges and a stop line, vertical
        t = (h - y) / (h - vy)
        x0, _ = ground(-120.0, t)
        x1, _ = ground(1230.0, t)
        _line(gt, [(x0, y), (x1, y)], lane_byte(c, 1, 0), 3)
        _line(pd, [(x0 + 15, y + 2), (x1 - 40, y + 3)], lane_byte(c, 1, 0), 2)
    _line(pd, [(200, 700), (420, 520)], lane_byte(7, 0, 1), 2)  # a false single yellow
    return np.asarray(gt), np.asarray(pd)


# ----------------------------------------------------------------------------- sem / drivable cases


def sem_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    cases: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    w, h = 96, 64
    absent = (16, 3)  # train and wall never in the ground truth
    present = [c for c in range(19) if c not in absent]
    for k in range(5):
        gt = np.full((h, w), present[k % len(present)], np.uint8)
        for _ in range(14):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 6))
            gt[y0:y0 + int(rng.integers(4, 30)), x0:x0 + int(rng.integers(6, 40))] = rng.choice(present)
        gt[rng.random((h, w)) < 0.03] = BACKGROUND
        gt[:, :3] = BACKGROUND
        pred = np.roll(gt, int(rng.integers(-2, 3)), axis=int(rng.integers(2))).copy()
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 6))
            pred[y0:y0 + 10, x0:x0 + 14] = rng.integers(0, 19)
        pred[rng.random((h, w)) < 0.05] = rng.integers(0, 19)
        pred[10:14, 40:44] = absent[0]  # an absent class predicted
        pred[20, 10:30] = 255  # out-of-range predictions count as wrong
        pred[21, 10:30] = 200
        cases[f"sem_{k:02d}"] = (gt, pred)
    gt = cases["sem_00"][0].copy()
    gt[:, 50:] = 18
    cases["sem_05_missing_pred"] = (gt, None)
    return cases


def drv_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    cases: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    w, h = 96, 64
    for k in range(5):
        img = Image.new("L", (w, h), 2)
        d = ImageDraw.Draw(img)
        vx, vy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.5)
        lanes = sorted(rng.uniform(-60, 160, 3))
        d.polygon([(lanes[0], h), (lanes[1], h), (vx - 2, vy), (vx - 4, vy)], fill=1)
        d.polygon([(lanes[1], h), (lanes[2], h), (vx + 3, vy + 4), (vx - 2, vy + 4)], fill=0)
        gt = np.asarray(img).copy()
        pimg = Image.new("L", (w, h), 2)
        pd_ = ImageDraw.Draw(pimg)
        j = rng.normal(0, 4, 4)
        pd_.polygon([(lanes[0] + j[0], h), (lanes[1] + j[1], h), (vx, vy + j[2]), (vx - 5, vy)], fill=1)
        pd_.polygon([(lanes[1] + j[1], h), (lanes[2] + j[3], h), (vx + 4, vy + 3), (vx - 3, vy + 5)], fill=0)
        pred = np.asarray(pimg).copy()
        if k == 1:
            pred[gt == 2] = 0  # background painted as direct: free in the official 2-class mIoU
        if k == 2:
            gt[:4, :] = BACKGROUND  # a few unlabelled pixels
            pred[30, :] = 3  # an out-of-range prediction
        if k == 3:
            gt[gt == 1] = 2  # no alternative area in this frame
        cases[f"drv_{k:02d}"] = (gt, pred)
    cases["drv_05_missing_pred"] = (cases["drv_00"][0].copy(), None)
    return cases


# ----------------------------------------------------------------------------- the two modes


def write_cases(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        sys.exit(f"oracle_cases: {out} is not empty; remove it first")
    for task, make, seed in (("lane", lane_cases, 1), ("sem", sem_cases, 2), ("drv", drv_cases, 3)):
        for stem, (gt, pred) in make(np.random.default_rng([2026, seed])).items():
            _save(os.path.join(out, task, "gt", stem + ".png"), gt)
            if pred is not None:
                _save(os.path.join(out, task, "pred", stem + ".png"), pred)
        # a prediction without ground truth is ignored by the toolkit
        _save(os.path.join(out, task, "pred", f"{task}_99_no_gt.png"), np.zeros((8, 8), np.uint8))
    print(f"wrote the cases to {out}")


def _paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".png"))


def _plain(obj):
    """numpy scalars/arrays -> JSON numbers/lists (NaN -> None)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def expect(folder: str) -> None:
    import importlib.metadata

    from bdd100k.eval.lane import eval_lane_per_frame, evaluate_lane_marking
    from bdd100k.eval.seg import evaluate_drivable, evaluate_segmentation

    def dump(result) -> dict:
        return result.model_dump() if hasattr(result, "model_dump") else result.dict()

    out = {"toolkit": {p: importlib.metadata.version(p) for p in ("bdd100k", "scalabel", "scikit-image", "numpy")}}
    gts = {t: _paths(os.path.join(folder, t, "gt")) for t in TASKS}
    preds = {t: _paths(os.path.join(folder, t, "pred")) for t in TASKS}
    lane = evaluate_lane_marking(gts["lane"], preds["lane"], nproc=1, with_logs=False)
    pred_by_stem = {os.path.basename(p): p for p in preds["lane"]}
    out["lane"] = {
        "result": dump(lane),
        "summary": lane.summary(),
        # F per frame: {attribute: [[F@1, F@2, F@5] per value]}, 0..1, missing prediction = ""
        "per_frame": {os.path.basename(g): eval_lane_per_frame(g, pred_by_stem.get(os.path.basename(g), ""))
                      for g in gts["lane"]},
    }
    sem = evaluate_segmentation(gts["sem"], preds["sem"], mode="sem_seg", nproc=1, with_logs=False)
    out["sem"] = {"result": dump(sem), "summary": sem.summary()}
    drv = evaluate_drivable(gts["drv"], preds["drv"], nproc=1, with_logs=False)
    out["drv"] = {"result": dump(drv), "summary": drv.summary()}
    with open(os.path.join(folder, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(_plain(out), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.join(folder, 'expected.json')} (bdd100k {out['toolkit']['bdd100k']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("write-cases", "expect"))
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    if args.mode == "write-cases":
        write_cases(args.dir)
    else:
        expect(args.dir)


if __name__ == "__main__":
    main()
