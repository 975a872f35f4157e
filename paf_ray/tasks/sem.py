"""Semantic segmentation (`sem`): 19 Cityscapes classes per pixel, on BDD100K's 10k frames."""

from __future__ import annotations

from paf_ray.data import bdd100k as B
from paf_ray.tasks.masks import MaskTask
from paf_ray.tasks.registry import TASKS


class SemanticSegmentation(MaskTask):
    name = "sem"
    title = "semantic segmentation (19 classes)"
    classes = B.SEM_CLASSES
    prompt_names = B.SEM_CLASSES
    image_set = B.SEM_IMAGE_SET
    masks_dir = B.SEM_MASKS_DIR
    palette = B.SEM_PALETTE
    headline = "sem/mIoU"
    table_metrics = ("sem/mIoU",)
    draw_order = 0


TASKS.register(SemanticSegmentation())
