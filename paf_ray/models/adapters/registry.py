"""The adapter registry (each adapter module registers its kind here when imported)."""

from __future__ import annotations

from paf_ray.models.adapters.base import AdapterKind
from paf_ray.registry import Registry

ADAPTERS: Registry[AdapterKind] = Registry("adapter kind")
