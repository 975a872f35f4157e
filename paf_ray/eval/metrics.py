"""Metrics with the official BDD100K rules: box AP (pycocotools), semantic and drivable mIoU.

This module is the one place for metric keys and the model-selection ``score``.

Detection follows the BDD100K/Scalabel toolkit (docs/bdd100k.md, "Official scoring"): GT frames
sorted by name with image ids 1..N, ``bbox = [x1, y1, x2 - x1 + 1, y2 - y1 + 1]``,
``iscrowd = crowd or ignore category``, the 10 categories in ``DET_CLASSES`` order, then a
standard ``COCOeval`` over bounding boxes. Numbers are reported in percent.

Segmentation follows ``bdd100k/eval/seg.py``: one confusion matrix over the whole split of
size ``n + 1`` (ground truth outside ``0..n-1`` is dropped, predictions ``>= n`` land in the
extra column and are always wrong), IoU = diag / (row + col - diag), mIoU over the classes
present in the ground truth. Drivable area officially uses ``n = 2``, so ground-truth
background pixels are left out; we also report the 3-value mIoU (``mIoU3``) that counts them.

Training-time evaluation: :class:`Evaluator` accumulates per batch, ``state()`` is picklable,
:func:`merge_states` sums states from all workers and :func:`compute` returns the flat metrics
(keys below) with ``score`` for model selection.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from paf_ray.data.bdd100k import (
    DET_CLASSES,
    DRV_CLASSES,
    DRV_OFFICIAL_CLASSES,
    IGNORE_INDEX,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    SEM_CLASSES,
    TASKS,
    det_category_to_index,
)

if TYPE_CHECKING:  # the scorer runs without torch
    from paf_ray.data.contracts import Batch

# The twelve COCO summary numbers, in COCOeval.stats order.
DET_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# The subset that goes into the flat training metrics as det/<name>.
DET_FLAT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The metric of each task that enters `score`.
SCORE_KEYS = {"det": "det/AP", "sem": "sem/mIoU", "drv": "drv/mIoU"}
# The headline metrics, in the order tables, logs, curves and Tune results show them.
HEADLINE_METRICS = ("det/AP", "det/AP50", "det/AP75", "det/AR100", "sem/mIoU", "drv/mIoU", "drv/mIoU3", "score")


class MetricsInputError(ValueError):
    """Input to a metric is malformed (unknown category, missing field, shape mismatch...)."""


# =========================================================================== detection


def _box2d_to_bbox(box2d: dict, where: str) -> list[float]:
    try:
        x1, y1, x2, y2 = (float(box2d[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        raise MetricsInputError(f"{where}: box2d needs numeric x1, y1, x2, y2, got {box2d!r}") from None
    # The toolkit counts pixels inclusively: +1 on width and height.
    return [x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0]


def _frame_name(frame: Any, source: str, i: int) -> str:
    if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
        raise MetricsInputError(f"{source}: frame {i}: expected an object with a string 'name'")
    return frame["name"]


def _frame_annotations(frame: dict, source: str, is_pred: bool) -> list[dict]:
    """Labels of one frame as partial COCO annotations (no ids yet); labels without box2d are skipped."""
    anns = []
    for j, label in enumerate(frame.get("labels") or []):
        where = f"{source}: frame {frame['name']!r} label {j}"
        if not isinstance(label, dict):
            raise MetricsInputError(f"{where}: expected an object, got {type(label).__name__}")
        if label.get("box2d") is None:
            continue
        category = label.get("category")
        mapped = det_category_to_index(category) if isinstance(category, str) else None
        if mapped is None:
            raise MetricsInputError(
                f"{where}: unknown category {category!r} (known: {', '.join(DET_CLASSES)}, "
                "ignore categories other person / other vehicle / trailer, and the 2018 names)"
            )
        index, ignored = mapped
        bbox = _box2d_to_bbox(label["box2d"], where)
        ann = {"category_id": index + 1, "bbox": bbox, "area": bbox[2] * bbox[3]}
        if is_pred:
            score = label.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise MetricsInputError(f"{where}: a prediction needs a numeric 'score', got {score!r}")
            ann["score"] = float(score)
        else:
            crowd = bool((label.get("attributes") or {}).get("crowd", False))
            ann["iscrowd"] = int(crowd or ignored)
        anns.append(ann)
    return anns


def _make_coco(images: list[dict], annotations: list[dict]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(DET_CLASSES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def frames_to_coco(
    gt_frames: Sequence[dict],
    pred_frames: Sequence[dict],
    gt_source: str = "ground truth",
    pred_source: str = "predictions",
):
    """Scalabel/BDD100K frames -> (coco_gt, coco_dt) pycocotools objects, the toolkit's way.

    GT frames are sorted by name and get image ids 1..N; prediction frames are aligned by name
    (a GT frame without predictions has none; predictions for unknown frames are dropped).
    `gt_source` / `pred_source` name the inputs in error messages (e.g. the file paths).
    """
    names = [_frame_name(f, gt_source, i) for i, f in enumerate(gt_frames)]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise MetricsInputError(f"{gt_source}: duplicate frame names {dup}")
    order = sorted(range(len(gt_frames)), key=lambda i: names[i])
    image_id = {names[i]: k + 1 for k, i in enumerate(order)}
    images = [{"id": image_id[names[i]], "file_name": names[i], "width": IMAGE_WIDTH, "height": IMAGE_HEIGHT} for i in order]

    gt_anns = []
    for i in order:
        for ann in _frame_annotations(gt_frames[i], gt_source, is_pred=False):
            ann.update(id=len(gt_anns) + 1, image_id=image_id[names[i]])
            gt_anns.append(ann)

    dt_anns = []
    for i, frame in enumerate(pred_frames):
        name = _frame_name(frame, pred_source, i)
        anns = _frame_annotations(frame, pred_source, is_pred=True)  # checked even when dropped, as the toolkit does
        if name not in image_id:
            continue
        for ann in anns:
            ann.update(id=len(dt_anns) + 1, image_id=image_id[name], iscrowd=0)
            dt_anns.append(ann)
    return _make_coco(images, gt_anns), _make_coco(images, dt_anns)


def _summary(coco_eval, k: slice | list[int]) -> dict[str, float]:
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
        if iou_thr is not None:
            s = s[iou[iou_thr]]
        return mean(s)

    def ar(area_lbl="all", md=100):
        return mean(recall[:, k, area[area_lbl], max_det[md]])

    return {
        "AP": ap(),
        "AP50": ap(0.5),
        "AP75": ap(0.75),
        "APs": ap(area_lbl="small"),
        "APm": ap(area_lbl="medium"),
        "APl": ap(area_lbl="large"),
        "AR1": ar(md=1),
        "AR10": ar(md=10),
        "AR100": ar(),
        "ARs": ar("small"),
        "ARm": ar("medium"),
        "ARl": ar("large"),
    }


def det_metrics(
    gt_frames: Sequence[dict],
    pred_frames: Sequence[dict],
    gt_source: str = "ground truth",
    pred_source: str = "predictions",
) -> dict[str, Any]:
    """Box AP with BDD100K rules: the twelve numbers (percent) overall and ``per_class``.

    Classes without ground truth are NaN and left out of the overall numbers (as COCOeval
    does); with no predictions, classes that have ground truth score 0.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt, coco_dt = frames_to_coco(gt_frames, pred_frames, gt_source, pred_source)
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    coco_eval.params.catIds = list(range(1, len(DET_CLASSES) + 1))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    result: dict[str, Any] = _summary(coco_eval, slice(None))
    result["per_class"] = {name: _summary(coco_eval, [i]) for i, name in enumerate(DET_CLASSES)}
    result["images"] = len(coco_gt.getImgIds())
    return result


