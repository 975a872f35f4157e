"""Backbones as plug-ins: one module per family registers its entries (``base.BackboneEntry``).

``BACKBONES`` holds the built-in ones (ResNet-18/34/50/101, `tiny`, CLIP RN50, ConvNeXt-T) and any a
config's ``plugins:`` imports.
"""

from paf_ray.models.backbones import clip, convnext, resnet  # noqa: F401  (each registers itself)
from paf_ray.models.backbones.base import STAGES, BackboneEntry, CheckpointFormat
from paf_ray.models.backbones.registry import BACKBONES

__all__ = ["BACKBONES", "STAGES", "BackboneEntry", "CheckpointFormat"]
