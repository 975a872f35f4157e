"""The stage policy, in one place: what each stage freezes and trains, BatchNorm modes, LoRA merging, param groups.

* adapt: the backbone is frozen (no grad, BatchNorm in eval mode even after `.train()`);
  bypass adapters sit outside it, so its forward builds no autograd graph at all. In-line
  adapters sit between its stages (the later frozen stages carry their gradients back), and
  LoRA deltas inside it stay trainable: with either, the backbone forward records a graph
  (`backbone_builds_graph`). Adapters, LV-Adapter, neck and heads train.
* finetune: everything trains (backbone lr x `backbone_lr_mult`). LoRA deltas are merged
  into the plain convs when the adapt stage ends (`finish_stage`).
* Either stage: a task head's lr is lr x `head_lr_mult[task]` (default 1).
* Always: the LV-Adapter's CLIP text encoder is frozen; its prompts train in finetune only
  when `lv_adapter.train_prompts_in_finetune`.

The backbone's BatchNorm, by `model.norm` (the heads use GroupNorm; mechanics in models/norm.py):

| model.norm | adapt | finetune |
| --- | --- | --- |
| frozen | FrozenBatchNorm2d (built so) | FrozenBatchNorm2d: pretrained statistics and affine stay fixed |
| bn | BatchNorm in eval mode (frozen backbone) | per-worker batch statistics |
| syncbn | BatchNorm in eval mode: nothing to sync | statistics over all workers' batches (SyncBatchNorm, converted by `prepare_norm` just before DDP wraps the model, only when several workers run) |

References (job files): `frozen` for GPU runs from a pretrained backbone, as in torchvision's
detection references: with 4 images per GPU, batch statistics are noisy. `syncbn` when the
backbone starts from random init; `bn` for single-worker CPU runs (the demo).
Baselines use the same code: pretrain-finetune is a run whose only stage is finetune;
single-task is `model.tasks` with one task.
"""

from __future__ import annotations

from torch import nn

from paf_ray.config import Config, ModelConfig, StageConfig
from paf_ray.models.adapters import has_lora, merge_lora

STAGE_KINDS = ("adapt", "finetune")


def _model_cfg(model: nn.Module, cfg: Config | ModelConfig | None) -> ModelConfig:
    if cfg is None:
        return model.cfg
    return cfg.model if isinstance(cfg, Config) else cfg


def is_adapter_param(name: str) -> bool:
    return name.startswith("adapters.") or ".lora_" in name


def is_backbone_param(name: str) -> bool:
    """Pretrained backbone weights (LoRA deltas inside the backbone count as adapters)."""
    return name.startswith("backbone.") and ".lora_" not in name


def backbone_builds_graph(model: nn.Module) -> bool:
    """Whether the backbone forward must record autograd: some backbone parameter trains
    (finetune, LoRA deltas), or in-line adapters train, whose gradients pass back through
    the frozen stages after them."""
    if any(p.requires_grad for p in model.backbone.parameters()):
        return True
    return getattr(model, "adapter_kind", None) == "inline" and any(p.requires_grad for p in model.adapters.parameters())


def apply_stage(model: nn.Module, kind: str, cfg: Config | ModelConfig | None = None) -> None:
    """Set requires_grad and BatchNorm modes for stage `kind` ("adapt" | "finetune")."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"train.stages[].kind: unknown stage {kind!r} ({', '.join(STAGE_KINDS)})")
    mcfg = _model_cfg(model, cfg)
    model.requires_grad_(True)
    if kind == "adapt":
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(".lora_" in f".{name}")
        model.backbone_frozen = True
    else:
        model.backbone_frozen = False
    freeze_prompts = kind == "finetune" and not mcfg.lv_adapter.train_prompts_in_finetune
    if hasattr(model, "lv_adapter"):
        from paf_ray.models.lv_adapter import is_prompt_parameter
    for name, p in model.named_parameters():
        if "text_encoder" in name:
            p.requires_grad_(False)
        elif freeze_prompts and name.startswith("lv_adapter.") and is_prompt_parameter(name):
            p.requires_grad_(False)
    model.train(model.training)  # re-applies the frozen-BN rule


def build_norm(model: nn.Module, norm: str) -> None:
    """At build time: `frozen` replaces the backbone's BatchNorm2d by FrozenBatchNorm2d."""
    if norm == "frozen":
        from paf_ray.models.norm import freeze_batchnorm

        freeze_batchnorm(model.backbone)


