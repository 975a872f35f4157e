"""The head of the mask tasks (semantic-FPN style) and the partial-label loss (torch)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from paf_ray.data.contracts import IGNORE_INDEX
from paf_ray.tasks.base import HeadInput


def _groups(channels: int) -> int:
    # GroupNorm keeps the heads independent of which (and how many) samples carry a task.
    return math.gcd(channels, max(1, min(32, channels // 4)))


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class SegHead(nn.Module):
    """Each pyramid level -> conv(s) + 2x upsampling to the finest level's stride -> sum -> 1x1 classifier.

    `extra_channels` are concatenated before the classifier (the LV-Adapter's score maps).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_levels: int = 4, extra_channels: int = 0):
        super().__init__()
        branches = []
        for level in range(num_levels):  # level i has twice the stride of level i - 1
            layers: list[nn.Module] = [_conv_gn_relu(in_channels, channels)]
            for j in range(level):
                if j > 0:
                    layers.append(_conv_gn_relu(channels, channels))
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.classifier = nn.Conv2d(channels + extra_channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int], extra: torch.Tensor | None = None) -> torch.Tensor:
        x = self.branches[0](feats[0])
        for branch, f in zip(self.branches[1:], feats[1:]):
            x = x + branch(f)
        if extra is not None:
            x = torch.cat([x, F.interpolate(extra.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)],
                          dim=1)
        return F.interpolate(self.classifier(x), size=out_size, mode="bilinear", align_corners=False)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, class_balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy over labelled pixels (255 ignored); 0 (not NaN) when no pixel is labelled.

    ``class_balance`` > 0 weights each pixel by (1 / share of its class among the batch's
    labelled pixels) ** class_balance and takes the weighted mean.
    """
    valid = target != IGNORE_INDEX
    if class_balance <= 0:
        total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / valid.sum().clamp(min=1)
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    labels = torch.where(valid, target, torch.zeros_like(target))
    counts = torch.bincount(target[valid], minlength=logits.shape[1]).float()
    class_weight = (counts.sum() / counts.clamp(min=1)) ** class_balance
    weight = class_weight[labels] * valid
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1e-12)


class MaskHead(nn.Module):
    """A mask task's head: logits at the network input's size; its loss is the task's."""

    compilable = True  # static shapes: MultiTaskModel.compile_dense compiles it

    def __init__(self, task, in_channels: int, channels: int, out_channels: int, num_levels: int,
                 extra_channels: int, loss_options: dict):
        super().__init__()
        self.task = task
        self.loss_options = dict(loss_options)  # the task's loss settings from its config section
        self.seg = SegHead(in_channels, channels, out_channels, num_levels, extra_channels)

    def forward(self, inp: HeadInput) -> torch.Tensor:
        return self.seg(inp.levels, tuple(inp.images.shape[-2:]), inp.score_map)

    def losses(self, inp: HeadInput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.task.loss(self(inp), target, **self.loss_options)
