"""CLIP RN50's image tower (open_clip's ModifiedResNet) as a backbone, read from CLIP's own files.

The attention pool (14.8 M parameters) holds CLIP's projection from pixels into the joint
image-text space. It stays in the module while the weights load (so a CLIP file must supply it),
then the multi-task model takes it out (``take_language_pool``) and the LV-Adapter starts its
pixel->text projection from it. It never stays in the backbone: no head uses the pooled
embedding, and parameters that never take part would stall DDP in finetuning.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from paf_ray.models.backbones.base import STAGES, BackboneEntry, CheckpointFormat, run_stages, tensor_dict, unwrap
from paf_ray.models.backbones.registry import BACKBONES
from paf_ray.models.backbones.resnet import stage_convs


class ClipResNetFeatures(nn.Module):
    """open_clip ModifiedResNet (CLIP RN50 image tower); its attention pool only until the model takes it."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool"):
            setattr(self, name, getattr(visual, name))
        self.layer1, self.layer2, self.layer3, self.layer4 = visual.layer1, visual.layer2, visual.layer3, visual.layer4
        self.attnpool = visual.attnpool
        width = visual.layer1[0].conv1.in_channels
        self.stage_channels = {k: width * 4 * 2 ** (k - 1) for k in STAGES}

    def forward(self, x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        return run_stages([self.layer1, self.layer2, self.layer3, self.layer4], x, after_stage)


def clip_rn50(options: Any = None) -> ClipResNetFeatures:
    """The CLIP RN50 image tower as open_clip builds it (`create_model("RN50").visual`), random init."""
    from open_clip import get_model_config
    from open_clip.modified_resnet import ModifiedResNet

    clip_cfg = get_model_config("RN50")
    vision = clip_cfg["vision_cfg"]
    visual = ModifiedResNet(layers=vision["layers"], output_dim=clip_cfg["embed_dim"],
                            heads=vision["width"] * 32 // 64,  # as open_clip's _build_vision_tower
                            image_size=vision["image_size"], width=vision["width"])
    return ClipResNetFeatures(visual)


def take_attnpool(module: ClipResNetFeatures) -> nn.Module:
    """Remove the attention pool from the backbone and return it (open_clip's AttentionPool2d)."""
    pool = module.attnpool
    del module.attnpool
    return pool


def _visual(obj: Any, path: str) -> dict:
    """OpenAI's or open_clip's CLIP file: the image tower's keys (`visual.*`, prefix stripped)."""
    sd = tensor_dict(unwrap(obj), path)
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


BACKBONES.register(BackboneEntry(
    name="clip_rn50", build=clip_rn50,
    formats={"clip": CheckpointFormat("clip", _visual, "clip", "OpenAI RN50.pt / open_clip RN50 .safetensors")},
    sniff=lambda obj: "clip", normalization="clip", lora_targets=stage_convs, take_language_pool=take_attnpool,
    requires_weights="needs CLIP's weights (the same file as model.lv_adapter.clip_weights, e.g. OpenAI's RN50.pt "
                     "with trust_checkpoint: true, or open_clip's .safetensors)",
    note="CLIP RN50 image tower (open_clip ModifiedResNet); its attention pool seeds the LV-Adapter"))
