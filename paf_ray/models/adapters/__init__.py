"""Adapters as plug-ins: one module per kind (``base.AdapterKind``): none, bypass, inline, lora.

``ADAPTERS`` holds the built-in kinds and any a config's ``plugins:`` imports.
"""

from paf_ray.models.adapters import bypass, inline, lora, none  # noqa: F401  (each registers itself)
from paf_ray.models.adapters.base import AdapterKind
from paf_ray.models.adapters.registry import ADAPTERS

__all__ = ["ADAPTERS", "AdapterKind"]
