"""`none`: no adapters (pretrain-finetune baselines, single-task models)."""

from __future__ import annotations

from torch import nn

from paf_ray.models.adapters.base import AdapterKind
from paf_ray.models.adapters.registry import ADAPTERS


class NoAdapters(AdapterKind):
    name = "none"
    placement = "no adapters"
    adds_parameters = False

    def attach(self, backbone, entry, stages, section) -> nn.Module:
        return nn.ModuleDict()

    def owned(self, model) -> list[nn.Parameter]:
        return []


ADAPTERS.register(NoAdapters())
