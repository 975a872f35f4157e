"""model.heads.det: the detector on the shared pyramid (torchvision's Faster R-CNN or FCOS parts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DetConfig:
    kind: Literal["faster_rcnn", "fcos"] = "faster_rcnn"
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    representation_size: int = 1024  # box head MLP width
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_nms_thresh: float = 0.5
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # faster_rcnn: one per P2..P6
    ignore_iof_thresh: float = 0.5  # anchors/proposals this much inside an ignore box are neither pos nor neg
    fcos_num_convs: int = 4  # fcos: conv layers in each tower
    # faster_rcnn: RoIAlign sample points per bin side (torchvision's 2); 0 = adaptive. Its CPU
    # backward is serial: 1 makes a small-input CPU step 1-11% faster (docs/benchmarks.md)
    roi_sampling_ratio: int = 2
