"""What a backbone plug-in declares (``BackboneEntry``) and what its module does.

A backbone module maps a normalised image to features at strides 4, 8, 16, 32, keyed 1..4:

    module.stage_channels  {1: C2, 2: C3, 3: C4, 4: C5}
    module(x, after_stage=None) -> {1: C2, 2: C3, 3: C4, 4: C5}

``after_stage["k"]``, when given, maps stage k's output before stage k+1 reads it (in-line
adapters). The entry says how to build the module, which checkpoint layouts the zoo reads for it
(each with the input normalisation its weights were trained with), how to tell them apart, which
layers LoRA deltas wrap, and whether it holds a language-aligned pool the LV-Adapter starts from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from paf_ray.models.zoo import CheckpointError

STAGES = (1, 2, 3, 4)  # stage k has stride 2 ** (k + 1)


@dataclass(frozen=True)
class CheckpointFormat:
    """One published checkpoint layout: how its object becomes the backbone's state dict."""

    name: str
    convert: Callable[[Any, str], dict[str, torch.Tensor]]  # (loaded object, path) -> state dict in our names
    normalization: str  # the recipe its weights were trained with (models/normalize.py)
    source: str = ""  # who publishes it (docs/checkpoints.md)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    build: Callable[[Any], nn.Module]  # (its options section or None) -> a randomly initialised module
    formats: dict[str, CheckpointFormat]
    sniff: Callable[[Any], str]  # a loaded checkpoint object -> the name of one of `formats`
    normalization: str  # the recipe of a randomly initialised module
    lora_targets: Callable[[nn.Module, list[int]], list[nn.Module]]  # (module, stages) -> layers to wrap
    config: type | None = None  # the dataclass of its options section model.backbone.<name>
    # keys a checkpoint may carry beyond the backbone after conversion (classifier, projectors...)
    leftover_prefixes: tuple[str, ...] = ()
    strides: tuple[int, ...] = (4, 8, 16, 32)
    # takes the language-aligned pool out of the module (CLIP's attention pool) for the LV-Adapter
    take_language_pool: Callable[[nn.Module], nn.Module | None] = field(default=lambda module: None)
    # when set, why this backbone is only worth its cost with pretrained weights: a config without
    # model.backbone.weights is refused (unless random_init) with this reason
    requires_weights: str = ""
    note: str = ""  # one line for `paf-ray inspect` and docs


def run_stages(stages: list[nn.Module], x: torch.Tensor, after_stage: Mapping[str, nn.Module] | None) -> dict[int, torch.Tensor]:
    """The stage modules in turn; `after_stage["k"]` (in-line adapters), when given, maps stage k's
    output before stage k+1 reads it and before it is returned."""
    feats = {}
    for k, stage in zip(STAGES, stages):
        x = stage(x)
        if after_stage is not None and str(k) in after_stage:
            x = after_stage[str(k)](x)
        feats[k] = x
    return feats


def rename(sd: dict, rules: list[tuple[str, Any]]) -> dict:
    """Apply regex (pattern, replacement) rules to every key, in order."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def tensor_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a mapping (numpy arrays of detectron2 pickles become tensors)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif type(v).__module__ == "numpy" and hasattr(v, "shape"):
            out[k] = torch.as_tensor(v)
    return out


def unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint ({'state_dict': ...} / {'model': ...})."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def keys_of(obj: Any) -> list[str]:
    sd = unwrap(obj)
    return list(sd) if isinstance(sd, dict) else []
