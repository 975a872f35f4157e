"""The LV-Adapter's parameter counts and per-step overhead, side by side (scripts/gpu_bench.sh runs it
on the GPU). Imports neither Ray nor pycocotools; open_clip only for the LV-Adapter itself."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paf_ray.config import from_dict
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import apply_stage
from paf_ray.train.step import StepCounter, make_trainee, train_step


def main(argv: list[str] | None = None) -> int:
    """Parameter counts and the per-step overhead of the LV-Adapter (CPU or CUDA), side by side.

    python -m paf_ray.bench.lv_report [--backbone resnet18] [--size 320x192] [--batch 2] [--steps 5]
                                      [--device cpu|cuda] [--heads small|reference]
    Times one adapt-stage training step (the loop's `train_step`: forward, backward, clip, AdamW
    step, with the adapt stage's default lr and grad_clip) of the same multi-task
    model without and with the LV-Adapter, alternating, and reports medians and their ratio.
    "with, prompts frozen" caches the class embeddings (no text tower in the step), so
    with - frozen is the text tower's share and frozen - without the vision side's. CLIP is
    randomly initialised (`random_init`): the step's cost does not depend on the weights.
    On CUDA the step runs under bf16 autocast with channels_last, as training does.
    """
    p = argparse.ArgumentParser(prog="python -m paf_ray.bench.lv_report")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--clip-model", default="RN50")
    p.add_argument("--size", default="320x192", help="WxH input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--heads", default="small", choices=["small", "reference"],
                   help="small: FPN 64, 128 RoIs (CPU); reference: the config defaults (R50-FPN reference detector)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    width, height = (int(v) for v in args.size.lower().split("x"))

    def build(enabled: bool, prompts_trainable: bool = True):
        small_heads = {
            "fpn_channels": 64,
            "seg_channels": 32,
            "det": {"rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 300,
                    "box_batch_size_per_image": 128, "representation_size": 256},
        }
        cfg = from_dict({
            "data": {"input_size": [width, height]},
            "model": {
                "backbone": {"name": args.backbone, "random_init": True},
                **(small_heads if args.heads == "small" else {}),
                "lv_adapter": {"enabled": enabled, "clip_model": args.clip_model, "random_init": True},
            },
        })
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.input_size).to(device)
        if on_cuda:
            model.to(memory_format=torch.channels_last)
        apply_stage(model, "adapt", cfg)
        if enabled and not prompts_trainable:
            model.lv_adapter.set_prompts_trainable(False)  # class embeddings cached: vision side only
        model.train()
        stage = next(s for s in cfg.train.stages if s.kind == "adapt")
        trainee = make_trainee(model, model, stage, device, amp=on_cuda, total_updates=args.steps + 1,
                               name="lv_report")
        return trainee, StepCounter()

    g = torch.Generator().manual_seed(0)
    b = args.batch
    batch = {
        "boxes": [torch.tensor([[20.0, 30.0, 120.0, 140.0], [150.0, 40.0, 220.0, 100.0]])] * b,
        "labels": [torch.tensor([2, 0])] * b,
        "ignore_boxes": [torch.zeros(0, 4)] * b,
        "sem": torch.randint(0, 19, (b, height, width), generator=g),
        "drv": torch.randint(0, 3, (b, height, width), generator=g),
        "has_det": torch.ones(b, dtype=torch.bool),
        "has_sem": torch.ones(b, dtype=torch.bool),
        "has_drv": torch.ones(b, dtype=torch.bool),
    }
    batch["image"] = torch.randint(0, 256, (b, 3, height, width), dtype=torch.uint8, generator=g)
    batch = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}

    def step(trainee, counter) -> tuple[float, float]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        outcome = train_step(trainee, batch, counter)
        sync()
        if not outcome.updated:
            raise RuntimeError(f"lv_report: the training step was skipped ({outcome.skipped})")
        return time.perf_counter() - start, time.process_time() - start_cpu

    runs = {"without": build(False), "with": build(True), "with, prompts frozen": build(True, False)}
    lv = runs["with"][0].net.lv_adapter
    trainable = sum(q.numel() for n, q in lv.named_parameters() if q.requires_grad)
    frozen = sum(q.numel() for q in lv.text_encoder.parameters())
    # Wall time, and process CPU time, which other processes on a shared machine disturb less.
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for i in range(args.steps + 1):  # the first step of each is warm-up
        for name, (trainee, counter) in runs.items():
            t = step(trainee, counter)
            if i:
                times[name].append(t)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"LV-Adapter ({args.clip_model}): trainable {trainable:,} parameters "
          f"(prompts {sum(q.numel() for q in lv.prompts.parameters()):,}), frozen text tower {frozen:,}")
    where = torch.cuda.get_device_name(device) + ", bf16 autocast" if on_cuda else f"CPU, {args.threads} threads"
    print(f"adapt step, {args.backbone} ({args.heads} heads) {width}x{height} batch {b}, {where}, median of {args.steps}:")
    for name in runs:
        print(f"  {name:<22} wall {med[name]:7.3f} s ({med[name] / med['without']:.2f}x)   "
              f"CPU {cpu[name]:7.3f} s ({cpu[name] / cpu['without']:.2f}x)")
    text = med["with"] - med["with, prompts frozen"]
    vision = med["with, prompts frozen"] - med["without"]
    print(f"  LV-Adapter wall overhead {med['with'] - med['without']:.3f} s: text tower with trained prompts "
          f"{text:.3f} s, vision side (projection, cross-attention, score maps, alignment loss, wider heads) {vision:.3f} s")


    return 0


if __name__ == "__main__":
    raise SystemExit(main())