# =========================================================================== segmentation


def confusion_update(
    conf: np.ndarray | None, pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE_INDEX
) -> np.ndarray:
    """Add one prediction/ground-truth pair to a ``(num_classes + 1)^2`` confusion (rows GT, columns pred).

    Ground truth outside ``0..num_classes-1`` (e.g. `ignore`) is dropped; predictions outside
    that range go to the extra column, so they are always wrong. `conf` is updated in place
    (or created when None) and returned.
    """
    size = num_classes + 1
    if conf is None:
        conf = np.zeros((size, size), dtype=np.int64)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise MetricsInputError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = (gt >= 0) & (gt < num_classes) & (gt != ignore)
    gt = gt[keep]
    pred = pred[keep]
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    conf += np.bincount(gt * size + pred, minlength=size * size).reshape(size, size)
    return conf


def _iou(conf: np.ndarray) -> np.ndarray:
    diag = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, diag / np.maximum(denom, 1), 0.0)


def seg_metrics(conf: np.ndarray, class_names: Sequence[str] = SEM_CLASSES) -> dict[str, Any]:
    """mIoU (over classes present in the GT), per-class IoU (NaN if absent), pAcc and fIoU, in percent."""
    n = len(class_names)
    conf = np.asarray(conf, dtype=np.int64)
    if conf.shape != (n + 1, n + 1):
        raise MetricsInputError(f"confusion shape {conf.shape} does not fit {n} classes (expected {(n + 1, n + 1)})")
    iou = _iou(conf)[:n] * 100.0
    gt_pixels = conf.sum(1)[:n]
    present = gt_pixels > 0
    total = gt_pixels.sum()
    per_class = {name: (float(iou[i]) if present[i] else math.nan) for i, name in enumerate(class_names)}
    return {
        "mIoU": float(iou[present].mean()) if present.any() else math.nan,
        "per_class": per_class,
        "pAcc": float(np.diag(conf)[:n].sum() / total * 100.0) if total else math.nan,
        "fIoU": float((gt_pixels[present] / total * iou[present]).sum()) if total else math.nan,
    }


