"""The stage policy, in one place: what each stage freezes and trains, BatchNorm modes, LoRA merging, param groups.

* adapt: the backbone is frozen (no grad, BatchNorm in eval mode even after `.train()`) but for
  the parameters its adapter kind owns inside it (LoRA deltas); bypass adapters sit outside it,
  so its forward builds no autograd graph at all. In-line adapters sit between its stages (the
  later frozen stages carry their gradients back), and LoRA deltas inside it train: with either,
  the backbone forward records a graph (`backbone_builds_graph`). Adapters, LV-Adapter, neck and
  heads train.
* finetune: everything trains (backbone lr x `backbone_lr_mult`). LoRA deltas are merged
  into the plain convs when the adapt stage ends (`finish_stage`).
* Either stage: a task head's lr is lr x `head_lr_mult[task]` (default 1).
* Always: the LV-Adapter's CLIP text encoder is frozen; its prompts train in finetune only
  when `lv_adapter.train_prompts_in_finetune`.
* Which parameters an adapter owns, whether its gradients need the frozen backbone's graph and
  what happens when adapt ends (LoRA: merge) is the adapter kind's (models/adapters).

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

from paf_ray.models.norm import freeze_batchnorm, sync_batchnorm

STAGE_KINDS = ("adapt", "finetune")


def adapter_params(model: nn.Module) -> set[int]:
    """ids of the parameters the model's adapter kind owns (LoRA deltas inside the backbone included)."""
    return {id(p) for p in model.adapter.owned(model)}


def backbone_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the pretrained backbone, without the adapters' own (e.g. LoRA deltas)."""
    owned = adapter_params(model)
    return [(f"backbone.{n}", p) for n, p in model.backbone.named_parameters() if id(p) not in owned]


def backbone_builds_graph(model: nn.Module) -> bool:
    """Whether the backbone forward must record autograd: some backbone parameter trains
    (finetune, LoRA deltas), or adapters train whose gradients pass back through frozen stages
    (in-line adapters)."""
    if any(p.requires_grad for p in model.backbone.parameters()):
        return True
    return model.adapter.graph_through_backbone and any(p.requires_grad for p in model.adapter.owned(model))


def apply_stage(model: nn.Module, kind: str, train_prompts_in_finetune: bool = True) -> None:
    """Set requires_grad and BatchNorm modes for stage `kind` ("adapt" | "finetune")."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"train.stages[].kind: unknown stage {kind!r} ({', '.join(STAGE_KINDS)})")
    model.requires_grad_(True)
    if kind == "adapt":
        model.backbone.requires_grad_(False)
        for p in model.adapter.owned(model):  # the adapter decides what trains inside the frozen network
            p.requires_grad_(True)
    model.backbone_frozen = kind == "adapt"
    lv = getattr(model, "lv_adapter", None)
    if lv is not None:
        lv.text_encoder.requires_grad_(False)
        if kind == "finetune" and not train_prompts_in_finetune:
            lv.prompts.requires_grad_(False)
    model.train(model.training)  # re-applies the frozen-BN rule


def build_norm(model: nn.Module, norm: str) -> None:
    """At build time: `frozen` replaces the backbone's BatchNorm2d by FrozenBatchNorm2d."""
    if norm == "frozen":
        freeze_batchnorm(model.backbone)


def prepare_norm(model: nn.Module, norm: str, world_size: int) -> int:
    """Before DDP wraps the model: `syncbn` with several workers converts BatchNorm to SyncBatchNorm.
    Returns the number of layers that synchronise (0: nothing to do)."""
    if norm != "syncbn" or world_size <= 1:
        return 0
    return sync_batchnorm(model)


def finish_stage(model: nn.Module, kind: str, merge_adapters: bool = True) -> bool:
    """End-of-stage work: after adapt, the adapter kind folds its adapters into the network where it
    can (LoRA), when `merge_adapters`. True if it did."""
    if kind == "adapt" and merge_adapters and not model.adapters_merged and model.adapter.finish(model):
        model.adapters_merged = True
        return True
    return False


def head_task(name: str) -> str | None:
    """The task whose head owns parameter `name` ("heads.det.x" -> "det"), else None."""
    parts = name.split(".", 2)
    return parts[1] if parts[0] == "heads" and len(parts) > 2 else None


def param_groups(model: nn.Module, stage_cfg) -> list[dict]:
    """Optimizer groups over trainable parameters, with their lr and weight decay.

    Backbone lr = lr x backbone_lr_mult; a task head's lr = lr x head_lr_mult[task]; no
    weight decay on norms and biases (any parameter with at most one dimension).
    """
    backbone = {id(p) for _, p in backbone_params(model)}
    buckets: dict[tuple[str, bool], list] = {}
    lr_mult: dict[str, float] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        task = head_task(name)
        if id(p) in backbone:
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


def trainable_summary(model: nn.Module) -> dict:
    """{"total", "trainable", "modules": {part: {"total", "trainable"}}} in parameter counts: the backbone,
    the adapters (with the deltas they keep inside the backbone), the neck, each task's head, the
    LV-Adapter (its frozen text encoder apart) and the loss weights."""
    owned = adapter_params(model)
    lv = getattr(model, "lv_adapter", None)
    text = {id(p) for p in lv.text_encoder.parameters()} if lv is not None else set()
    modules: dict[str, dict[str, int]] = {"backbone": {"total": 0, "trainable": 0}, "adapters": {"total": 0, "trainable": 0}}
    total = trainable = 0
    for name, p in model.named_parameters():
        if id(p) in owned:
            part = "adapters"
        elif id(p) in text:
            part = "text_encoder"
        elif head_task(name):
            part = f"{head_task(name)}_head"
        else:
            part = name.split(".", 1)[0]
        entry = modules.setdefault(part, {"total": 0, "trainable": 0})
        entry["total"] += p.numel()
        total += p.numel()
        if p.requires_grad:
            entry["trainable"] += p.numel()
            trainable += p.numel()
    return {"total": total, "trainable": trainable, "modules": modules}
