"""Traffic object detection (`det`): boxes of 10 classes on BDD100K's 100k frames.

Labels: ``labels/det_20/det_{split}.json`` (Scalabel frames). ``other person``, ``other vehicle``
and ``trailer`` (and any box flagged ``crowd``) are ignore regions of the class they hide, never
classes. Evaluation follows the BDD100K/Scalabel toolkit (docs/bdd100k.md, "Official scoring"):
GT frames sorted by name with image ids 1..N, ``bbox = [x1, y1, x2 - x1 + 1, y2 - y1 + 1]``,
``iscrowd = crowd or ignore category``, the 10 categories in ``DET_CLASSES`` order, then a
standard ``COCOeval`` over boxes; numbers in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from paf_ray.data import bdd100k as B
from paf_ray.data.contracts import DatasetError
from paf_ray.runtime import storage
from paf_ray.tasks.base import CheckSink, FrameMap, Labels, ListingEntry, MetricsInputError, Task, TaskEvaluator
from paf_ray.tasks.det.config import DetConfig
from paf_ray.tasks.masks import finite, fmt
from paf_ray.tasks.registry import TASKS
from paf_ray.viz import draw_boxes

# The twelve COCO summary numbers, in COCOeval.stats order.
DET_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# The subset that goes into the flat training metrics as det/<name>.
DET_FLAT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the frame (labels use inclusive x2/y2)


# --------------------------------------------------------------------------- labels


@dataclass
class DetTargets:
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignore_boxes: list[list[float]] = field(default_factory=list)
    ignore_labels: list[int] = field(default_factory=list)  # the class each ignore region hides

    def to_json(self) -> dict:
        return {"boxes": self.boxes, "labels": self.labels, "ignore_boxes": self.ignore_boxes,
                "ignore_labels": self.ignore_labels}


def load_det_json(path: str) -> list[dict]:
    """Read a det_20 file; DatasetError naming the file when it is not a JSON list of frames."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    try:
        frames = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: malformed JSON: {type(e).__name__}: {str(e)[:120]}") from None
    if not isinstance(frames, list):
        raise DatasetError(f"{path}: expected a JSON list of frames, got {type(frames).__name__}")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
            raise DatasetError(f"{path}: frame {i}: expected an object with a string 'name'")
    return frames


def det_targets(frame: dict, source: str) -> tuple[DetTargets, list[str]]:
    """Boxes, class indices and ignore boxes of one det_20 frame, plus the problems found.

    A problem is a string naming the file, frame, label and field. Labels without ``box2d`` are
    skipped (they are not boxes); a missing or null ``labels`` is empty.
    """
    out, problems = DetTargets(), []
    name = frame.get("name")
    labels = frame.get("labels") or []
    if not isinstance(labels, list):
        return out, [f"{source}: frame {name!r}: 'labels' must be a list, got {type(labels).__name__}"]
    for i, label in enumerate(labels):
        where = f"{source}: frame {name!r} label {i}"
        if not isinstance(label, dict):
            problems.append(f"{where}: expected an object")
            continue
        if isinstance(label.get("id"), (str, int)):
            where += f" (id {str(label['id'])[:40]!r})"
        box = label.get("box2d")
        if box is None:
            continue
        category = label.get("category")
        mapped = B.det_category_to_index(category) if isinstance(category, str) else None
        if mapped is None:
            problems.append(f"{where}: unknown category {str(category)[:40]!r}")
            continue
        if not isinstance(box, dict):
            problems.append(f"{where}: box2d must be an object with x1, y1, x2, y2")
            continue
        coords = []
        for key in ("x1", "y1", "x2", "y2"):
            v = box.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{where}: box2d.{key} is not a number ({str(v)[:40]!r})")
                break
            if not math.isfinite(v):
                problems.append(f"{where}: box2d.{key} is {v}")
                break
            coords.append(float(v))
        if len(coords) < 4:
            continue
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            problems.append(f"{where}: box2d has x2 < x1 or y2 < y1 ({x1}, {y1}, {x2}, {y2})")
            continue
        cls, ignored = mapped
        attrs = label.get("attributes") or {}
        if ignored or (isinstance(attrs, dict) and attrs.get("crowd") is True):
            out.ignore_boxes.append(coords)
            out.ignore_labels.append(cls)
        else:
            out.boxes.append(coords)
            out.labels.append(cls)
    return out, problems


