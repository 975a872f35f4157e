"""LV-Adapter: CLIP language priors through task-specific prompts and vision-text alignment.

Text side (``clip_text.py``): a frozen open_clip text tower encodes, per task, learnable
context vectors followed by each class name (``PROMPT_NAMES``) into one embedding per class.
Vision side: at each configured backbone level, a 1x1 projection maps the features into the
text space; pixels attend to each task's class embeddings (cross-attention), and the result,
projected back, is added to the features through a zero-initialised scale (an untrained
LV-Adapter changes nothing). At the finest configured level, pixel-text cosine scores / tau
give per-task score maps, which the heads may take as extra input channels and which
``alignment_loss`` supervises with the masks (sem, drv) and image-level labels (det).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from paf_ray.config import LVAdapterConfig
from paf_ray.data.bdd100k import IGNORE_INDEX, NUM_CLASSES, PROMPT_NAMES
from paf_ray.models.clip_text import ClipTextEncoder, PromptLearner

# Parameter-name marker of the prompt context vectors (the stage policy freezes them by name).
PROMPT_PARAM_PREFIX = "prompts.ctx."

class LVAdapter(nn.Module):
    def __init__(self, cfg: LVAdapterConfig, tasks: list[str], in_channels: dict[int, int], load_weights: bool = True):
        """`load_weights=False`: do not read `cfg.clip_weights` (the caller loads a state dict next)."""
        super().__init__()
        unknown = [t for t in tasks if t not in PROMPT_NAMES]
        if unknown or not tasks:
            raise ValueError(f"model.tasks: the LV-Adapter needs tasks from {sorted(PROMPT_NAMES)}, got {tasks}")
        levels = sorted(set(cfg.levels))
        missing = [lv for lv in levels if lv not in in_channels]
        if not levels or missing:
            raise ValueError(
                f"model.lv_adapter.levels: {cfg.levels} must be a non-empty subset of the backbone stages "
                f"{sorted(in_channels)} (1..4 = strides 4..32)"
            )
        if not cfg.tau > 0:
            raise ValueError(f"model.lv_adapter.tau: must be > 0, got {cfg.tau}")
        self.tasks = list(tasks)
        self.levels = levels
        self.score_level = levels[0]
        self.align_weight = cfg.align_weight
        for t in self.tasks:
            assert len(PROMPT_NAMES[t]) == NUM_CLASSES[t], t
        self.score_channels = {t: NUM_CLASSES[t] for t in self.tasks}

        self.text_encoder = ClipTextEncoder(cfg.clip_model, cfg.clip_weights, load_weights)
        self.prompts = PromptLearner(
            self.text_encoder,
            {t: PROMPT_NAMES[t] for t in self.tasks},
            n_ctx=cfg.n_ctx,
            ctx_init=cfg.ctx_init,
            task_specific=cfg.task_specific,
        )
        dim = self.text_encoder.embed_dim
        if dim % cfg.heads:
            raise ValueError(
                f"model.lv_adapter.heads: {cfg.heads} does not divide the text embedding size {dim} of {cfg.clip_model!r}"
            )
        self.text_norm = nn.LayerNorm(dim)
        self.proj = nn.ModuleDict({str(lv): nn.Conv2d(in_channels[lv], dim, 1) for lv in levels})
        self.query_norm = nn.ModuleDict({str(lv): nn.LayerNorm(dim) for lv in levels})
        self.cross_attn = nn.ModuleDict(
            {str(lv): nn.MultiheadAttention(dim, cfg.heads, batch_first=True) for lv in levels}
        )
        self.out_proj = nn.ModuleDict({str(lv): nn.Conv2d(dim, in_channels[lv], 1) for lv in levels})
        self.scale = nn.ParameterDict({str(lv): nn.Parameter(torch.zeros(1)) for lv in levels})
        if cfg.learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau)))
        else:
            self.register_buffer("log_tau", torch.tensor(math.log(cfg.tau)), persistent=False)
        self._cache: Optional[tuple[tuple, dict[str, torch.Tensor]]] = None

    # ------------------------------------------------------------------ text side

    def prompts_trainable(self) -> bool:
        return any(p.requires_grad for p in self.prompts.parameters())

    def set_prompts_trainable(self, trainable: bool) -> None:
        self.prompts.requires_grad_(trainable)

    def _cache_key(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter.
        tensors = list(self.prompts.parameters()) + list(self.text_encoder.parameters())
        return tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in tensors)

    def class_embeddings(self) -> dict[str, torch.Tensor]:
        """{task: [K_task, D]}; recomputed with grad while prompts train, else cached."""
        if self.training and self.prompts_trainable():
            self._cache = None
            return self.prompts(self.text_encoder)
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, {t: e.detach() for t, e in self.prompts(self.text_encoder).items()})
        return self._cache[1]

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    # ------------------------------------------------------------------ vision side

    def forward(self, feats: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        text = self.class_embeddings()
        keys = {t: self.text_norm(e) for t, e in text.items()}
        out = dict(feats)
        scores: dict[str, torch.Tensor] = {}
        for lv in self.levels:
            x = feats[lv]
            b, _, h, w = x.shape
            pixels = self.proj[str(lv)](x)  # [B, D, h, w], in the text space
            queries = self.query_norm[str(lv)](pixels.flatten(2).transpose(1, 2))  # [B, hw, D]
            context = 0
            for t in self.tasks:
                kv = keys[t].to(queries.dtype).unsqueeze(0).expand(b, -1, -1)
                attended, _ = self.cross_attn[str(lv)](queries, kv, kv, need_weights=False)
                context = context + attended
            context = (context / len(self.tasks)).transpose(1, 2).reshape(b, -1, h, w)
            out[lv] = x + self.scale[str(lv)].to(x.dtype) * self.out_proj[str(lv)](context)
            if lv == self.score_level:
                pix = F.normalize(pixels, dim=1)
                for t in self.tasks:
                    cls = F.normalize(text[t].to(pix.dtype), dim=-1)
                    scores[t] = torch.einsum("bdhw,kd->bkhw", pix, cls) / self.tau.to(pix.dtype)
        return out, scores

    # ------------------------------------------------------------------ loss

    def alignment_loss(self, score_maps: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Pixel-text CE for sem/drv + image-level multi-label BCE for det, each over the samples
        that have the task; an exact, grad-connected zero when none has any. Unweighted: the
        model's ``total_loss`` multiplies it by ``align_weight``."""
        # Touch every score map so the graph (and DDP) sees all LV-Adapter parameters.
        total = sum(s.float().sum() for s in score_maps.values()) * 0.0
        for task in ("sem", "drv"):
            if task not in score_maps or task not in batch:
                continue
            s = score_maps[task]
            has = _has(batch, task, s)
            if not bool(has.any()):
                continue
            target = torch.as_tensor(batch[task], device=s.device)[has]
            target = F.interpolate(target[:, None].float(), size=s.shape[-2:], mode="nearest")[:, 0].long()
            valid = target != IGNORE_INDEX
            if bool(valid.any()):
                total = total + F.cross_entropy(s[has].float(), target, ignore_index=IGNORE_INDEX)
        if "det" in score_maps and "labels" in batch:
            s = score_maps["det"]
            has = _has(batch, "det", s)
            if bool(has.any()):
                target = torch.zeros(s.shape[0], s.shape[1], device=s.device)
                for i, labels in enumerate(batch["labels"]):
                    labels = torch.as_tensor(labels, device=s.device, dtype=torch.long)
                    if labels.numel():
                        target[i, labels] = 1.0
                image_logits = s.float().flatten(2).amax(dim=-1)  # [B, K]: best-matching pixel per class
                total = total + F.binary_cross_entropy_with_logits(image_logits[has], target[has])
        return total


