"""The detection task's heads on the shared pyramid, from torchvision's detection parts (torch).

Images are never resized here: boxes in and out are in network-input pixels.
Labels are 0..9 (DET_CLASSES) on both sides; Faster R-CNN's background class 0 is
internal. Ignore regions (`ignore_boxes`) are neither positives nor negatives: an
anchor/proposal/point that is not a positive and lies mostly inside one (intersection
over its own area >= `ignore_iof_thresh`; for FCOS points: inside) leaves the loss.

Box arithmetic is float32 under autocast. torchvision's parts take the dtype of what they
are given: on bf16 features the anchors, decoded proposals, the ground truth (cast to the
proposals' dtype before encoding) and the output boxes all become bfloat16, whose step is
4 px between 512 and 1024 and 8 px above (anchors of a 1280x736 image end up to 7 px off).
So the heads hand out float32 regression deltas and logits, and the anchor generator and
box coders run with autocast off on float32 inputs; the convolutions and the box head's
matmuls still run in the autocast dtype (tests/test_detection_precision.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.models.detection import _utils as det_utils

from paf_ray.tasks.base import HeadInput
from paf_ray.tasks.det.config import DetConfig

# Box coder weights of torchvision's Faster R-CNN: RPN (1, 1, 1, 1), RoI heads (10, 10, 5, 5).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

_RPN_LOSS_NAMES = {"loss_objectness": "det_rpn_cls", "loss_rpn_box_reg": "det_rpn_box",
                   "loss_classifier": "det_cls", "loss_box_reg": "det_box"}
_FCOS_LOSS_NAMES = {"classification": "det_cls", "bbox_regression": "det_box", "bbox_ctrness": "det_ctr"}


def ignore_mask(boxes: torch.Tensor, ignore_boxes: torch.Tensor | None, thresh: float) -> torch.Tensor:
    """[N] bool: box lies in some ignore region by at least `thresh` of its own area."""
    if ignore_boxes is None or ignore_boxes.numel() == 0 or boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    ign = ignore_boxes.to(boxes)
    lt = torch.max(boxes[:, None, :2], ign[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], ign[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1).clamp(min=1e-6)
    return (inter / area[:, None]).max(dim=1).values >= thresh


def _autocast_off(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _float32(obj):
    """Tensors (also inside lists, tuples and dicts) as float32."""
    if torch.is_tensor(obj):
        return obj.float()
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


class Float32AnchorGenerator(AnchorGenerator):
    """Anchors in float32 whatever the dtype of the feature maps."""

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # torchvision reads only the maps' shapes, dtype and device: float32 stand-ins cost no memory
        stand_ins = [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        with _autocast_off(feature_maps[0]):
            return super().forward(image_list, stand_ins)


class Float32BoxCoder(det_utils.BoxCoder):
    """Encoding and decoding in float32 with autocast off (torchvision's coder takes the deltas' dtype)."""

    def encode(self, reference_boxes, proposals):
        with _autocast_off(reference_boxes[0]):
            return super().encode(_float32(list(reference_boxes)), _float32(list(proposals)))

    def decode(self, rel_codes, boxes):
        with _autocast_off(rel_codes):
            return super().decode(rel_codes.float(), _float32(list(boxes)))


class Float32BoxLinearCoder(det_utils.BoxLinearCoder):
    """FCOS's coder, in float32 with autocast off."""

    def encode(self, reference_boxes, proposals):
        with _autocast_off(reference_boxes):
            return super().encode(reference_boxes.float(), proposals.float())

    def decode(self, rel_codes, boxes):
        with _autocast_off(rel_codes):
            return super().decode(rel_codes.float(), boxes.float())


class Float32RPNHead(RPNHead):
    """RPN convs in the autocast dtype; objectness and deltas handed on in float32."""

    def forward(self, x):
        return _float32(super().forward(x))