def drv_metrics(conf: np.ndarray) -> dict[str, Any]:
    """Drivable-area metrics from a 4x4 confusion built with ``confusion_update(..., num_classes=3)``.

    ``mIoU`` is the official value: background GT pixels dropped and a background prediction
    counted as "other", i.e. mean IoU of direct and alternative. ``mIoU3`` counts all three
    values, so painting background as drivable is penalised. ``per_class`` holds the official
    IoUs, ``per_class3`` the three-value ones.
    """
    n3 = len(DRV_CLASSES)
    conf = np.asarray(conf, dtype=np.int64)
    if conf.shape != (n3 + 1, n3 + 1):
        raise MetricsInputError(f"drivable confusion shape {conf.shape}, expected {(n3 + 1, n3 + 1)}")
    k = DRV_OFFICIAL_CLASSES
    # Official 2-class view: GT rows 0..k-1; predictions k.. (background, invalid) fold into one column.
    official = np.zeros((k + 1, k + 1), dtype=np.int64)
    official[:k, :k] = conf[:k, :k]
    official[:k, k] = conf[:k, k:].sum(1)
    two = seg_metrics(official, DRV_CLASSES[:k])
    three = seg_metrics(conf, DRV_CLASSES)
    return {
        "mIoU": two["mIoU"],
        "mIoU3": three["mIoU"],
        "per_class": two["per_class"],
        "per_class3": three["per_class"],
        "pAcc": two["pAcc"],
    }


# =========================================================================== training-time evaluation


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if x.is_floating_point():
            x = x.float()  # bf16 outputs under autocast have no numpy dtype
        x = x.cpu().numpy()
    return np.asarray(x)


