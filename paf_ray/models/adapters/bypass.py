"""`bypass`: a residual conv bottleneck on each adapted stage's output, beside the backbone.

down 1x1 -> depthwise 3x3 -> GELU -> up 1x1, times a learnable scale, added to the stage output.
The up projection starts at zero, so an untrained adapter is the identity. It re-maps what the
FPN sees; the next backbone stage still reads the unadapted output, so in adapt the frozen
backbone runs without autograd at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from paf_ray.models.adapters.base import AdapterKind
from paf_ray.models.adapters.registry import ADAPTERS


@dataclass
class ResidualAdapterConfig:
    """model.adapter.bypass / model.adapter.inline."""

    reduction: int = 8  # bottleneck = channels // reduction
    init_scale: float = 1.0  # the learnable output scale starts here (the up projection is zero-init)


class BypassAdapter(nn.Module):
    def __init__(self, channels: int, reduction: int = 8, init_scale: float = 1.0):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.up = nn.Conv2d(hidden, channels, 1)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(F.gelu(self.dw(self.down(x))))


def residual_adapters(channels: dict[int, int], stages: list[int], section: ResidualAdapterConfig) -> nn.ModuleDict:
    """A BypassAdapter per configured stage, keyed "1".."4"."""
    return nn.ModuleDict({str(k): BypassAdapter(channels[k], section.reduction, section.init_scale)
                          for k in sorted(set(stages))})


def check_residual(name: str, section: ResidualAdapterConfig) -> list[tuple[str, str]]:
    if section.reduction < 1:
        return [(f"model.adapter.{name}.reduction", f"must be >= 1, got {section.reduction}")]
    return []


class Bypass(AdapterKind):
    name = "bypass"
    placement = "beside the backbone: each adapted stage output goes to the FPN only; the next stage reads the plain output"
    config = ResidualAdapterConfig

    def check(self, section) -> list[tuple[str, str]]:
        return check_residual(self.name, section)

    def attach(self, backbone, entry, stages, section) -> nn.Module:
        return residual_adapters(backbone.stage_channels, stages, section)

    def features(self, backbone, adapters, x):
        feats = backbone(x)
        return {k: adapters[str(k)](f) if str(k) in adapters else f for k, f in feats.items()}

    def owned(self, model) -> list[nn.Parameter]:
        return list(model.adapters.parameters())


ADAPTERS.register(Bypass())
