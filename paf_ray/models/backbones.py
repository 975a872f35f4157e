"""Backbones: image -> features at strides 4, 8, 16, 32, keyed 1..4.

Every backbone keeps torchvision's module names (`conv1`, `bn1`, `layer1`..`layer4`, ...)
so checkpoint keys map onto it directly and adapters find the stages by name. None
carries a classifier or pooling head: those are the keys the checkpoint zoo drops.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

STAGES = (1, 2, 3, 4)  # stage k has stride 2 ** (k + 1)


def run_stages(net: nn.Module, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None) -> dict[int, torch.Tensor]:
    """layer1..layer4 in turn; `after_stage["k"]` (in-line adapters), when given, maps stage k's
    output before stage k+1 reads it and before it is returned."""
    feats = {}
    for k in STAGES:
        x = getattr(net, f"layer{k}")(x)
        if after_stage is not None and str(k) in after_stage:
            x = after_stage[str(k)](x)
        feats[k] = x
    return feats


class ResNetFeatures(nn.Module):
    """torchvision ResNet (or the `tiny` net) without avgpool/fc; forward -> {1..4: C2..C5}."""

    def __init__(self, conv1, bn1, maxpool, layers: list[nn.Module], out_channels: dict[int, int]):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return run_stages(self, x, after_stage)


class ClipResNetFeatures(nn.Module):
    """open_clip ModifiedResNet (CLIP RN50 image tower); its attention pool only until the model takes it.

    The attention pool (14.8 M parameters) holds CLIP's projection from pixels into the joint
    image-text space. It stays here while the weights load (so a CLIP file must supply it), then
    the multi-task model takes it out (``take_attnpool``) and the LV-Adapter starts its pixel->text
    projection from it. It never stays in the backbone: no head uses the pooled embedding, and
    parameters that never take part would stall DDP in finetuning.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool"):
            setattr(self, name, getattr(visual, name))
        self.layer1, self.layer2, self.layer3, self.layer4 = visual.layer1, visual.layer2, visual.layer3, visual.layer4
        self.attnpool = visual.attnpool
        width = visual.layer1[0].conv1.in_channels
        self.out_channels = {k: width * 4 * 2 ** (k - 1) for k in STAGES}

    def take_attnpool(self) -> nn.Module:
        """Remove the attention pool from the backbone and return it (open_clip's AttentionPool2d)."""
        pool = self.attnpool
        del self.attnpool
        return pool

    def forward(self, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        return run_stages(self, x, after_stage)


def _from_torchvision(net: tv_resnet.ResNet) -> ResNetFeatures:
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    out = {k: layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
           for k, layer in zip(STAGES, layers)}
    return ResNetFeatures(net.conv1, net.bn1, net.maxpool, layers, out)


def tiny_resnet(width: int = 16) -> ResNetFeatures:
    """A ResNet-shaped net for CPU tests and the demo: one BasicBlock per stage, widths width * (1, 2, 4, 8)."""
    if width < 4:
        raise ValueError(f"model.backbone.tiny_width: must be >= 4, got {width}")
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


def clip_rn50() -> ClipResNetFeatures:
    """The CLIP RN50 image tower as open_clip builds it (`create_model("RN50").visual`), random init."""
    from open_clip import get_model_config
    from open_clip.modified_resnet import ModifiedResNet

    cfg = get_model_config("RN50")
    vision = cfg["vision_cfg"]
    visual = ModifiedResNet(
        layers=vision["layers"],
        output_dim=cfg["embed_dim"],
        heads=vision["width"] * 32 // 64,  # as open_clip's _build_vision_tower
        image_size=vision["image_size"],
        width=vision["width"],
    )
    return ClipResNetFeatures(visual)


def build_backbone(name: str, tiny_width: int = 16) -> nn.Module:
    """A randomly initialised backbone; weights come from `zoo.load_backbone_weights`."""
    if name in ("resnet18", "resnet34", "resnet50"):
        return _from_torchvision(getattr(tv_resnet, name)(weights=None))
    if name == "tiny":
        return tiny_resnet(tiny_width)
    if name == "clip_rn50":
        return clip_rn50()
    raise ValueError(f"model.backbone.name: unknown backbone {name!r} (resnet18, resnet34, resnet50, clip_rn50, tiny)")


def default_normalization(name: str) -> str:
    """Normalisation recipe of a randomly initialised backbone."""
    return "clip" if name == "clip_rn50" else "imagenet"
