"""`paf-ray inspect CONFIG [--stage adapt|finetune] [--json]`: parameter counts and forward cost.

Builds the model from the config without reading any data or checkpoint file, applies the
stage policy (for `finetune`, LoRA deltas merged first when an earlier adapt stage merges
them, as in a real run), and counts parameters per module. GFLOPs: one eval forward at
`data.input_size`, batch 1, counted by torch.utils.flop_counter (2 FLOPs per multiply-add;
convolutions and matmuls; RoIAlign, NMS and interpolation are not counted).
"""

from __future__ import annotations

import torch

from paf_ray.models.backbones import BACKBONES
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import apply_stage, backbone_builds_graph, finish_stage, trainable_summary


def forward_gflops(model: torch.nn.Module, input_size: tuple[int, int],
                   device: torch.device | None = None) -> tuple[float, dict[str, float]]:
    """GFLOPs of one eval forward (batch 1) in all and per top-level module (the input on `device`)."""
    from torch.utils.flop_counter import FlopCounterMode

    width, height = input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=gen).to(device or "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    root = type(model).__name__
    counts = {tuple(name.split(".")): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    per_module = {}
    for child, module in model.named_children():
        if child == "heads":  # one entry per task head
            parts = {f"{task}_head": counts.get((root, child, task), 0) for task in module}
        else:
            flops = counts.get((root, child))
            if flops is None:  # containers never called themselves (the adapters' ModuleDict): sum their children
                flops = sum(v for k, v in counts.items() if len(k) == 3 and k[:2] == (root, child))
            parts = {child: flops}
        per_module.update({k: round(v / 1e9, 3) for k, v in parts.items() if v})
    return counter.get_total_flops() / 1e9, per_module


def inspect_model(cfg, stage: str | None = None, flops: bool = True) -> dict:
    kinds = [s.kind for s in cfg.train.stages]
    stage = stage or (kinds[0] if kinds else "finetune")
    torch.manual_seed(0)  # random init decides how many proposals survive NMS, hence the RoI-head FLOPs
    model = build_model(cfg.model, cfg.data.input_size, load_weights=False)
    if stage == "finetune":
        for s in cfg.train.stages:
            if s.kind == "finetune":
                break
            finish_stage(model, s.kind, s.merge_adapters)
    apply_stage(model, stage, cfg.model.lv_adapter.train_prompts_in_finetune)
    report = {"stage": stage, **trainable_summary(model)}
    report["adapters_merged"] = bool(model.adapters_merged)
    report["backbone"] = {"name": cfg.model.backbone.name, "note": BACKBONES[cfg.model.backbone.name].note,
                          "stage_channels": {str(k): v for k, v in model.backbone.stage_channels.items()}}
    report["tasks"] = model.task_names
    report["adapter"] = {"kind": cfg.model.adapter.kind, "stages": sorted(set(cfg.model.adapter.stages)),
                         "placement": model.adapter.placement}
    report["backbone_graph"] = backbone_builds_graph(model)
    report["input_size"] = list(cfg.data.input_size)
    lv = getattr(model, "lv_adapter", None)
    if lv is not None:  # where the LV-Adapter's pixel->text projection starts, per backbone level
        report["lv_projection"] = {str(level): source for level, source in lv.projection_source.items()}
    if flops:
        try:
            total, per_module = forward_gflops(model, cfg.data.input_size)
            report["gflops"] = round(total, 3)
            report["gflops_modules"] = per_module
        except Exception as e:  # counting is best effort; the counts above stand on their own
            report["gflops_error"] = f"{type(e).__name__}: {e}"
    return report


def report_text(report: dict) -> str:
    bb = report["backbone"]
    lines = [f"stage: {report['stage']}   input (w, h): {tuple(report['input_size'])}   tasks: {', '.join(report['tasks'])}",
             f"backbone: {bb['name']} ({bb['note']}), stage channels {list(bb['stage_channels'].values())}",
             f"adapters: {report['adapter']['kind']} at stages {report['adapter']['stages']}: "
             f"{report['adapter']['placement']}",
             f"backbone forward records autograd in this stage: {'yes' if report['backbone_graph'] else 'no'}",
             f"{'module':<14}{'total':>14}{'trainable':>14}"]
    for name, c in report["modules"].items():
        lines.append(f"{name:<14}{c['total']:>14,}{c['trainable']:>14,}")
    lines.append(f"{'all':<14}{report['total']:>14,}{report['trainable']:>14,}")
    for level, source in report.get("lv_projection", {}).items():
        lines.append(f"pixel→text projection (level {level}): {source}")
    if "gflops" in report:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in report["gflops_modules"].items())
        lines.append(f"forward GFLOPs (batch 1): {report['gflops']:.2f}  ({parts})")
    else:
        lines.append(f"forward GFLOPs: not counted ({report.get('gflops_error')})")
    return "\n".join(lines)