def _has(batch: dict, task: str, like: torch.Tensor) -> torch.Tensor:
    key = f"has_{task}"
    if key not in batch:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return torch.as_tensor(batch[key], device=like.device).bool()


def is_prompt_parameter(name: str) -> bool:
    """True for the prompt context vectors, given a name relative to the model or the adapter."""
    return name.startswith(PROMPT_PARAM_PREFIX) or f".{PROMPT_PARAM_PREFIX}" in name


def _overhead_report(argv: list[str] | None = None) -> None:
    """Parameter counts and the per-step CPU overhead of the LV-Adapter, side by side.

    python -m paf_ray.models.lv_adapter [--backbone resnet18] [--size 320x192] [--batch 2] [--steps 5]
    Times one adapt-stage training step (forward, backward, AdamW step) of the same multi-task
    model without and with the LV-Adapter, alternating, and reports medians and their ratio.
    """
    import argparse
    import statistics
    import time

    from paf_ray.config import from_dict
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import apply_stage

    p = argparse.ArgumentParser(prog="python -m paf_ray.models.lv_adapter")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--clip-model", default="RN50")
    p.add_argument("--size", default="320x192", help="WxH input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))

    def build(enabled: bool, prompts_trainable: bool = True):
        cfg = from_dict({
            "data": {"input_size": [width, height]},
            "model": {
                "backbone": {"name": args.backbone, "random_init": True},
                "fpn_channels": 64,
                "seg_channels": 32,
                "det": {"rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 300,
                        "box_batch_size_per_image": 128, "representation_size": 256},
                "lv_adapter": {"enabled": enabled, "clip_model": args.clip_model},
            },
        })
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.input_size)
        apply_stage(model, "adapt", cfg)
        if enabled and not prompts_trainable:
            model.lv_adapter.set_prompts_trainable(False)  # class embeddings cached: vision side only
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        return model, opt

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
    images = torch.randint(0, 256, (b, 3, height, width), dtype=torch.uint8, generator=g)

    def step(model, opt) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model.total_loss(model(images, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    runs = {"without": build(False), "with": build(True), "with, prompts frozen": build(True, False)}
    lv = runs["with"][0].lv_adapter
    trainable = sum(q.numel() for n, q in lv.named_parameters() if q.requires_grad)
    frozen = sum(q.numel() for q in lv.text_encoder.parameters())
    # Wall time, and process CPU time, which other processes on a shared machine disturb less.
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for i in range(args.steps + 1):  # the first step of each is warm-up
        for name, (model, opt) in runs.items():
            t = step(model, opt)
            if i:
                times[name].append(t)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"LV-Adapter ({args.clip_model}): trainable {trainable:,} parameters "
          f"(prompts {sum(q.numel() for q in lv.prompts.parameters()):,}), frozen text tower {frozen:,}")
    print(f"adapt step, {args.backbone} {width}x{height} batch {b}, {args.threads} threads, median of {args.steps}:")
    for name in runs:
        print(f"  {name:<22} wall {med[name]:7.3f} s ({med[name] / med['without']:.2f}x)   "
              f"CPU {cpu[name]:7.3f} s ({cpu[name] / cpu['without']:.2f}x)")


if __name__ == "__main__":
    _overhead_report()
