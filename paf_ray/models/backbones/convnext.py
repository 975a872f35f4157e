"""ConvNeXt-T (torchvision's architecture) as a backbone, read from torchvision's or the authors' files.

Its four stages (strides 4, 8, 16, 32; 96, 192, 384, 768 channels) are torchvision's
``features[1], [3], [5], [7]``, each after its downsampling layer; the module keeps torchvision's
names, so ``convnext_tiny-983f1562.pth`` loads as it is (its classifier dropped). The authors'
layout (facebookresearch/ConvNeXt ``convnext_tiny_1k_224_ema.pth``: ``downsample_layers``,
``stages.S.B.{dwconv,norm,pwconv1,pwconv2,gamma}``) is renamed onto it. ConvNeXt has LayerNorm,
not BatchNorm: ``model.norm`` changes nothing in it. LoRA deltas wrap each block's two pointwise
(Linear) layers and the stage's downsampling convolution; the 7x7 depthwise convolutions stay plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import convnext as tv_convnext

from paf_ray.models.backbones.base import STAGES, BackboneEntry, CheckpointFormat, keys_of, rename, tensor_dict, unwrap
from paf_ray.models.backbones.registry import BACKBONES

STAGE_INDEX = {k: 2 * k - 1 for k in STAGES}  # stage k = features[2k - 1]; features[2k - 2] downsamples into it


@dataclass
class ConvNeXtConfig:
    """model.backbone.convnext_tiny."""

    drop_path: float = 0.1  # stochastic depth of the last block (torchvision's ConvNeXt-T default), linear from 0


class ConvNeXtFeatures(nn.Module):
    """torchvision ConvNeXt without its classifier; forward -> {1..4: features at strides 4..32}."""

    def __init__(self, net: tv_convnext.ConvNeXt):
        super().__init__()
        self.features = net.features
        self.stage_channels = {k: self.features[i][-1].block[5].out_features for k, i in STAGE_INDEX.items()}

    def forward(self, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
        feats = {}
        for k, i in STAGE_INDEX.items():
            if k == 1:
                x = self.features[0](x)
            else:
                x = self.features[i - 1](x)
            x = self.features[i](x)
            if after_stage is not None and str(k) in after_stage:
                x = after_stage[str(k)](x)
            feats[k] = x
        return feats


def convnext_tiny(cfg: ConvNeXtConfig | None) -> ConvNeXtFeatures:
    cfg = cfg or ConvNeXtConfig()
    return ConvNeXtFeatures(tv_convnext.convnext_tiny(weights=None, stochastic_depth_prob=cfg.drop_path))


def lora_targets(module: ConvNeXtFeatures, stages: list[int]) -> list[nn.Module]:
    out = []
    for k in sorted(set(stages)):
        if k > 1:
            out += [m for m in module.features[STAGE_INDEX[k] - 1].modules() if type(m) is nn.Conv2d]
        out += [m for m in module.features[STAGE_INDEX[k]].modules() if type(m) is nn.Linear]
    return out


_FB_RULES = [
    (r"^downsample_layers\.0\.", "features.0."),
    (r"^downsample_layers\.(\d)\.", lambda m: f"features.{2 * int(m.group(1))}."),
    (r"^stages\.(\d)\.(\d+)\.dwconv\.", lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.block.0."),
    (r"^stages\.(\d)\.(\d+)\.norm\.", lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.block.2."),
    (r"^stages\.(\d)\.(\d+)\.pwconv1\.", lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.block.3."),
    (r"^stages\.(\d)\.(\d+)\.pwconv2\.", lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.block.5."),
    (r"^stages\.(\d)\.(\d+)\.gamma$", lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.layer_scale"),
]


def _facebook(obj: Any, path: str) -> dict:
    """facebookresearch/ConvNeXt -> torchvision names; gamma [C] becomes layer_scale [C, 1, 1]."""
    sd = rename(tensor_dict(unwrap(obj), path), _FB_RULES)
    return {k: v.reshape(-1, 1, 1) if k.endswith("layer_scale") and v.dim() == 1 else v for k, v in sd.items()}


def _torchvision(obj: Any, path: str) -> dict:
    sd = tensor_dict(unwrap(obj), path)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def sniff(obj: Any) -> str:
    return "convnext_fb" if any(k.startswith(("downsample_layers.", "stages.")) for k in keys_of(obj)) else "torchvision"


BACKBONES.register(BackboneEntry(
    name="convnext_tiny", build=convnext_tiny,
    formats={"torchvision": CheckpointFormat("torchvision", _torchvision, "imagenet", "torchvision convnext_tiny-983f1562.pth"),
             "convnext_fb": CheckpointFormat("convnext_fb", _facebook, "imagenet",
                                             "facebookresearch/ConvNeXt convnext_tiny_1k_224(_ema).pth")},
    sniff=sniff, normalization="imagenet", lora_targets=lora_targets, config=ConvNeXtConfig,
    leftover_prefixes=("classifier.", "norm.", "head."), note="torchvision ConvNeXt-T (LayerNorm, no BatchNorm)"))
