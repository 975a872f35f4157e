"""The multi-task model: backbones + checkpoint zoo, adapters, FPN neck, heads, losses, stage policy."""

from paf_ray.models.multitask import MultiTaskModel, build_model

__all__ = ["MultiTaskModel", "build_model"]
