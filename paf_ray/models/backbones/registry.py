"""The backbone registry (each backbone module registers its entries here when imported)."""

from __future__ import annotations

from paf_ray.models.backbones.base import BackboneEntry
from paf_ray.registry import Registry

BACKBONES: Registry[BackboneEntry] = Registry("backbone")