class Float32FastRCNNPredictor(FastRCNNPredictor):
    """Box head matmuls in the autocast dtype; class logits and box deltas handed on in float32."""

    def forward(self, x):
        return _float32(super().forward(x))


class IgnoreAwareRPN(RegionProposalNetwork):
    ignore_iof_thresh = 0.5

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        for lab, anc, t in zip(labels, anchors, targets):
            lab[(lab == 0) & ignore_mask(anc, t.get("ignore_boxes"), self.ignore_iof_thresh)] = -1.0
        return labels, matched_gt_boxes


class IgnoreAwareRoIHeads(RoIHeads):
    ignore_iof_thresh = 0.5
    _ignore_boxes: list | None = None

    def select_training_samples(self, proposals, targets):
        # assign_targets_to_proposals only sees boxes and labels: hand it the ignore regions here.
        self._ignore_boxes = [t.get("ignore_boxes") for t in targets]
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._ignore_boxes = None

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self._ignore_boxes is not None:
            for lab, props, ign in zip(labels, proposals, self._ignore_boxes):
                lab[(lab == 0) & ignore_mask(props, ign, self.ignore_iof_thresh)] = -1
        return matched_idxs, labels


def _to_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], ignore: list[torch.Tensor], label_offset: int):
    targets = []
    for b, lab, ign in zip(boxes, labels, ignore):
        b = b.float().reshape(-1, 4)
        lab = lab.long().reshape(-1)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # boxes cropped to nothing carry no signal
        targets.append({"boxes": b[keep], "labels": lab[keep] + label_offset,
                        "ignore_boxes": ign.float().reshape(-1, 4)})
    return targets


