"""Tasks whose labels are 8-bit masks (``labels/<task>/masks/<split>/<stem>.png``): the shared half.

A mask task predicts one class per pixel (semantic segmentation, drivable area) or, overriding a
few methods, several attributes per pixel (lane marking). Everything from the index to the
official PNG outputs is the same for all of them and lives here; a subclass names its classes,
folder, allowed values and palette, and overrides what differs.

Evaluation follows ``bdd100k/eval/seg.py``: one confusion matrix over the whole split of size
``n + 1`` (ground truth outside ``0..n-1`` is dropped, predictions ``>= n`` land in the extra
column and are always wrong), IoU = diag / (row + col - diag), mIoU over the classes present in
the ground truth (docs/bdd100k.md, "Official scoring").
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from paf_ray.data.contracts import IGNORE_INDEX
from paf_ray.data.contracts import DatasetError
from paf_ray.data.decode import MAX_IMAGE_PIXELS, decode_mask, encode_png, read_mask
from paf_ray.runtime import storage
from paf_ray.tasks.base import (CheckSink, FrameMap, Labels, ListingEntry, MetricsInputError, Task,
                                TaskEvaluator)
from paf_ray.viz import blend_mask


@dataclass
class MaskHeadConfig:
    """model.heads.<mask task>: the semantic-FPN style head and its loss."""

    channels: int = 128  # width of the head's convolutions
    # pixel weight (1 / class share in the batch) ** this; 0 = plain cross-entropy. Thin and rare
    # classes (poles, signs, riders) then count, where plain cross-entropy lets road and sky dominate
    class_balance: float = 0.0


# --------------------------------------------------------------------------- the official metric


def confusion_update(conf: np.ndarray | None, pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore: int = IGNORE_INDEX) -> np.ndarray:
    """Add one prediction/ground-truth pair to a ``(num_classes + 1)^2`` confusion (rows GT, columns pred).

    Ground truth outside ``0..num_classes-1`` (e.g. `ignore`) is dropped; predictions outside
    that range go to the extra column, so they are always wrong. `conf` is updated in place
    (or created when None) and returned.
    """
    size = num_classes + 1
    if conf is None:
        conf = np.zeros((size, size), dtype=np.int64)
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise MetricsInputError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = (gt >= 0) & (gt < num_classes) & (gt != ignore)
    gt, pred = gt[keep], pred[keep]
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    conf += np.bincount(gt * size + pred, minlength=size * size).reshape(size, size)
    return conf


def _iou(conf: np.ndarray) -> np.ndarray:
    diag = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, diag / np.maximum(denom, 1), 0.0)


def seg_metrics(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU (over classes present in the GT), per-class IoU (NaN if absent), pAcc and fIoU, in percent."""
    n = len(class_names)
    conf = np.asarray(conf, dtype=np.int64)
    if conf.shape != (n + 1, n + 1):
        raise MetricsInputError(f"confusion shape {conf.shape} does not fit {n} classes (expected {(n + 1, n + 1)})")
    iou = _iou(conf)[:n] * 100.0
    gt_pixels = conf.sum(1)[:n]
    present = gt_pixels > 0
    total = gt_pixels.sum()
    return {
        "mIoU": float(iou[present].mean()) if present.any() else math.nan,
        "per_class": {name: (float(iou[i]) if present[i] else math.nan) for i, name in enumerate(class_names)},
        "pAcc": float(np.diag(conf)[:n].sum() / total * 100.0) if total else math.nan,
        "fIoU": float((gt_pixels[present] / total * iou[present]).sum()) if total else math.nan,
    }


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: float | None) -> str:
    return "   -" if not finite(x) else f"{x:6.2f}"


def png_stems(folder: str) -> dict[str, str]:
    """stem -> path of the PNG files directly in a local folder."""
    if not os.path.isdir(folder):
        raise MetricsInputError(f"{folder}: not a folder of PNG masks")
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower().endswith(".png")}


