"""LV-Adapter: CLIP language priors through task-specific prompts and vision-text alignment.

Text side (``clip_text.py``): a frozen open_clip text tower encodes, per task, learnable
context vectors followed by each class name (``PROMPT_NAMES``) into one embedding per class.
Vision side: at each configured backbone level, a 1x1 projection maps the features into the
text space (on CLIP's image tower, level 4 starts from CLIP's own: ``init_from_attnpool``);
pixels attend to each task's class embeddings (cross-attention), and the result, projected back,
is added to the features through a zero-initialised scale (an untrained LV-Adapter changes
nothing). At the finest configured level, pixel-text cosine scores / tau
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
CLIP_POOL_LEVEL = 4  # CLIP's attention pool sits on layer4 (stride 32)
FROM_CLIP = "from CLIP attnpool (v_proj, c_proj)"
FROM_SCRATCH = "learned from scratch"

class LVAdapter(nn.Module):
    def __init__(self, cfg: LVAdapterConfig, tasks: list[str], in_channels: dict[int, int], load_weights: bool = True,
                 attnpool: Optional[nn.Module] = None):
        """`load_weights=False`: do not read `cfg.clip_weights` (the caller loads a state dict next).
        `attnpool`: CLIP's attention pool when the backbone is CLIP's image tower (``init_from_attnpool``)."""
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

        self.text_encoder = ClipTextEncoder(cfg.clip_model, cfg.clip_weights, load_weights, cfg.activation)
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
        self.pixel_pos = nn.ParameterDict()  # CLIP's positional embedding, where the projection is CLIP's
        self.projection_source = {lv: FROM_SCRATCH for lv in levels}
        if attnpool is not None and CLIP_POOL_LEVEL in levels:
            self.init_from_attnpool(attnpool, cfg.clip_model)
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

    def init_from_attnpool(self, pool: nn.Module, clip_model: str = "") -> None:
        """Start the level-4 pixel->text projection from CLIP's attention pool (DenseCLIP's reading).

        The pool embeds the image as c_proj(sum_j a_j v_proj(t_j)), t_0 = the mean of the layer4
        pixels, t_j = pixel j, each plus its positional embedding, a_j the attention weights of
        the mean token (per head). Applied per pixel with the grid part of the positional
        embedding resized to the feature map (as DenseCLIP), the pixel embeddings
        c_proj(v_proj(t_j)) are points of CLIP's image-text space, and at initialisation CLIP's
        pooled embedding is their attention-weighted average, head by head. v_proj and c_proj
        are linear, so they are folded into the one 1x1 conv every backbone has: the same
        function, a third of the parameters and FLOPs of keeping both.
        """
        level = str(CLIP_POOL_LEVEL)
        conv = self.proj[level]
        v, c = pool.v_proj, pool.c_proj
        if c.out_features != conv.out_channels or v.in_features != conv.in_channels:
            raise ValueError(
                f"model.lv_adapter.clip_model: {clip_model!r} embeds text in {conv.out_channels} dimensions, but "
                f"the CLIP image tower's attention pool projects {v.in_features} channels into {c.out_features}: "
                "use the text tower of the same CLIP model"
            )
        with torch.no_grad():
            weight = c.weight.double() @ v.weight.double()
            bias = c.weight.double() @ v.bias.double() + c.bias.double()
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(bias)
            grid = pool.positional_embedding[1:].detach()  # row 0 is the mean token's
            side = math.isqrt(grid.shape[0])
            pos = grid.t().reshape(1, grid.shape[1], side, side).float().clone()
        self.pixel_pos[level] = nn.Parameter(pos)
        self.projection_source[CLIP_POOL_LEVEL] = FROM_CLIP

    def pixel_embeddings(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Features [B, C, h, w] at `level` -> pixel embeddings [B, D, h, w] in the text space."""
        pos = self.pixel_pos[str(level)] if str(level) in self.pixel_pos else None
        if pos is not None:
            x = x + F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False).to(x.dtype)
        return self.proj[str(level)](x)

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
            pixels = self.pixel_embeddings(lv, x)  # [B, D, h, w], in the text space
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
