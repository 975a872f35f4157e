"""`inline`: the bypass bottleneck applied between backbone stages: the adapted output of stage k is
what stage k+1 reads (and what the FPN sees). Identity at init too; in adapt the gradients of later
adapters pass back through the frozen stages after earlier ones, so the backbone records autograd."""

from __future__ import annotations

from torch import nn

from paf_ray.models.adapters.base import AdapterKind
from paf_ray.models.adapters.bypass import ResidualAdapterConfig, check_residual, residual_adapters
from paf_ray.models.adapters.registry import ADAPTERS


class Inline(AdapterKind):
    name = "inline"
    placement = "between backbone stages: each adapted stage output feeds the next stage (and the FPN)"
    config = ResidualAdapterConfig
    graph_through_backbone = True

    def check(self, section) -> list[tuple[str, str]]:
        return check_residual(self.name, section)

    def attach(self, backbone, entry, stages, section) -> nn.Module:
        return residual_adapters(backbone.stage_channels, stages, section)

    def features(self, backbone, adapters, x):
        return backbone(x, adapters)

    def owned(self, model) -> list[nn.Parameter]:
        return list(model.adapters.parameters())


ADAPTERS.register(Inline())
