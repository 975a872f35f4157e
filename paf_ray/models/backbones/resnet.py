"""ResNets: torchvision's ResNet-18/34/50/101 and `tiny`, and the checkpoint layouts published for them.

Every module keeps torchvision's names (`conv1`, `bn1`, `layer1`..`layer4`), so a checkpoint's
keys map onto it after the layout's renaming; none carries a classifier or pooling head: those
are the keys the zoo drops. The layouts (docs/checkpoints.md): torchvision, MoCo v1/v2/v3, SimCLR
(v1 converted, v2 port), DenseCL, DetCo (detectron2 pickle), SwAV, BYOL, mmselfsup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from paf_ray.models.backbones.base import (STAGES, BackboneEntry, CheckpointFormat, keys_of, rename, run_stages,
                                           tensor_dict, unwrap)
from paf_ray.models.backbones.registry import BACKBONES
from paf_ray.models.zoo import CheckpointError


class ResNetFeatures(nn.Module):
    """torchvision ResNet (or the `tiny` net) without avgpool/fc; forward -> {1..4: C2..C5}."""

    def __init__(self, conv1, bn1, maxpool, layers: list[nn.Module], stage_channels: dict[int, int]):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_channels = stage_channels

    def forward(self, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return run_stages([self.layer1, self.layer2, self.layer3, self.layer4], x, after_stage)


def from_torchvision(net: tv_resnet.ResNet) -> ResNetFeatures:
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    channels = {k: layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
                for k, layer in zip(STAGES, layers)}
    return ResNetFeatures(net.conv1, net.bn1, net.maxpool, layers, channels)


@dataclass
class TinyConfig:
    """model.backbone.tiny: the ResNet-shaped net of the CPU demo and tests."""

    width: int = 16  # channels of the first stage; the stages have width x (1, 2, 4, 8)


def tiny_resnet(cfg: TinyConfig | None) -> ResNetFeatures:
    """One BasicBlock per stage, widths width * (1, 2, 4, 8)."""
    width = (cfg or TinyConfig()).width
    widths = [width * m for m in (1, 2, 4, 8)]
    layers, in_ch = [], width
    for k, w in zip(STAGES, widths):
        stride = 1 if k == 1 else 2
        down = None
        if stride != 1 or in_ch != w:
            down = nn.Sequential(tv_resnet.conv1x1(in_ch, w, stride), nn.BatchNorm2d(w))
        layers.append(nn.Sequential(tv_resnet.BasicBlock(in_ch, w, stride, down)))
        in_ch = w
    conv1 = nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False)
    maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    net = ResNetFeatures(conv1, nn.BatchNorm2d(width), maxpool, layers, dict(zip(STAGES, widths)))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def stage_convs(module: nn.Module, stages: list[int]) -> list[nn.Module]:
    """The ungrouped convolutions of `layer{k}` for k in stages (what LoRA deltas wrap)."""
    return [m for k in sorted(set(stages)) for m in getattr(module, f"layer{k}").modules()
            if type(m) is nn.Conv2d and m.groups == 1]


# --------------------------------------------------------------------------- checkpoint layouts

# Prefixes tried in order for the torchvision-named layouts (the first one any key has wins).
_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "backbone.", "module.")


def _strip_prefix(sd: dict) -> dict:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _prefixed(prefix: str | None):
    """A converter for the torchvision-named layouts: one wrapper prefix stripped (`prefix` required)."""

    def convert(obj: Any, path: str) -> dict:
        sd = tensor_dict(unwrap(obj), path)
        if prefix and not any(k.startswith(prefix) for k in sd):
            raise CheckpointError(f"{path}: this layout expects keys under {prefix!r}; found e.g. {sorted(sd)[:8]}")
        return _strip_prefix(sd)

    return convert


_DETECTRON2_RULES = [
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.", "conv1."),
    (r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.", ".downsample.0."),
    (r"\.conv(\d)\.norm\.", r".bn\1."),
]

_SIMCLR2_RULES = [
    (r"^net\.0\.0\.", "conv1."),
    (r"^net\.0\.1\.0\.", "bn1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.", r"layer\1.\2."),
    (r"\.net\.0\.", ".conv1."),
    (r"\.net\.1\.0\.", ".bn1."),
    (r"\.net\.2\.", ".conv2."),
    (r"\.net\.3\.0\.", ".bn2."),
    (r"\.net\.4\.", ".conv3."),
    (r"\.net\.5\.0\.", ".bn3."),
    (r"\.projection\.shortcut\.", ".downsample.0."),
    (r"\.projection\.bn\.0\.", ".downsample.1."),
]


def _simclr2(obj: Any, path: str) -> dict:
    if not (isinstance(obj, dict) and isinstance(obj.get("resnet"), dict)):
        raise CheckpointError(f"{path}: format simclr2 expects {{'resnet': state_dict, 'head': ...}}")
    return rename(tensor_dict(obj["resnet"], path), _SIMCLR2_RULES)


def _detco(obj: Any, path: str) -> dict:
    return rename(tensor_dict(unwrap(obj), path), _DETECTRON2_RULES)


FORMATS = {f.name: f for f in (
    CheckpointFormat("torchvision", _prefixed(None), "imagenet", "torchvision supervised (resnet50-0676ba61.pth ...)"),
    CheckpointFormat("moco", _prefixed("module.encoder_q."), "imagenet", "MoCo v1/v2 (facebookresearch/moco)"),
    CheckpointFormat("mocov3", _prefixed("module.base_encoder."), "imagenet", "MoCo v3 (facebookresearch/moco-v3)"),
    CheckpointFormat("simclr", _prefixed(None), "none", "SimCLR v1 converted (tonylins/simclr-converter)"),
    CheckpointFormat("simclr2", _simclr2, "none", "SimCLR v2 port (Separius/SimCLRv2-Pytorch)"),
    CheckpointFormat("densecl", _prefixed(None), "imagenet", "DenseCL (xinlongwang/DenseCL)"),
    CheckpointFormat("detco", _detco, "imagenet", "DetCo detectron2 pickle (xieenze/DetCo)"),
    CheckpointFormat("swav", _prefixed(None), "swav", "SwAV (facebookresearch/swav)"),
    CheckpointFormat("byol", _prefixed(None), "imagenet", "BYOL converted (ajtejankar/byol-convert)"),
    CheckpointFormat("mmselfsup", _prefixed("backbone."), "imagenet", "mmselfsup 1.x (open-mmlab)"),
)}


def sniff(obj: Any) -> str:
    """Which published layout a loaded ResNet checkpoint is (docs/checkpoints.md)."""
    if isinstance(obj, dict) and isinstance(obj.get("resnet"), dict):
        return "simclr2"
    author = obj.get("author") if isinstance(obj, dict) else None
    keys = keys_of(obj)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("module.encoder_q."):
        return "moco"
    if has("module.base_encoder."):
        return "mocov3"
    if has("stem.conv1.") or has("res2."):
        return "detco"
    if author == "DenseCL":
        return "densecl"
    if has("backbone."):
        return "mmselfsup"
    if has("module.prototypes.") or has("module.projection_head."):
        return "swav"
    if has("module."):
        return "torchvision"
    if isinstance(obj, dict) and "state_dict" in obj and "fc.weight" in keys and "fc.bias" not in keys:
        return "simclr"  # tonylins/simclr-converter never writes fc.bias
    if keys and not any(k.endswith("num_batches_tracked") for k in keys) and "fc.weight" in keys:
        return "byol"  # ajtejankar/byol-convert: torchvision names, no BN counters
    return "torchvision"


# Heads that may be left over after renaming (classifier, projectors, prototypes).
LEFTOVERS = ("fc.", "head.", "heads.", "projection_head.", "projector.", "prototypes.", "predictor.", "fc1000")

for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    BACKBONES.register(BackboneEntry(
        name=_name, build=lambda cfg, _n=_name: from_torchvision(getattr(tv_resnet, _n)(weights=None)),
        formats=FORMATS, sniff=sniff, normalization="imagenet", lora_targets=stage_convs,
        leftover_prefixes=LEFTOVERS, note=f"torchvision {_name}"))

BACKBONES.register(BackboneEntry(
    name="tiny", build=tiny_resnet, formats=FORMATS, sniff=sniff, normalization="imagenet", lora_targets=stage_convs,
    config=TinyConfig, leftover_prefixes=LEFTOVERS, note="one BasicBlock per stage (CPU demo, tests)"))
