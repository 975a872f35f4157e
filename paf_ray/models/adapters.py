"""Multi-scale adapters, one per backbone stage (strides 4, 8, 16, 32).

* bypass: a residual conv bottleneck on the stage output, outside the backbone
  (down 1x1 -> depthwise 3x3 -> GELU -> up 1x1, times a learnable scale). The up
  projection starts at zero, so an untrained adapter is the identity. It re-maps what
  the FPN sees; the next backbone stage still reads the unadapted output.
* inline: the same residual bottleneck, applied between backbone stages: the adapted
  C_k is what stage k+1 reads (and what the FPN sees). Identity at init too.
* lora: low-rank deltas on the stage's conv weights, inside the backbone. `merge_lora`
  folds them into plain Conv2d layers, after which the backbone's state dict has exactly
  a plain backbone's keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


# What each kind changes, as `paf-ray inspect` shows it.
PLACEMENT = {
    "none": "no adapters",
    "bypass": "beside the backbone: each adapted stage output goes to the FPN only; the next stage reads the plain output",
    "inline": "between backbone stages: each adapted stage output feeds the next stage (and the FPN)",
    "lora": "inside the backbone: low-rank deltas on the stage convs, merged into them after adapt",
}


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


def build_residual_adapters(out_channels: dict[int, int], stages: list[int], reduction: int, init_scale: float) -> nn.ModuleDict:
    """Bypass / inline adapters: ModuleDict keyed by stage ("1".."4") for the configured stages."""
    return nn.ModuleDict(
        {str(k): BypassAdapter(out_channels[k], reduction, init_scale) for k in sorted(set(stages))}
    )


class LoRAConv2d(nn.Conv2d):
    """Conv2d whose weight is `weight + alpha / rank * (lora_B @ lora_A)` (reshaped to the kernel).

    Keeps the plain conv's `weight`/`bias` names, so a pretrained state dict loads into it
    unchanged; `lora_B` starts at zero, so the layer starts as the plain conv.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float):
        if conv.groups != 1:
            raise ValueError("LoRA adapters support ungrouped convolutions only")
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        self.bias = conv.bias
        kh, kw = conv.kernel_size
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, conv.in_channels * kh * kw, dtype=conv.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(conv.out_channels, rank, dtype=conv.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.merged_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.weight.requires_grad)
        return conv


def _replace_convs(root: nn.Module, make) -> int:
    count = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            new = make(child)
            if new is not None:
                setattr(module, child_name, new)
                count += 1
    return count


def add_lora(backbone: nn.Module, stages: list[int], rank: int, alpha: float) -> int:
    """Wrap every Conv2d of `layer{k}` (k in stages) with a LoRA delta; returns how many."""
    if rank < 1:
        raise ValueError(f"model.adapter.rank: must be >= 1, got {rank}")

    def make(child):
        if type(child) is nn.Conv2d:
            return LoRAConv2d(child, rank, alpha)
        return None

    return sum(_replace_convs(getattr(backbone, f"layer{k}"), make) for k in sorted(set(stages)))


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA delta under `module` into a plain Conv2d; returns how many were merged."""
    return _replace_convs(module, lambda c: c.to_conv() if isinstance(c, LoRAConv2d) else None)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoRAConv2d) for m in module.modules())
