"""Official-metric tests: box AP against the BDD100K toolkit's numbers, segmentation and drivable rules,
the training-time Evaluator, and `paf-ray score` end to end."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from paf_ray.data.bdd100k import DET_CLASSES, SEM_CLASSES
from paf_ray.eval.evaluator import Evaluator, compute_metrics, merge_states
from paf_ray.tasks import MetricsInputError, ordered
from paf_ray.tasks.det import det_metrics, frames_to_coco
from paf_ray.tasks.drv import drv_metrics
from paf_ray.tasks.masks import confusion_update, seg_metrics

TASKS3 = ordered(["det", "sem", "drv"])

PAF_RAY = os.path.join(os.path.dirname(sys.executable), "paf-ray")


def _load(testdata_dir, name):
    with open(os.path.join(testdata_dir, "scalabel-det", name), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- detection


def test_det_matches_official_toolkit(testdata_dir):
    result = det_metrics(_load(testdata_dir, "gt.json"), _load(testdata_dir, "preds.json"))
    assert result["AP"] == pytest.approx(34.029393, abs=0.01)
    assert result["AP50"] == pytest.approx(55.3239, abs=0.01)
    assert result["AP75"] == pytest.approx(34.938734, abs=0.01)
    per_class = result["per_class"]
    assert list(per_class) == list(DET_CLASSES)
    # Classes without ground truth are NaN and left out of the overall mean.
    absent = {"train", "bicycle", "traffic light", "traffic sign"}
    assert {c for c, v in per_class.items() if math.isnan(v["AP"])} == absent
    present_ap = [v["AP"] for c, v in per_class.items() if c not in absent]
    assert result["AP"] == pytest.approx(np.mean(present_ap), abs=1e-6)


def test_det_coco_conversion_follows_toolkit_rules(testdata_dir):
    gt = _load(testdata_dir, "gt.json")
    coco_gt, coco_dt, matching = frames_to_coco(list(reversed(gt)), _load(testdata_dir, "preds.json"))
    assert matching == {"unmatched_predictions": 0, "gt_without_predictions": 0}
    images = coco_gt.loadImgs(coco_gt.getImgIds())
    assert [im["id"] for im in images] == list(range(1, len(gt) + 1))
    assert [im["file_name"] for im in images] == sorted(f["name"] for f in gt)
    assert sum(a["iscrowd"] for a in coco_gt.dataset["annotations"]) == 132
    first = gt[0]["labels"][0]["box2d"]
    ann = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[1]))[0]
    assert ann["bbox"][2] == pytest.approx(first["x2"] - first["x1"] + 1)
    assert [c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())] == list(DET_CLASSES)


def test_det_empty_predictions_and_empty_gt(testdata_dir):
    gt, empty = _load(testdata_dir, "gt.json"), _load(testdata_dir, "preds_empty.json")
    # preds_empty.json holds one frame whose only label has no box2d: nothing to evaluate.
    no_preds = det_metrics(gt, empty)
    assert no_preds["AP"] == 0.0 and no_preds["per_class"]["car"]["AP"] == 0.0
    assert math.isnan(no_preds["per_class"]["train"]["AP"])
    as_gt = det_metrics(empty, _load(testdata_dir, "preds.json"))
    assert as_gt["images"] == 1 and math.isnan(as_gt["AP"])


def test_det_ignore_categories_and_legacy_names_and_unknown_category():
    box = {"x1": 100.0, "y1": 100.0, "x2": 199.0, "y2": 199.0}
    gt = [{"name": "a.jpg", "labels": [{"category": "other vehicle", "box2d": box}, {"category": "person", "box2d": box}]}]
    pred = [{"name": "a.jpg", "labels": [{"category": "car", "score": 0.9, "box2d": box}]}, {"name": "zzz.jpg", "labels": None}]
    # The car detection sits on an ignore region: neither TP nor FP, so car has no GT -> NaN.
    result = det_metrics(gt, pred)
    assert math.isnan(result["per_class"]["car"]["AP"])
    assert result["per_class"]["pedestrian"]["AP"] == 0.0  # legacy "person" is a pedestrian
    with pytest.raises(MetricsInputError, match="preds.json.*unknown category 'spaceship'"):
        det_metrics(gt, [{"name": "a.jpg", "labels": [{"category": "spaceship", "score": 1, "box2d": box}]}],
                    pred_source="preds.json")


# --------------------------------------------------------------------------- segmentation


def test_drivable_official_excludes_background_8x8_example():
    gt = np.full((8, 8), 2, np.uint8)
    gt[:3] = 0  # 24 px direct
    gt[3] = 1  # 8 px alternative, 32 px background
    pred = np.zeros((8, 8), np.uint8)  # everything "direct"
    result = drv_metrics(confusion_update(None, pred, gt, num_classes=3))
    assert result["per_class"]["direct"] == pytest.approx(75.0)
    assert result["per_class"]["alternative"] == pytest.approx(0.0)
    assert result["mIoU"] == pytest.approx(37.5)
    # Counting background shows the over-segmentation: direct 24/64, alternative 0, background 0.
    assert result["per_class3"]["direct"] == pytest.approx(37.5)
    assert result["mIoU3"] == pytest.approx(12.5)


def test_sem_miou_over_present_classes_ignore_and_out_of_range_predictions():
    gt = np.array([[0, 0, 1, 1], [255, 255, 1, 1]], np.uint8)
    pred = np.array([[0, 0, 1, 7], [5, 3, 200, 1]], np.uint8)
    conf = confusion_update(None, pred, gt, len(SEM_CLASSES))
    assert conf.shape == (20, 20) and conf.sum() == 6  # the two 255 pixels are free
    assert conf[1, 19] == 1  # predicted 200 -> the always-wrong column
    result = seg_metrics(conf, SEM_CLASSES)
    # road: 2/2 = 100; sidewalk: 2 hits of 4 GT, no other predictions -> 50; the rest absent from GT.
    assert result["per_class"]["road"] == pytest.approx(100.0)
    assert result["per_class"]["sidewalk"] == pytest.approx(50.0)
    assert math.isnan(result["per_class"]["traffic sign"])  # predicted but not in GT: left out
    assert result["mIoU"] == pytest.approx(75.0)
    assert result["pAcc"] == pytest.approx(4 / 6 * 100)


# --------------------------------------------------------------------------- training-time evaluator


def _batch_and_outputs():
    """Two images at input size 64x32 (scale 0.05 from 1280x720 frames): image 0 has det+drv, image 1 sem."""
    h, w = 32, 64
    sem = torch.full((2, h, w), 255, dtype=torch.uint8)
    sem[1, :16] = 10  # sky
    sem[1, 16:] = 0  # road
    drv = torch.full((2, h, w), 255, dtype=torch.uint8)
    drv[0, 16:] = 0
    drv[0, :16] = 2
    sem_logits = torch.zeros(2, 19, h, w)
    sem_logits[:, 0] = 1.0  # predicts road everywhere
    drv_logits = torch.zeros(2, 3, h, w)
    drv_logits[:, 0] = 1.0  # direct everywhere
    box = torch.tensor([[10.0, 10.0, 30.0, 20.0]])
    batch = {
        "name": ["a.jpg", "b.jpg"],
        "has": {"det": torch.tensor([True, False]), "sem": torch.tensor([False, True]),
                "drv": torch.tensor([True, False])},
        "targets": {
            "det": {"boxes": [box, torch.zeros(0, 4)], "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)],
                    "ignore_boxes": [torch.tensor([[40.0, 5.0, 60.0, 25.0]]), torch.zeros(0, 4)],
                    "ignore_labels": [torch.tensor([0]), torch.zeros(0, dtype=torch.int64)]},
            "sem": sem, "drv": drv},
        "scale": torch.tensor([0.05, 0.05]),
    }
    outputs = {
        "det": [
            {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0], [41.0, 5.0, 60.0, 25.0]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([2, 0])},
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        ],
        "sem": sem_logits,
        "drv": drv_logits,
    }
    return batch, outputs


def test_evaluator_states_merge_across_workers_and_compute_flat_keys():
    batch, outputs = _batch_and_outputs()
    worker_a, worker_b = Evaluator(TASKS3), Evaluator(TASKS3)
    worker_a.update(outputs, batch)
    renamed = dict(batch, name=["c.jpg", "d.jpg"])
    # The second worker ran under bf16 autocast.
    bf16 = lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t  # noqa: E731
    outputs_bf16 = {"det": [{k: bf16(v) for k, v in d.items()} for d in outputs["det"]],
                    "sem": bf16(outputs["sem"]), "drv": bf16(outputs["drv"])}
    worker_b.update(outputs_bf16, renamed)
    states = [pickle.loads(pickle.dumps(w.state())) for w in (worker_a, worker_b)]
    merged = merge_states(TASKS3, states)
    assert merged["sem"].sum() == 2 * 32 * 64
    assert [f["name"] for f in merged["det"]["gt"]] == ["a.jpg", "c.jpg"]
    # GT boxes come back in original pixels (input px / scale).
    assert merged["det"]["gt"][0]["labels"][0]["box2d"]["x2"] == pytest.approx(600.0)

    flat = compute_metrics(TASKS3, merged)
    json.dumps(flat, allow_nan=False)
    # The car matches exactly; the pedestrian detection lies on the ignore region: AP 100.
    assert flat["det/AP"] == pytest.approx(100.0)
    assert flat["det/AP/car"] == pytest.approx(100.0)
    assert "det/AP/bus" not in flat  # no GT for the class: left out, never NaN
    assert flat["sem/IoU/road"] == pytest.approx(50.0) and flat["sem/IoU/sky"] == 0.0
    assert flat["sem/mIoU"] == pytest.approx(25.0)
    # Official drivable: background GT is dropped, so direct is perfect; alternative is absent from GT.
    assert flat["drv/mIoU"] == pytest.approx(100.0) and "drv/IoU/alternative" not in flat
    assert flat["drv/IoU/direct"] == pytest.approx(100.0)
    assert flat["drv/mIoU3"] == pytest.approx(25.0)  # direct 50, background 0
    assert flat["score"] == pytest.approx((100.0 + 25.0 + flat["drv/mIoU"]) / 3)


def test_compute_without_samples_gives_finite_score():
    tasks = ordered(["det", "sem"])
    flat = compute_metrics(tasks, merge_states(tasks, [Evaluator(tasks).state()]))
    assert flat == {"score": 0.0}


# --------------------------------------------------------------------------- CLI end to end


def _run(*args):
    proc = subprocess.run([PAF_RAY, "score", *args], capture_output=True, text=True, timeout=120)
    return proc


def test_cli_score_det_json_and_table(testdata_dir):
    d = os.path.join(testdata_dir, "scalabel-det")
    proc = _run("det", os.path.join(d, "gt.json"), os.path.join(d, "preds.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "per_class"}
    assert (round(out["AP"], 2), round(out["AP50"], 2), round(out["AP75"], 2)) == (34.03, 55.32, 34.94)
    assert out["per_class"]["train"]["AP"] is None
    table = _run("det", os.path.join(d, "gt.json"), os.path.join(d, "preds.json"))
    assert table.returncode == 0 and "OVERALL" in table.stdout and "34.03" in table.stdout
    empty = _run("det", os.path.join(d, "gt.json"), os.path.join(d, "preds_empty.json"), "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout)["AP"] == 0.0


def test_cli_score_det_bad_input_names_the_file(tmp_path, testdata_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x.jpg", "labels": [{"category": "ufo", "score": 1.0,
                                                              "box2d": {"x1": 0, "y1": 0, "x2": 1, "y2": 1}}]}]))
    proc = _run("det", os.path.join(testdata_dir, "scalabel-det", "gt.json"), str(bad))
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "'ufo'" in proc.stderr


def _write_png(path, array):
    Image.fromarray(np.asarray(array, np.uint8), mode="L").save(path)


def test_cli_score_sem_and_drv_on_png_folders(tmp_path):
    gt_sem, pred_sem = tmp_path / "gt_sem", tmp_path / "pred_sem"
    gt_sem.mkdir(), pred_sem.mkdir()
    mask = np.zeros((6, 8), np.uint8)
    mask[:3] = 10  # sky above road
    _write_png(gt_sem / "f1.png", mask)
    _write_png(pred_sem / "f1.png", mask)  # perfect
    _write_png(gt_sem / "f2.png", np.full((6, 8), 13))  # car; no prediction -> all wrong
    proc = _run("sem", str(gt_sem), str(pred_sem), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["per_class"]["road"] == pytest.approx(100.0) and out["per_class"]["car"] == 0.0
    assert out["per_class"]["wall"] is None
    assert out["mIoU"] == pytest.approx(200.0 / 3)
    assert out["missing_predictions"] == 1

    gt_drv, pred_drv = tmp_path / "gt_drv", tmp_path / "pred_drv"
    gt_drv.mkdir(), pred_drv.mkdir()
    gt = np.full((8, 8), 2, np.uint8)
    gt[:3], gt[3] = 0, 1
    _write_png(gt_drv / "d.png", gt)
    _write_png(pred_drv / "d.png", np.zeros((8, 8)))
    proc = _run("drv", str(gt_drv), str(pred_drv), "--json")
    out = json.loads(proc.stdout)
    assert out["mIoU"] == pytest.approx(37.5) and out["mIoU3"] == pytest.approx(12.5)
    table = _run("drv", str(gt_drv), str(pred_drv))
    assert "mIoU3" in table.stdout and "37.50" in table.stdout


def test_cli_score_det_counts_unmatched_frames_and_refuses_non_finite_values(tmp_path, testdata_dir):
    gt = os.path.join(testdata_dir, "scalabel-det", "gt.json")
    frames = _load(testdata_dir, "preds.json")
    # three frames renamed: they match no ground truth (a wrong naming scheme), and three GT frames lack predictions
    for f in frames[:3]:
        f["name"] = "renamed-" + f["name"]
    preds = tmp_path / "renamed.json"
    preds.write_text(json.dumps(frames))
    proc = _run("det", gt, str(preds), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["unmatched_predictions"] == 3 and out["gt_without_predictions"] == 3
    table = _run("det", gt, str(preds))
    assert "matching no ground-truth frame: 3" in table.stdout and "without a prediction frame: 3" in table.stdout
    strict = _run("det", gt, str(preds), "--fail-on-unmatched")
    assert strict.returncode == 2 and "renamed.json: 3 prediction frame(s) match no ground-truth frame" in strict.stderr
    for bad_value, what in (("NaN", "score"), ("Infinity", "score"), ("-Infinity", "x1")):
        frames = _load(testdata_dir, "preds.json")
        label = frames[0]["labels"][0]
        if what == "score":
            label["score"] = float(bad_value.replace("Infinity", "inf"))
        else:
            label["box2d"]["x1"] = float("-inf")
        bad = tmp_path / f"bad_{bad_value}.json"
        bad.write_text(json.dumps(frames))
        proc = _run("det", gt, str(bad))
        assert proc.returncode == 2 and bad.name in proc.stderr and ("non-finite" in proc.stderr or "finite" in proc.stderr)


def test_lane_score_cli_on_png_folders(tmp_path):
    from paf_ray.tasks.lane_metrics import encode_lane

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    fg = np.zeros((40, 60), bool)
    fg[20, 5:55] = True  # one single white, parallel, solid line
    gt = encode_lane(fg, 6, 0, 0)
    _write_png(gt_dir / "a.png", gt)
    _write_png(pred_dir / "a.png", gt)
    proc = _run("lane", str(gt_dir), str(pred_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["F1_pix1"] == pytest.approx(100.0) and out["IoU_fg"] == pytest.approx(100.0)
    table = _run("lane", str(gt_dir), str(pred_dir))
    assert "mean (official)" in table.stdout and "YOLOP" in table.stdout
