"""`lora`: low-rank deltas on the weights of the adapted stages' layers (LoRA for convolutions and
linear layers), inside the backbone. Which layers: the backbone entry's ``lora_targets`` (ResNets:
every ungrouped conv of the stage; ConvNeXt: the blocks' pointwise layers and the downsampling conv).

A wrapped layer computes with ``weight + alpha / rank * (lora_B @ lora_A)``; ``lora_B`` starts at
zero, so it starts as the plain layer, and it keeps the plain layer's ``weight``/``bias`` names, so a
pretrained state dict loads into it unchanged. When the adapt stage ends the deltas are folded into
plain layers (``finish``), after which the backbone's state dict has exactly a plain backbone's keys
and finetuning runs the plain architecture at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from paf_ray.models.adapters.base import AdapterKind
from paf_ray.models.adapters.registry import ADAPTERS


@dataclass
class LoRAConfig:
    """model.adapter.lora."""

    rank: int = 8  # rank of the weight deltas
    alpha: float = 8.0  # the delta is scaled by alpha / rank


class LoRALayer:
    """The low-rank delta shared by the conv and linear wrappers."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float

    def _init_lora(self, rank: int, alpha: float, fan_in: int, out: int, like: torch.Tensor) -> None:
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A).view_as(self.weight)


class LoRAConv2d(nn.Conv2d, LoRALayer):
    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight, self.bias = conv.weight, conv.bias
        kh, kw = conv.kernel_size
        self._init_lora(rank, alpha, conv.in_channels * kh * kw, conv.out_channels, conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)

    def plain(self) -> nn.Conv2d:
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, self.groups, self.bias is not None, self.padding_mode,
                        device=self.weight.device, dtype=self.weight.dtype)
        return _copy_merged(self, out)


class LoRALinear(nn.Linear, LoRALayer):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self._init_lora(rank, alpha, linear.in_features, linear.out_features, linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)

    def plain(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        return _copy_merged(self, out)


def _copy_merged(layer, out: nn.Module) -> nn.Module:
    with torch.no_grad():
        out.weight.copy_(layer.merged_weight())
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    out.weight.requires_grad_(layer.weight.requires_grad)
    return out


def _replace(root: nn.Module, make) -> int:
    """Replace every child `make` returns a module for; returns how many were replaced."""
    count = 0
    for module in list(root.modules()):
        for child_name, child in list(module.named_children()):
            new = make(child)
            if new is not None:
                setattr(module, child_name, new)
                count += 1
    return count


def add_lora(backbone: nn.Module, targets: list[nn.Module], rank: int, alpha: float) -> int:
    """Wrap each of `targets` (Conv2d without groups, or Linear, inside `backbone`) with a LoRA delta."""
    wanted = {id(m) for m in targets}

    def make(child):
        if id(child) not in wanted:
            return None
        if type(child) is nn.Conv2d and child.groups == 1:
            return LoRAConv2d(child, rank, alpha)
        if type(child) is nn.Linear:
            return LoRALinear(child, rank, alpha)
        return None

    return _replace(backbone, make)


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA delta under `module` into a plain layer; returns how many were merged."""
    return _replace(module, lambda c: c.plain() if isinstance(c, LoRALayer) else None)


def lora_layers(module: nn.Module) -> list[LoRALayer]:
    return [m for m in module.modules() if isinstance(m, LoRALayer)]


class LoRA(AdapterKind):
    name = "lora"
    placement = "inside the backbone: low-rank deltas on the stage layers, merged into them after adapt"
    config = LoRAConfig

    def check(self, section: LoRAConfig) -> list[tuple[str, str]]:
        if section.rank < 1:
            return [("model.adapter.lora.rank", f"must be >= 1, got {section.rank}")]
        return []

    def attach(self, backbone, entry, stages, section: LoRAConfig) -> nn.Module:
        add_lora(backbone, entry.lora_targets(backbone, stages), section.rank, section.alpha)
        return nn.ModuleDict()  # the deltas live inside the backbone's layers

    def owned(self, model) -> list[nn.Parameter]:
        return [p for layer in lora_layers(model.backbone) for p in (layer.lora_A, layer.lora_B)]

    def finish(self, model) -> bool:
        return merge_lora(model.backbone) > 0


ADAPTERS.register(LoRA())