def read_mask_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An 8-bit single-channel PNG (mode L or P: the values are the ids) as a uint8 array; one with
    more than `max_pixels` pixels is refused from its header, before decoding."""
    try:
        return read_mask(path, "mask", max_pixels=max_pixels)
    except DatasetError as e:
        raise MetricsInputError(str(e)) from None


def mask_pairs(gt_dir: str, pred_dir: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """(stem, gt mask, prediction mask or None) for every ground-truth mask of `gt_dir`, and the counts
    {images, missing_predictions, extra_predictions}; `max_pixels`: the pixel limit of a mask."""
    gts, preds = png_stems(gt_dir), png_stems(pred_dir)
    counts = {"images": len(gts), "missing_predictions": sum(s not in preds for s in gts),
              "extra_predictions": len(set(preds) - set(gts))}

    def pairs():
        for stem, gt_path in gts.items():
            gt = read_mask_file(gt_path, max_pixels)
            pred = read_mask_file(preds[stem], max_pixels) if stem in preds else None
            if pred is not None and pred.shape != gt.shape:
                raise MetricsInputError(f"{preds[stem]}: size {pred.shape[::-1]} differs from {gt_path} {gt.shape[::-1]}")
            yield stem, gt, pred

    return pairs(), counts


# --------------------------------------------------------------------------- the task


class ConfusionEvaluator(TaskEvaluator):
    """One confusion over the worker's share of the split, at the network input's resolution."""

    def __init__(self, task: "MaskTask"):
        self.task = task
        self.conf = np.zeros((task.num_classes + 1,) * 2, np.int64)

    def update(self, output, batch: dict) -> None:
        has = batch["has"][self.task.name].numpy().astype(bool)
        if not has.any():
            return
        pred = output.argmax(1).cpu().numpy()
        gt = batch["targets"][self.task.name].cpu().numpy()
        for i in np.flatnonzero(has):
            confusion_update(self.conf, pred[i], gt[i], self.task.num_classes)

    def state(self) -> np.ndarray:
        return self.conf.copy()


class MaskTask(Task):
    """A task predicting one class per pixel, labelled by 8-bit masks in a folder per split."""

    masks_dir: ClassVar[str]  # the label folder, with {split}
    palette: ClassVar[tuple[tuple[int, int, int], ...]]
    overlay_alpha: ClassVar[float] = 0.45
    overlay_skip: ClassVar[tuple[int, ...]] = ()  # class ids left unpainted in overlays
    config = MaskHeadConfig

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def head_channels(self) -> int:
        """Output channels of the head (one logit per class)."""
        return self.num_classes

    @property
    def allowed_values(self) -> np.ndarray:
        """bool [256]: the byte values a label mask may hold (the classes and 255)."""
        allowed = np.zeros(256, bool)
        allowed[: self.num_classes] = True
        allowed[IGNORE_INDEX] = True
        return allowed

    # ----------------------------------------------------------------- index and decode

    def listing(self, split: str) -> list[ListingEntry]:
        return [ListingEntry(self.masks_dir.format(split=split))]

    def read_labels(self, root: str, split: str, listing) -> Labels:
        folder = self.masks_dir.format(split=split)
        by_stem = {os.path.splitext(n)[0]: storage.join(root, folder, n)
                   for n, _, _ in listing.get(folder, []) if n.lower().endswith(".png")}
        return Labels(by_stem, {}, [])

    def files(self, label: str) -> list[str]:
        return [label]

    def decode(self, label: str, data: dict[str, bytes], size, where: str) -> np.ndarray:
        return decode_mask(label, f"{self.name} mask", self.allowed_values, size, data.get(label))

    def transform(self, target, geometry) -> dict[str, np.ndarray]:
        return {self.name: geometry.mask(target, IGNORE_INDEX)}

    def image_labels(self, target: np.ndarray) -> np.ndarray:
        present = np.zeros(self.num_classes, np.float32)
        ids = np.unique(target)
        present[ids[ids < self.num_classes]] = 1.0
        return present

    # ----------------------------------------------------------------- torch side

    def collate(self, columns: dict[str, Any], good: list[int]):
        import torch

        col = columns[self.name]
        if isinstance(col, np.ndarray) and col.dtype != object and len(good) == len(col):
            masks = col
        else:
            masks = np.stack([np.asarray(col[i]) for i in good])
        return torch.from_numpy(masks if masks.flags.writeable else masks.copy())

    def build_head(self, section: MaskHeadConfig, channels: int, num_levels: int, extra_channels: int):
        from paf_ray.tasks.seg_head import MaskHead

        return MaskHead(self, channels, section.channels, self.head_channels, num_levels, extra_channels,
                        {"class_balance": section.class_balance})

    def loss(self, logits, target, class_balance: float):
        """The training loss of the head's logits against the targets (uint8 masks, 255 = unlabelled)."""
        from paf_ray.tasks.seg_head import seg_loss

        return {self.name: seg_loss(logits, target.long(), class_balance)}

    def alignment_loss(self, score_map, target):
        """Pixel-text cross-entropy: the score map against the mask, resized to the map (nearest)."""
        import torch.nn.functional as F

        target = F.interpolate(target[:, None].float(), size=score_map.shape[-2:], mode="nearest")[:, 0].long()
        if not bool((target != IGNORE_INDEX).any()):
            return None
        return F.cross_entropy(score_map.float(), target, ignore_index=IGNORE_INDEX)

    # ----------------------------------------------------------------- evaluate

    def check(self, section: MaskHeadConfig, model_cfg) -> list[tuple[str, str]]:
        problems = []
        if section.channels < 1:
            problems.append((f"model.heads.{self.name}.channels", f"must be >= 1, got {section.channels}"))
        if section.class_balance < 0:
            problems.append((f"model.heads.{self.name}.class_balance", f"must be >= 0, got {section.class_balance}"))
        return problems

    def evaluator(self, section) -> ConfusionEvaluator:
        return ConfusionEvaluator(self)

    def merge(self, states: list[np.ndarray]) -> np.ndarray:
        total = np.zeros((self.num_classes + 1,) * 2, np.int64)
        for s in states:
            total += s
        return total

    def compute(self, state: np.ndarray) -> dict[str, float]:
        m = seg_metrics(state, self.classes)
        out = {f"{self.name}/mIoU": m["mIoU"], **{f"{self.name}/IoU/{c}": v for c, v in m["per_class"].items()}}
        return {k: float(v) for k, v in out.items() if finite(v)}

    # ----------------------------------------------------------------- predict, write, draw, export

    def predict_ids(self, logits):
        """[C, h, w] logits (torch) -> uint8 ids (numpy)."""
        import torch

        return logits.argmax(0).to(torch.uint8).cpu().numpy()

    def postprocess(self, output, scale: float, frame_hw, score_thr: float) -> np.ndarray:
        """[C, H_in, W_in] logits -> (h, w) uint8 ids at the frame size (padding cropped, bilinear up, argmax)."""
        import torch.nn.functional as F

        h, w = frame_hw
        hc = min(output.shape[-2], max(1, round(h * scale)))
        wc = min(output.shape[-1], max(1, round(w * scale)))
        up = F.interpolate(output[None, :, :hc, :wc].float(), size=(h, w), mode="bilinear", align_corners=False)
        return self.predict_ids(up[0])

    def frame_files(self, stem: str, prediction: np.ndarray) -> dict[str, bytes]:
        return {f"{self.name}/{stem}.png": encode_png(prediction)}

    def draw(self, image: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        return blend_mask(image, prediction, self.palette, self.overlay_alpha, skip=self.overlay_skip)

    @property
    def export_kinds(self) -> dict[str, str]:
        return {f"{self.name}_logits": "logits"}

    def export_outputs(self, outputs, frame: FrameMap):
        import torch.nn.functional as F

        hc, wc = frame.content_hw
        logits = outputs[:, :, :hc, :wc].float()
        return {f"{self.name}_logits": F.interpolate(logits, size=frame.frame_hw, mode="bilinear", align_corners=False)}

    # ----------------------------------------------------------------- score and check

    def add_score_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("gt", help=f"folder of ground-truth {self.name} PNG masks")
        parser.add_argument("pred", help="folder of predicted PNG masks (matched by file stem)")
        parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                            help=f"a mask with more pixels is an error, never decoded (default {MAX_IMAGE_PIXELS})")

    def score(self, args: argparse.Namespace) -> dict:
        """One confusion over every ground-truth mask; a missing prediction counts as every pixel wrong
        (as the official toolkit); predictions without ground truth are ignored (and counted)."""
        pairs, counts = mask_pairs(args.gt, args.pred, getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS))
        conf = np.zeros((self.num_classes + 1,) * 2, np.int64)
        for _, gt, pred in pairs:
            confusion_update(conf, np.full_like(gt, self.num_classes) if pred is None else pred, gt, self.num_classes)
        return {**self.score_metrics(conf), **counts}

    def score_metrics(self, conf: np.ndarray) -> dict:
        return seg_metrics(conf, self.classes)

    def score_table(self, result: dict) -> str:
        lines = [f"{'class':<16}{'IoU':>8}"]
        lines += [f"{name:<16}{fmt(v):>8}" for name, v in result["per_class"].items()]
        lines.append(f"{'mIoU':<16}{fmt(result['mIoU']):>8}")
        lines.append(f"({result['images']} images, {result['missing_predictions']} without prediction; "
                     "'-' = class absent from the ground truth)")
        return "\n".join(lines)

    def check_labels(self, root: str, split: str, image_sizes, report: CheckSink) -> None:
        folder = storage.join(root, self.masks_dir.format(split=split))
        for name in storage.list_files(folder):
            path = storage.join(folder, name)
            if not name.lower().endswith(".png"):
                report.warning(path, "not a PNG mask; ignored")
                continue
            stem = os.path.splitext(name)[0]
            if stem not in image_sizes:
                report.error(path, f"{self.name} mask for a missing image ({self.image_set} {split}/{stem}.jpg)")
                continue
            try:
                self.decode(path, {}, image_sizes[stem], path)
            except ValueError as e:
                report.error(path, str(e).removeprefix(path + ": "))
                continue
            report.labelled(stem)