class FasterRCNNHead(nn.Module):
    """RPN + RoI heads (the BDD100K reference detector) on FPN levels '0'..'3' (+ 'pool' for the RPN)."""

    def __init__(self, channels: int, num_classes: int, cfg: DetConfig):
        super().__init__()
        sizes = tuple((s,) for s in cfg.anchor_sizes)
        anchor_gen = Float32AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        self.rpn = IgnoreAwareRPN(
            anchor_gen, Float32RPNHead(channels, anchor_gen.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
            nms_thresh=0.7,
        )
        self.roi_heads = IgnoreAwareRoIHeads(
            MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=cfg.roi_sampling_ratio),
            TwoMLPHead(channels * 7 * 7, cfg.representation_size),
            Float32FastRCNNPredictor(cfg.representation_size, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=cfg.box_batch_size_per_image, positive_fraction=0.25,
            bbox_reg_weights=ROI_BOX_WEIGHTS,
            score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.box_detections_per_img,
        )
        self.rpn.box_coder = Float32BoxCoder(RPN_BOX_WEIGHTS)
        self.roi_heads.box_coder = Float32BoxCoder(ROI_BOX_WEIGHTS)
        self.rpn.ignore_iof_thresh = self.roi_heads.ignore_iof_thresh = cfg.ignore_iof_thresh

    def forward(self, pyramid: "OrderedDict[str, torch.Tensor]", images: torch.Tensor, targets=None):
        """Training: targets (list of dicts) -> dict of losses. Eval: -> list of detections."""
        feats = OrderedDict((k, pyramid[k]) for k in ("0", "1", "2", "3", "pool"))
        h, w = images.shape[-2:]
        image_list = ImageList(images, [(h, w)] * images.shape[0])
        if self.training:
            targets = _to_targets(*targets, label_offset=1)
        proposals, rpn_losses = self.rpn(image_list, feats, targets)
        roi_feats = OrderedDict((k, feats[k]) for k in ("0", "1", "2", "3"))
        dets, roi_losses = self.roi_heads(roi_feats, proposals, image_list.image_sizes, targets)
        if self.training:
            return {_RPN_LOSS_NAMES[k]: v for k, v in {**rpn_losses, **roi_losses}.items()}
        for d in dets:
            d["labels"] = d["labels"] - 1
        return dets


class IgnoreAwareFCOSHead(FCOSHead):
    """FCOS towers in the autocast dtype; logits, box regression and centerness handed on in float32."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_coder = Float32BoxLinearCoder(normalize_by_size=True)

    def forward(self, x):
        return _float32(super().forward(x))

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"]
        ignored = []
        for t, anc, m in zip(targets, anchors, matched_idxs):
            centres = (anc[:, :2] + anc[:, 2:]) / 2
            points = torch.cat([centres - 0.5, centres + 0.5], dim=1)
            ignored.append((m < 0) & ignore_mask(points, t.get("ignore_boxes"), 0.5))
        ignored = torch.stack(ignored)
        if ignored.any():
            # A logit far below zero gives focal loss ~0 against target 0, and `where` sends
            # these points no gradient: they are neither positives nor negatives.
            far = torch.full_like(cls_logits, -30.0)
            cls_logits = torch.where(ignored[..., None], far, cls_logits)
            head_outputs = {**head_outputs, "cls_logits": cls_logits}
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


class FCOSDetHead(nn.Module):
    """FCOS on P3..P7 of the shared pyramid; torchvision's matching, loss and decoding."""

    def __init__(self, channels: int, num_classes: int, cfg: DetConfig):
        super().__init__()
        sizes = ((8,), (16,), (32,), (64,), (128,))  # one point per location, size = stride
        self.anchor_generator = Float32AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        self.head = IgnoreAwareFCOSHead(channels, 1, num_classes, num_convs=cfg.fcos_num_convs)
        self.box_coder = Float32BoxLinearCoder(normalize_by_size=True)
        self.center_sampling_radius = 1.5
        self.score_thresh = cfg.box_score_thresh
        self.nms_thresh = 0.6
        self.detections_per_img = cfg.box_detections_per_img
        self.topk_candidates = 1000

    # torchvision's FCOS methods only read the attributes set above.
    compute_loss = FCOS.compute_loss
    postprocess_detections = FCOS.postprocess_detections

    def forward(self, pyramid: "OrderedDict[str, torch.Tensor]", images: torch.Tensor, targets=None):
        feats = [pyramid[k] for k in ("1", "2", "3", "p6", "p7")]
        h, w = images.shape[-2:]
        image_list = ImageList(images, [(h, w)] * images.shape[0])
        head_outputs = self.head(feats)
        anchors = self.anchor_generator(image_list, feats)
        num_anchors_per_level = [f.shape[2] * f.shape[3] for f in feats]
        if self.training:
            targets = _to_targets(*targets, label_offset=0)
            losses = self.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
            return {_FCOS_LOSS_NAMES[k]: v for k, v in losses.items()}
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_anchors_per_level)) for a in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)


class DetHead(nn.Module):
    """The detection task's head: Faster R-CNN or FCOS on the shared pyramid (``model.heads.det.kind``)."""

    def __init__(self, channels: int, num_classes: int, cfg: DetConfig):
        super().__init__()
        if cfg.kind == "faster_rcnn":
            self.detector = FasterRCNNHead(channels, num_classes, cfg)
        else:  # fcos (the config allows nothing else)
            self.detector = FCOSDetHead(channels, num_classes, cfg)

    def forward(self, inp: HeadInput):
        """Eval: per image {"boxes" [N, 4] input pixels, "scores" [N], "labels" [N] class indices}."""
        return self.detector(inp.pyramid, inp.images)

    def losses(self, inp: HeadInput, target: dict) -> dict[str, torch.Tensor]:
        """{"det": the sum, "det_<part>": each part, detached for logging}."""
        device = inp.images.device
        targets = tuple([t.to(device) for t in target[k]] for k in ("boxes", "labels", "ignore_boxes"))
        parts = self.detector(inp.pyramid, inp.images, targets)
        return {"det": sum(parts.values()), **{k: v.detach() for k, v in parts.items()}}
