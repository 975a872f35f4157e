"""LV-Adapter: CLIP language priors through task-specific prompts and vision-text alignment.

Text side (``clip_text.py``): a frozen open_clip text tower encodes, per task, learnable
context vectors followed by each class name (the task's ``prompt_names``) into one embedding per class.
Vision side: at each configured backbone level, a 1x1 projection maps the features into the
text space (on CLIP's image tower, level 4 starts from CLIP's own: ``init_from_attnpool``);
pixels attend to each task's class embeddings (cross-attention), giving one language context per
task. ``context: per_task`` (the default): each task's context, projected back by its own 1x1 conv
and zero-initialised scale, is added to that task's copy of the features, which feed that task's
branch only (its FPN pass and head); ``shared``: the tasks' contexts are averaged, projected back
and added to the one set of features every head reads. Either way an untrained LV-Adapter changes
nothing (the scales start at zero). At the finest configured level, pixel-text cosine scores / tau
give per-task score maps, which the heads take as extra input channels and which each task's
``alignment_loss`` supervises with its targets (tasks/base.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from paf_ray.models.clip_text import ClipTextEncoder, PromptLearner

CLIP_POOL_LEVEL = 4  # CLIP's attention pool sits on layer4 (stride 32)
FROM_CLIP = "from CLIP attnpool (v_proj, c_proj)"
FROM_SCRATCH = "learned from scratch"

class LVAdapter(nn.Module):
    def __init__(self, cfg, prompt_names: dict[str, tuple[str, ...]], in_channels: dict[int, int],
                 load_weights: bool = True, attnpool: Optional[nn.Module] = None):
        """`cfg`: model.lv_adapter (validated at load); `prompt_names`: task -> its classes as prompts read
        them. `load_weights=False`: do not read `cfg.clip_weights` (the caller loads a state dict next).
        `attnpool`: CLIP's attention pool when the backbone is CLIP's image tower (``init_from_attnpool``)."""
        super().__init__()
        self.tasks = list(prompt_names)
        self.levels = sorted(set(cfg.levels))
        self.score_level = self.levels[0]
        self.align_weight = cfg.align_weight
        self.score_channels = {t: len(names) for t, names in prompt_names.items()}
        levels = self.levels

        self.text_encoder = ClipTextEncoder(cfg.clip_model, cfg.clip_weights, load_weights, cfg.activation)
        self.prompts = PromptLearner(
            self.text_encoder,
            dict(prompt_names),
            n_ctx=cfg.n_ctx,
            ctx_init=cfg.ctx_init,
            task_specific=cfg.task_specific,
        )
        dim = self.text_encoder.embed_dim
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
        self.per_task = cfg.context == "per_task"
        # back from the text space into the features: one conv and scale per level (shared) or per level and task
        self.out_proj = nn.ModuleDict({self.context_key(lv, t): nn.Conv2d(dim, in_channels[lv], 1)
                                       for lv in levels for t in self.context_tasks})
        self.scale = nn.ParameterDict({self.context_key(lv, t): nn.Parameter(torch.zeros(1))
                                       for lv in levels for t in self.context_tasks})
        if cfg.learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau)))
        else:
            self.register_buffer("log_tau", torch.tensor(math.log(cfg.tau)), persistent=False)
        self._cache: Optional[tuple[tuple, dict[str, torch.Tensor]]] = None

    @property
    def context_tasks(self) -> list[Optional[str]]:
        """The tasks that get a context of their own ([None]: one shared by all)."""
        return list(self.tasks) if self.per_task else [None]

    @staticmethod
    def context_key(level: int, task: Optional[str]) -> str:
        """Key of a level's (and, per task, a task's) out_proj and scale: "4", or "4_sem"."""
        return str(level) if task is None else f"{level}_{task}"

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

    def forward(self, feats: dict[int, torch.Tensor]) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, torch.Tensor]]:
        """Backbone features {level: [B, C, h, w]} -> ({task: the features that task's branch reads}, {task:
        score map}). With ``context: shared`` every task maps to the same dict (one FPN pass serves all)."""
        text = self.class_embeddings()
        keys = {t: self.text_norm(e) for t, e in text.items()}
        shared = dict(feats)
        out = {t: shared for t in self.tasks} if not self.per_task else {t: dict(feats) for t in self.tasks}
        scores: dict[str, torch.Tensor] = {}
        for lv in self.levels:
            x = feats[lv]
            b, _, h, w = x.shape
            pixels = self.pixel_embeddings(lv, x)  # [B, D, h, w], in the text space
            queries = self.query_norm[str(lv)](pixels.flatten(2).transpose(1, 2))  # [B, hw, D]
            contexts = {}
            for t in self.tasks:
                kv = keys[t].to(queries.dtype).unsqueeze(0).expand(b, -1, -1)
                attended, _ = self.cross_attn[str(lv)](queries, kv, kv, need_weights=False)
                contexts[t] = attended.transpose(1, 2).reshape(b, -1, h, w)  # this task's language context
            if self.per_task:
                for t in self.tasks:
                    key = self.context_key(lv, t)
                    out[t][lv] = x + self.scale[key].to(x.dtype) * self.out_proj[key](contexts[t])
            else:
                mean = sum(contexts.values()) / len(self.tasks)
                shared[lv] = x + self.scale[str(lv)].to(x.dtype) * self.out_proj[str(lv)](mean)
            if lv == self.score_level:
                pix = F.normalize(pixels, dim=1)
                for t in self.tasks:
                    cls = F.normalize(text[t].to(pix.dtype), dim=-1)
                    scores[t] = torch.einsum("bdhw,kd->bkhw", pix, cls) / self.tau.to(pix.dtype)
        return out, scores


def alignment_loss(score_maps: dict[str, torch.Tensor], batch: dict, tasks) -> torch.Tensor:
    """The LV-Adapter's alignment loss (unweighted): each task's own (``Task.alignment_loss``) over the
    frames that have the task, summed. It touches every score map, so it is an exact, grad-connected
    zero when no frame has any label (DDP then still sees every LV-Adapter parameter)."""
    total = sum(s.float().sum() for s in score_maps.values()) * 0.0
    for task in tasks:
        if task.name not in score_maps:
            continue
        scores = score_maps[task.name]
        idx = batch["has"][task.name].to(scores.device).bool().nonzero().flatten()
        if idx.numel():
            term = task.alignment_loss(scores[idx], task.select(batch["targets"][task.name], idx))
            if term is not None:
                total = total + term
    return total