def box_problems(boxes, width: int, height: int, where: str) -> list[str]:
    """Boxes (x1, y1, x2, y2) that lie outside a width x height image."""
    problems = []
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE:
            problems.append(f"{where}: box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image")
    return problems


# --------------------------------------------------------------------------- the official metric


def _box2d_to_bbox(box2d: Any, where: str) -> list[float]:
    try:
        x1, y1, x2, y2 = (float(box2d[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        raise MetricsInputError(f"{where}: box2d needs numeric x1, y1, x2, y2, got {str(box2d)[:80]}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise MetricsInputError(f"{where}: box2d has a non-finite coordinate ({x1}, {y1}, {x2}, {y2})")
    # The toolkit counts pixels inclusively: +1 on width and height.
    return [x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0]


def _frame_name(frame: Any, source: str, i: int) -> str:
    if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
        raise MetricsInputError(f"{source}: frame {i}: expected an object with a string 'name'")
    return frame["name"]


def _frame_annotations(frame: dict, source: str, is_pred: bool) -> list[dict]:
    """Labels of one frame as partial COCO annotations (no ids yet); labels without box2d are skipped."""
    anns = []
    labels = frame.get("labels") or []
    if not isinstance(labels, list):
        raise MetricsInputError(f"{source}: frame {frame['name']!r}: 'labels' must be a list")
    for j, label in enumerate(labels):
        where = f"{source}: frame {frame['name']!r} label {j}"
        if not isinstance(label, dict):
            raise MetricsInputError(f"{where}: expected an object, got {type(label).__name__}")
        if label.get("box2d") is None:
            continue
        category = label.get("category")
        mapped = B.det_category_to_index(category) if isinstance(category, str) else None
        if mapped is None:
            raise MetricsInputError(
                f"{where}: unknown category {str(category)[:40]!r} (known: {', '.join(B.DET_CLASSES)}, "
                "ignore categories other person / other vehicle / trailer, and the 2018 names)")
        index, ignored = mapped
        bbox = _box2d_to_bbox(label["box2d"], where)
        ann = {"category_id": index + 1, "bbox": bbox, "area": bbox[2] * bbox[3]}
        if is_pred:
            score = label.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise MetricsInputError(f"{where}: a prediction needs a finite numeric 'score', got {str(score)[:40]}")
            ann["score"] = float(score)
        else:
            crowd = bool((label.get("attributes") or {}).get("crowd", False))
            ann["iscrowd"] = int(crowd or ignored)
        anns.append(ann)
    return anns


def _make_coco(images: list[dict], annotations: list[dict]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": name} for i, name in enumerate(B.DET_CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def frames_to_coco(gt_frames: Sequence[dict], pred_frames: Sequence[dict], gt_source: str = "ground truth",
                   pred_source: str = "predictions"):
    """Scalabel/BDD100K frames -> (coco_gt, coco_dt, matching), the toolkit's way.

    GT frames are sorted by name and get image ids 1..N; prediction frames are aligned by name
    (a GT frame without predictions has none; predictions for unknown frames are dropped).
    `matching` counts both: {"unmatched_predictions", "gt_without_predictions"}.
    """
    names = [_frame_name(f, gt_source, i) for i, f in enumerate(gt_frames)]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise MetricsInputError(f"{gt_source}: duplicate frame names {dup}")
    order = sorted(range(len(gt_frames)), key=lambda i: names[i])
    image_id = {names[i]: k + 1 for k, i in enumerate(order)}
    images = [{"id": image_id[names[i]], "file_name": names[i], "width": B.IMAGE_WIDTH, "height": B.IMAGE_HEIGHT}
              for i in order]
    gt_anns = []
    for i in order:
        for ann in _frame_annotations(gt_frames[i], gt_source, is_pred=False):
            ann.update(id=len(gt_anns) + 1, image_id=image_id[names[i]])
            gt_anns.append(ann)
    dt_anns, predicted, unmatched = [], set(), 0
    for i, frame in enumerate(pred_frames):
        name = _frame_name(frame, pred_source, i)
        anns = _frame_annotations(frame, pred_source, is_pred=True)  # checked even when dropped, as the toolkit does
        if name not in image_id:
            unmatched += 1
            continue
        predicted.add(name)
        for ann in anns:
            ann.update(id=len(dt_anns) + 1, image_id=image_id[name], iscrowd=0)
            dt_anns.append(ann)
    matching = {"unmatched_predictions": unmatched, "gt_without_predictions": len(set(names) - predicted)}
    return _make_coco(images, gt_anns), _make_coco(images, dt_anns), matching


def _summary(coco_eval, k) -> dict[str, float]:
    """The twelve COCO numbers (percent, NaN where undefined) over categories `k` of an accumulated eval."""
    p = coco_eval.params
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    recall = coco_eval.eval["recall"]  # [T, K, A, M]
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
    max_det = {m: i for i, m in enumerate(p.maxDets)}
    iou = {t: i for i, t in enumerate(np.round(p.iouThrs, 2))}

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(np.mean(valid)) * 100.0 if valid.size else math.nan

    def ap(iou_thr=None, area_lbl="all", md=100):
        s = precision[:, :, k, area[area_lbl], max_det[md]]
        return mean(s if iou_thr is None else s[iou[iou_thr]])

    def ar(area_lbl="all", md=100):
        return mean(recall[:, k, area[area_lbl], max_det[md]])

    return {"AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75), "APs": ap(area_lbl="small"), "APm": ap(area_lbl="medium"),
            "APl": ap(area_lbl="large"), "AR1": ar(md=1), "AR10": ar(md=10), "AR100": ar(), "ARs": ar("small"),
            "ARm": ar("medium"), "ARl": ar("large")}


def det_metrics(gt_frames: Sequence[dict], pred_frames: Sequence[dict], gt_source: str = "ground truth",
                pred_source: str = "predictions") -> dict[str, Any]:
    """Box AP with BDD100K rules: the twelve numbers (percent) overall and ``per_class``, and how the
    prediction frames matched the ground truth.

    Classes without ground truth are NaN and left out of the overall numbers (as COCOeval
    does); with no predictions, classes that have ground truth score 0.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt, coco_dt, matching = frames_to_coco(gt_frames, pred_frames, gt_source, pred_source)
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    coco_eval.params.catIds = list(range(1, len(B.DET_CLASSES) + 1))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    result: dict[str, Any] = _summary(coco_eval, slice(None))
    result["per_class"] = {name: _summary(coco_eval, [i]) for i, name in enumerate(B.DET_CLASSES)}
    result["images"] = len(coco_gt.getImgIds())
    result.update(matching)
    return result


def read_frames(path: str) -> list[dict]:
    """Frames of a Scalabel/BDD100K detection file (a JSON list, or a dataset object with "frames")."""
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise MetricsInputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MetricsInputError(f"{path}: not valid JSON: {type(e).__name__}: {str(e)[:120]}") from None
    if isinstance(data, dict) and isinstance(data.get("frames"), list):
        data = data["frames"]
    if not isinstance(data, list):
        raise MetricsInputError(f"{path}: expected a list of frames (or an object with 'frames')")
    return data


def _labels_of(boxes, classes, scale: float, scores=None, crowd: bool = False) -> list[dict]:
    """Box arrays (network pixels) -> Scalabel labels in frame pixels."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / float(scale)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    labels = []
    for j, (box, cls) in enumerate(zip(boxes, classes)):
        label: dict[str, Any] = {"category": B.DET_CLASSES[int(cls)],
                                 "box2d": {"x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3])}}
        if scores is not None:
            label["score"] = float(scores[j])
        if crowd:
            label["attributes"] = {"crowd": True}
        labels.append(label)
    return labels


# --------------------------------------------------------------------------- the task


class FrameEvaluator(TaskEvaluator):
    """Keeps the worker's ground-truth and predicted frames (frame pixels) for one COCOeval at the end."""

    def __init__(self):
        self.gt_frames: list[dict] = []
        self.pred_frames: list[dict] = []

    def update(self, output, batch: dict) -> None:
        has = batch["has"]["det"].numpy().astype(bool)
        target = batch["targets"]["det"]
        scales = batch["scale"].numpy().reshape(-1)
        for i in np.flatnonzero(has):
            scale, det = float(scales[i]), output[i]
            gt = _labels_of(target["boxes"][i].numpy(), target["labels"][i].numpy(), scale)
            gt += _labels_of(target["ignore_boxes"][i].numpy(), target["ignore_labels"][i].numpy(), scale, crowd=True)
            self.gt_frames.append({"name": batch["name"][i], "labels": gt})
            self.pred_frames.append({"name": batch["name"][i], "labels": _labels_of(
                det["boxes"].float().cpu().numpy(), det["labels"].cpu().numpy(), scale, det["scores"].float().cpu().numpy())})

    def state(self) -> dict:
        return {"gt": list(self.gt_frames), "pred": list(self.pred_frames)}


class Detection(Task):
    name = "det"
    title = "traffic object detection (10 classes)"
    classes = B.DET_CLASSES
    prompt_names = B.DET_CLASSES
    image_set = B.DET_IMAGE_SET
    headline = "det/AP"
    table_metrics = ("det/AP", "det/AP50", "det/AP75", "det/AR100")
    config = DetConfig
    draw_order = 10  # boxes over the masks
    export_kinds = {"boxes": "boxes", "scores": "scores", "labels": "labels"}

    def check(self, section: DetConfig, model_cfg) -> list[tuple[str, str]]:
        problems = []
        if section.kind == "faster_rcnn" and len(section.anchor_sizes) != 5:
            problems.append(("model.heads.det.anchor_sizes",
                             f"Faster R-CNN needs 5 sizes (P2-P6), got {len(section.anchor_sizes)}"))
        if section.kind == "fcos" and model_cfg.fpn_channels % 32:
            problems.append(("model.fpn_channels", f"FCOS needs a multiple of 32, got {model_cfg.fpn_channels}"))
        return problems

    # ----------------------------------------------------------------- index and decode

    def listing(self, split: str) -> list[ListingEntry]:
        return [ListingEntry(B.DET_LABELS.format(split=split), "file")]

    def read_labels(self, root: str, split: str, listing) -> Labels:
        path = B.DET_LABELS.format(split=split)
        labels = Labels({}, {}, [])
        if not listing.get(path):
            return labels
        source = storage.join(root, path)
        for frame in load_det_json(source):
            stem = frame["name"].rsplit(".", 1)[0]
            targets, problems = det_targets(frame, source)
            if problems:
                labels.problems.append((stem, problems[0]))
                continue
            labels.by_stem[stem] = targets.to_json()
            if isinstance(frame.get("attributes"), dict):
                labels.attributes[stem] = dict(frame["attributes"])
        return labels

    def decode(self, label: dict, data, size, where: str) -> dict:
        boxes = np.asarray(label.get("boxes") or [], np.float32).reshape(-1, 4)
        ignore = np.asarray(label.get("ignore_boxes") or [], np.float32).reshape(-1, 4)
        problems = box_problems(np.concatenate([boxes, ignore]), size[0], size[1], f"{where}: det labels")
        if problems:
            raise DatasetError(problems[0])
        return {"boxes": boxes, "labels": np.asarray(label.get("labels") or [], np.int64).reshape(-1),
                "ignore_boxes": ignore, "ignore_labels": np.asarray(label.get("ignore_labels") or [], np.int64).reshape(-1)}

    def transform(self, target, geometry) -> dict[str, np.ndarray]:
        if target is None:
            target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                      "ignore_boxes": np.zeros((0, 4), np.float32), "ignore_labels": np.zeros(0, np.int64)}
        boxes, labels = geometry.boxes(target["boxes"], target["labels"])
        ignore, ignore_labels = geometry.boxes(target["ignore_boxes"], target["ignore_labels"])
        return {"det_boxes": boxes, "det_labels": labels, "det_ignore_boxes": ignore, "det_ignore_labels": ignore_labels}

    def image_labels(self, target: dict) -> np.ndarray:
        present = np.zeros(len(self.classes), np.float32)
        present[np.asarray(target["labels"], np.int64)] = 1.0
        return present

    # ----------------------------------------------------------------- torch side

    def collate(self, columns: dict[str, Any], good: list[int]) -> dict:
        import torch

        def ragged(key, dtype, width):
            return [torch.from_numpy(np.asarray(columns[key][i], dtype).reshape(-1, *width).copy()) for i in good]

        return {"boxes": ragged("det_boxes", np.float32, (4,)), "labels": ragged("det_labels", np.int64, ()),
                "ignore_boxes": ragged("det_ignore_boxes", np.float32, (4,)),
                "ignore_labels": ragged("det_ignore_labels", np.int64, ())}

    def select(self, target: dict, idx) -> dict:
        keep = idx.tolist()
        return {k: [v[i] for i in keep] for k, v in target.items()}

    def build_head(self, section: DetConfig, channels: int, num_levels: int, extra_channels: int):
        from paf_ray.tasks.det.heads import DetHead

        return DetHead(channels, len(self.classes), section)

    def pyramid_extra(self, section: DetConfig, channels: int):
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        return LastLevelMaxPool() if section.kind == "faster_rcnn" else LastLevelP6P7(channels, channels)

    def alignment_loss(self, score_map, target: dict):
        """Image-level multi-label BCE: each class's best-matching pixel against whether the frame has it."""
        import torch
        import torch.nn.functional as F

        wanted = torch.zeros(score_map.shape[0], score_map.shape[1], device=score_map.device)
        for i, labels in enumerate(target["labels"]):
            if labels.numel():
                wanted[i, labels.to(score_map.device)] = 1.0
        return F.binary_cross_entropy_with_logits(score_map.float().flatten(2).amax(dim=-1), wanted)

    # ----------------------------------------------------------------- evaluate

    def evaluator(self, section) -> FrameEvaluator:
        return FrameEvaluator()

    def merge(self, states: list[dict]) -> dict:
        """Concatenate the workers' frames; a frame seen on two workers (evaluated twice) is kept once."""
        merged, seen = {"gt": [], "pred": []}, set()
        for s in states:
            for gt, pred in zip(s["gt"], s["pred"]):
                if gt["name"] not in seen:
                    seen.add(gt["name"])
                    merged["gt"].append(gt)
                    merged["pred"].append(pred)
        return merged

    def compute(self, state: dict) -> dict[str, float]:
        if not state["gt"]:
            return {}
        det = det_metrics(state["gt"], state["pred"])
        out = {f"det/{k}": det[k] for k in DET_FLAT_METRICS}
        out.update({f"det/AP/{c}": v["AP"] for c, v in det["per_class"].items()})
        return {k: float(v) for k, v in out.items() if finite(v)}

    # ----------------------------------------------------------------- predict, write, draw, export

    def postprocess(self, output: dict, scale: float, frame_hw, score_thr: float) -> dict:
        h, w = frame_hw
        keep = output["scores"] >= score_thr
        boxes = output["boxes"][keep].float().cpu().numpy() / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return {"boxes": boxes.astype(np.float32), "scores": output["scores"][keep].float().cpu().numpy(),
                "labels": output["labels"][keep].cpu().numpy().astype(np.int64)}

    def frame_files(self, stem: str, prediction: dict) -> dict[str, bytes]:
        return {}

    def frame_record(self, name: str, prediction: dict) -> dict:
        """One BDD100K/Scalabel prediction frame: {name, labels: [{id, category, score, box2d}]}."""
        labels = []
        for j, (box, score, label) in enumerate(zip(prediction["boxes"], prediction["scores"], prediction["labels"])):
            x1, y1, x2, y2 = (float(v) for v in box)
            labels.append({"id": str(j), "category": B.DET_CLASSES[int(label)], "score": float(score),
                           "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}})
        return {"name": name, "labels": labels}

    def final_files(self, records: list[dict]) -> dict[str, bytes]:
        return {"det.json": json.dumps(sorted(records, key=lambda fr: fr["name"])).encode("utf-8")}

    def draw(self, image: np.ndarray, prediction: dict) -> np.ndarray:
        tags = [f"{B.DET_CLASSES[int(c)]} {float(s):.2f}" for c, s in zip(prediction["labels"], prediction["scores"])]
        colours = [B.DET_PALETTE[int(c)] for c in prediction["labels"]]
        return draw_boxes(image, prediction["boxes"], tags, colours)

    def export_outputs(self, outputs, frame: FrameMap):
        import torch

        det = outputs[0]
        fh, fw = frame.frame_hw
        boxes = det["boxes"] / frame.scale
        boxes = torch.stack([boxes[:, 0].clamp(0, fw), boxes[:, 1].clamp(0, fh),
                             boxes[:, 2].clamp(0, fw), boxes[:, 3].clamp(0, fh)], dim=1)
        return {"boxes": boxes.float(), "scores": det["scores"].float(), "labels": det["labels"].to(torch.int64)}

    # ----------------------------------------------------------------- score and check

    def add_score_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("gt", help="ground truth: Scalabel/BDD100K JSON (a list of frames)")
        parser.add_argument("pred", help="predictions: the same format, each label with a score")
        parser.add_argument("--fail-on-unmatched", action="store_true",
                            help="exit non-zero when a prediction frame matches no ground-truth frame or a "
                                 "ground-truth frame has no prediction frame")

    def score(self, args: argparse.Namespace) -> dict:
        result = det_metrics(read_frames(args.gt), read_frames(args.pred), args.gt, args.pred)
        if getattr(args, "fail_on_unmatched", False) and (result["unmatched_predictions"] or result["gt_without_predictions"]):
            raise MetricsInputError(
                f"{args.pred}: {result['unmatched_predictions']} prediction frame(s) match no ground-truth frame of "
                f"{args.gt}, and {result['gt_without_predictions']} ground-truth frame(s) have no prediction frame")
        return result

    def score_table(self, result: dict) -> str:
        cols = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
        lines = [f"{'class':<16}" + "".join(f"{c:>8}" for c in cols)]
        for name, values in result["per_class"].items():
            lines.append(f"{name:<16}" + "".join(f"{fmt(values[c]):>8}" for c in cols))
        lines.append(f"{'OVERALL':<16}" + "".join(f"{fmt(result[c]):>8}" for c in cols))
        lines.append(f"({result['images']} images; '-' = no ground truth for the class)")
        lines.append(f"prediction frames matching no ground-truth frame: {result['unmatched_predictions']}; "
                     f"ground-truth frames without a prediction frame: {result['gt_without_predictions']}")
        return "\n".join(lines)

    def score_json(self, result: dict) -> dict:
        keep = (*DET_METRIC_NAMES, "per_class", "images", "unmatched_predictions", "gt_without_predictions")
        return {k: result[k] for k in keep}

    def check_labels(self, root: str, split: str, image_sizes, report: CheckSink) -> None:
        path = storage.join(root, B.DET_LABELS.format(split=split))
        if not storage.exists(path):
            if image_sizes:
                report.warning(path, "no detection labels for this split")
            return
        try:
            frames = load_det_json(path)
        except DatasetError as e:
            report.error(path, str(e).removeprefix(path + ": "))
            return
        seen = set()
        for frame in frames:
            name = frame["name"]
            stem = name.rsplit(".", 1)[0]
            if name in seen:
                report.warning(path, f"frame {name!r} appears more than once")
            seen.add(name)
            targets, problems = det_targets(frame, path)
            for msg in problems:
                report.error(path, msg.removeprefix(path + ": "))
            if stem not in image_sizes:
                report.error(path, f"frame {name!r}: label for a missing image ({self.image_set} {split}/{name})")
                continue
            report.labelled(stem)
            size = image_sizes[stem]
            if size is not None:
                for msg in box_problems(targets.boxes + targets.ignore_boxes, size[0], size[1], f"frame {name!r}"):
                    report.error(path, msg)
            for cls in targets.labels:
                report.count(f"boxes/{B.DET_CLASSES[cls]}")
            report.count("ignore regions", len(targets.ignore_boxes))


TASKS.register(Detection())