def _boxes_to_labels(boxes, classes, scale: float, scores=None, crowd: bool = False) -> list[dict]:
    boxes = _numpy(boxes).reshape(-1, 4).astype(np.float64) / float(scale)
    classes = _numpy(classes).reshape(-1).astype(np.int64)
    scores = None if scores is None else _numpy(scores).reshape(-1)
    labels = []
    for j, (box, cls) in enumerate(zip(boxes, classes)):
        label: dict[str, Any] = {
            "category": DET_CLASSES[int(cls)],
            "box2d": {"x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3])},
        }
        if scores is not None:
            label["score"] = float(scores[j])
        if crowd:
            label["attributes"] = {"crowd": True}
        labels.append(label)
    return labels


class Evaluator:
    """Accumulates one worker's eval outputs against collated batches (docs/architecture.md §3, §4).

    ``update(outputs, batch)`` per batch; ``state()`` is a picklable dict to gather from all
    workers; then ``compute(merge_states(states), tasks)``. Segmentation is scored at the network
    input resolution against the batch masks (255 = padding / absent); detections and GT are
    kept as Scalabel frames in original-image coordinates (boxes / scale).

    Ignore regions carry no class in the batch, so each becomes a crowd box of every class
    (it hides any detection on it) unless the batch provides ``ignore_labels``.
    """

    def __init__(self, tasks: Iterable[str] = TASKS):
        self.tasks = tuple(t for t in TASKS if t in set(tasks))
        self.sem_conf = np.zeros((len(SEM_CLASSES) + 1,) * 2, dtype=np.int64)
        self.drv_conf = np.zeros((len(DRV_CLASSES) + 1,) * 2, dtype=np.int64)
        self.gt_frames: list[dict] = []
        self.pred_frames: list[dict] = []
        self.counts = {t: 0 for t in TASKS}

    def update(self, outputs: dict, batch: "Batch") -> None:
        names = list(batch["name"])
        for task, conf in (("sem", self.sem_conf), ("drv", self.drv_conf)):
            if task not in self.tasks or task not in outputs:
                continue
            has = _numpy(batch[f"has_{task}"]).astype(bool)
            if not has.any():
                continue
            pred = _numpy(outputs[task].argmax(1))
            gt = _numpy(batch[task])
            num_classes = conf.shape[0] - 1
            for i in np.flatnonzero(has):
                confusion_update(conf, pred[i], gt[i], num_classes)
            self.counts[task] += int(has.sum())
        if "det" in self.tasks and "det" in outputs:
            has = _numpy(batch["has_det"]).astype(bool)
            scales = _numpy(batch["scale"]).reshape(-1)
            for i in np.flatnonzero(has):
                scale = float(scales[i])
                det = outputs["det"][i]
                gt_labels = _boxes_to_labels(batch["boxes"][i], batch["labels"][i], scale)
                ignore = _numpy(batch["ignore_boxes"][i]).reshape(-1, 4)
                if "ignore_labels" in batch:
                    gt_labels += _boxes_to_labels(ignore, batch["ignore_labels"][i], scale, crowd=True)
                else:
                    for cls in range(len(DET_CLASSES)):
                        gt_labels += _boxes_to_labels(ignore, np.full(len(ignore), cls), scale, crowd=True)
                self.gt_frames.append({"name": names[i], "labels": gt_labels})
                self.pred_frames.append(
                    {"name": names[i], "labels": _boxes_to_labels(det["boxes"], det["labels"], scale, det["scores"])}
                )
            self.counts["det"] += int(has.sum())

    def state(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "sem_conf": self.sem_conf.copy(),
            "drv_conf": self.drv_conf.copy(),
            "gt_frames": list(self.gt_frames),
            "pred_frames": list(self.pred_frames),
            "counts": dict(self.counts),
        }


def merge_states(states: Sequence[dict]) -> dict[str, Any]:
    """Sum confusions and concatenate frames from several workers' ``Evaluator.state()``.

    A frame name seen on two workers (a sample evaluated twice) is kept once.
    """
    if not states:
        return Evaluator(()).state()
    merged = Evaluator(states[0]["tasks"]).state()
    seen: set[str] = set()
    for s in states:
        merged["sem_conf"] += s["sem_conf"]
        merged["drv_conf"] += s["drv_conf"]
        for gt, pred in zip(s["gt_frames"], s["pred_frames"]):
            if gt["name"] in seen:
                continue
            seen.add(gt["name"])
            merged["gt_frames"].append(gt)
            merged["pred_frames"].append(pred)
        for t, c in s["counts"].items():
            merged["counts"][t] += c
    return merged


def _finite(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def compute_metrics(state: dict, tasks: Iterable[str] | None = None) -> dict[str, float]:
    """Flat, JSON-safe metrics (percent) from a merged state.

    Keys: ``det/AP, det/AP50, det/AP75, det/APs, det/APm, det/APl, det/AR100, det/AP/<class>``,
    ``sem/mIoU, sem/IoU/<class>``, ``drv/mIoU`` (official, background excluded), ``drv/mIoU3``
    (all three values), ``drv/IoU/<class>`` (official: direct, alternative), and

        score = mean of det/AP, sem/mIoU, drv/mIoU over the requested tasks that have a value

    (0.0 when none has). Undefined values (a class absent from the GT, a task with no samples)
    are left out, never NaN.
    """
    tasks = tuple(t for t in TASKS if t in set(state["tasks"] if tasks is None else tasks))
    flat: dict[str, float] = {}

    def put(key: str, value: float) -> None:
        if _finite(value):
            flat[key] = float(value)

    if "det" in tasks and state["gt_frames"]:
        det = det_metrics(state["gt_frames"], state["pred_frames"])
        for name in DET_FLAT_METRICS:
            put(f"det/{name}", det[name])
        for cls, values in det["per_class"].items():
            put(f"det/AP/{cls}", values["AP"])
    if "sem" in tasks:
        sem = seg_metrics(state["sem_conf"], SEM_CLASSES)
        put("sem/mIoU", sem["mIoU"])
        for cls, value in sem["per_class"].items():
            put(f"sem/IoU/{cls}", value)
    if "drv" in tasks:
        drv = drv_metrics(state["drv_conf"])
        put("drv/mIoU", drv["mIoU"])
        put("drv/mIoU3", drv["mIoU3"])
        for cls, value in drv["per_class"].items():
            put(f"drv/IoU/{cls}", value)
    flat["score"] = score(flat, tasks)
    return flat


compute = compute_metrics


def score(flat: dict[str, float], tasks: Iterable[str] = TASKS) -> float:
    """Model-selection scalar: mean of det/AP, sem/mIoU, drv/mIoU over `tasks` present in `flat` (0.0 if none)."""
    values = [flat[SCORE_KEYS[t]] for t in tasks if t in SCORE_KEYS and _finite(flat.get(SCORE_KEYS[t]))]
    return float(sum(values) / len(values)) if values else 0.0


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (recursively) so the result is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