def prepare_norm(model: nn.Module, norm: str, world_size: int) -> int:
    """Before DDP wraps the model: `syncbn` with several workers converts BatchNorm to SyncBatchNorm.
    Returns the number of layers that synchronise (0: nothing to do)."""
    if norm != "syncbn" or world_size <= 1:
        return 0
    from paf_ray.models.norm import sync_batchnorm

    return sync_batchnorm(model)


def finish_stage(model: nn.Module, kind: str, stage_cfg: StageConfig) -> bool:
    """End-of-stage work: after adapt, merge LoRA deltas (when `merge_adapters`). True if merged."""
    if kind == "adapt" and stage_cfg.merge_adapters and has_lora(model.backbone):
        merge_lora(model.backbone)
        model.adapters_merged = True
        return True
    return False


def head_task(name: str) -> str | None:
    """The task whose head owns parameter `name` ("det_head.x" -> "det"), else None."""
    prefix = name.split(".", 1)[0]
    return prefix[: -len("_head")] if prefix.endswith("_head") else None


def param_groups(model: nn.Module, stage_cfg: StageConfig) -> list[dict]:
    """Optimizer groups over trainable parameters, with their lr and weight decay.

    Backbone lr = lr x backbone_lr_mult; a task head's lr = lr x head_lr_mult[task]; no
    weight decay on norms and biases (any parameter with at most one dimension).
    """
    buckets: dict[tuple[str, bool], list] = {}
    lr_mult: dict[str, float] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        task = head_task(name)
        if is_backbone_param(name):
            owner, mult = "backbone", stage_cfg.backbone_lr_mult
        elif task in stage_cfg.head_lr_mult:
            owner, mult = f"{task}_head", stage_cfg.head_lr_mult[task]
        else:
            owner, mult = "head", 1.0
        lr_mult[owner] = mult
        buckets.setdefault((owner, p.ndim <= 1), []).append(p)
    groups = []
    for (owner, no_decay), params in sorted(buckets.items()):
        groups.append({
            "name": owner + ("_no_decay" if no_decay else ""),
            "params": params,
            "lr": stage_cfg.lr * lr_mult[owner],
            "weight_decay": 0.0 if no_decay else stage_cfg.weight_decay,
        })
    return groups


def param_bucket(name: str) -> str:
    """Which module a parameter is reported under (inspect): adapters collect LoRA deltas too."""
    if is_adapter_param(name):
        return "adapters"
    if "text_encoder" in name:
        return "text_encoder"
    return name.split(".", 1)[0]


def trainable_summary(model: nn.Module) -> dict:
    """{"total", "trainable", "modules": {bucket: {"total", "trainable"}}} in parameter counts."""
    modules: dict[str, dict[str, int]] = {}
    for name in ("backbone", "adapters", "neck", "det_head", "sem_head", "drv_head"):
        if name == "adapters" or hasattr(model, name):
            modules[name] = {"total": 0, "trainable": 0}
    total = trainable = 0
    for name, p in model.named_parameters():
        entry = modules.setdefault(param_bucket(name), {"total": 0, "trainable": 0})
        entry["total"] += p.numel()
        total += p.numel()
        if p.requires_grad:
            entry["trainable"] += p.numel()
            trainable += p.numel()
    return {"total": total, "trainable": trainable, "modules": modules}
