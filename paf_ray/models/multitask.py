"""The multi-task model: backbone -> adapters -> (LV-Adapter) -> FPN -> one head per task.

Assembled from the registries: the backbone entry (``model.backbone.name``), the adapter kind
(``model.adapter.kind``) and the tasks (``model.tasks``), each with its own config section.

Contract (docs/architecture.md §4):
* ``model(images_uint8, batch)`` in training mode -> dict of scalar losses: one per task under its
  name (plus ``<task>_<part>`` parts for logging, and ``align`` with the LV-Adapter). A task's loss
  counts only the frames that carry it; a task absent from the whole batch gives an exact zero
  that still touches every parameter of its head (DDP never waits).
* ``model(images_uint8)`` in eval mode -> {task: the task head's outputs}.
* ``model.total_loss(losses)`` applies fixed or uncertainty weighting (+ the LV alignment loss).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork

from paf_ray.models.adapters import ADAPTERS
from paf_ray.models.backbones import BACKBONES, STAGES
from paf_ray.models.lv_adapter import LVAdapter, alignment_loss
from paf_ray.models.normalize import normalize_images
from paf_ray.models.stages import backbone_builds_graph, build_norm
from paf_ray.models.zoo import checkpoint_normalization, load_backbone_weights
from paf_ray.runtime import storage
from paf_ray.tasks import HeadInput, ordered

log = logging.getLogger(__name__)


def resolve_normalization(backbone_cfg, loaded_recipe: str | None = None) -> str:
    """The input normalisation: the config's, else the loaded checkpoint layout's, else the layout named
    in the config (or sniffed from the file without loading it), else the backbone's own."""
    bb = backbone_cfg
    entry = BACKBONES[bb.name]
    if bb.normalization != "auto":
        return bb.normalization
    if loaded_recipe is not None:
        return loaded_recipe
    if bb.weights and bb.format != "auto":
        return entry.formats[bb.format].normalization
    if bb.weights and storage.exists(bb.weights):
        return checkpoint_normalization(entry, bb.weights, bb.format, bb.trust_checkpoint)
    if bb.weights:
        log.warning("model.backbone.weights %s not found and format is auto: assuming %s normalisation; "
                    "set model.backbone.format (or normalization) explicitly", bb.weights, entry.normalization)
    return entry.normalization


class MultiTaskModel(nn.Module):
    def __init__(self, cfg, input_size: tuple[int, int], load_weights: bool = True):
        """`cfg`: the config's model section (validated when it was loaded)."""
        super().__init__()
        self.cfg = cfg
        self.tasks = ordered(cfg.tasks)
        self.input_size = tuple(input_size)
        self.backbone_frozen = False
        self.adapters_merged = False
        self.last_task_counts: dict[str, int] = {}

        entry = BACKBONES[cfg.backbone.name]
        self.backbone = entry.build(cfg.backbone.options.get(entry.name))
        recipe = None
        if cfg.backbone.weights and load_weights:
            recipe = load_backbone_weights(self.backbone, entry, cfg.backbone.weights, cfg.backbone.format,
                                           cfg.backbone.trust_checkpoint)
        self.normalization = resolve_normalization(cfg.backbone, recipe)
        channels = dict(self.backbone.stage_channels)
        language_pool = entry.take_language_pool(self.backbone)

        self.adapter = ADAPTERS[cfg.adapter.kind]  # the plug-in (not a module): how adapters attach and run
        self.adapters = self.adapter.attach(self.backbone, entry, cfg.adapter.stages,
                                            cfg.adapter.options.get(cfg.adapter.kind))

        score_channels: dict[str, int] = {}
        if cfg.lv_adapter.enabled:
            self.lv_adapter = LVAdapter(cfg.lv_adapter, {t.name: t.prompt_names for t in self.tasks}, channels,
                                        load_weights=load_weights, attnpool=language_pool)
            score_channels = dict(self.lv_adapter.score_channels)

        fpn_in = [channels[k] for k in STAGES]
        fpn_in[-1] += sum(score_channels.values())  # every task's score map rides on C5
        extras = [e for e in (t.pyramid_extra(cfg.heads.get(t.name), cfg.fpn_channels) for t in self.tasks) if e is not None]
        self.neck = FeaturePyramidNetwork(fpn_in, cfg.fpn_channels, extra_blocks=extras[0] if extras else None)
        self.heads = nn.ModuleDict({t.name: t.build_head(cfg.heads.get(t.name), cfg.fpn_channels, len(STAGES),
                                                         score_channels.get(t.name, 0)) for t in self.tasks})
        build_norm(self, cfg.norm)
        if cfg.loss.weighting == "uncertainty":
            # log-variances s_t (Kendall et al. 2018): total = sum exp(-s_t) * L_t + s_t
            self.loss_weights = nn.ParameterDict({t.name: nn.Parameter(torch.zeros(())) for t in self.tasks})

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    # ------------------------------------------------------------------ mode

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()  # frozen BatchNorm keeps its pretrained statistics
        return self

    def compile_dense(self, **options) -> list[str]:
        """torch.compile the dense part in place: backbone, adapters, FPN and the heads that say they
        compile (state-dict keys unchanged); returns their names. Detection heads stay eager:
        proposals and NMS have data-dependent shapes."""
        parts = {"backbone": self.backbone, **{f"adapters.{k}": a for k, a in self.adapters.items()}, "neck": self.neck}
        parts.update({f"heads.{k}": h for k, h in self.heads.items() if getattr(h, "compilable", False)})
        for part in parts.values():
            part.compile(**options)
        return list(parts)

    # ------------------------------------------------------------------ forward

    def features(self, images: torch.Tensor):
        """Normalised input, adapted backbone features {1..4} per task ({task: features}: with the LV-Adapter's
        per-task context each task has its own; otherwise every task maps to the same dict), LV score maps
        ({} when off)."""
        x = normalize_images(images, self.normalization)
        # Adapt with bypass adapters: the frozen backbone's forward builds no autograd graph at all.
        graph = torch.is_grad_enabled() and backbone_builds_graph(self)

        def backbone(inp, after_stage=None):
            with torch.set_grad_enabled(graph):
                return self.backbone(inp, after_stage)

        feats = self.adapter.features(backbone, self.adapters, x)
        score_maps: dict[str, torch.Tensor] = {}
        if hasattr(self, "lv_adapter"):
            task_feats, score_maps = self.lv_adapter(feats)
        else:
            task_feats = {t.name: feats for t in self.tasks}
        return x, task_feats, score_maps

    def head_input(self, images: torch.Tensor) -> tuple[dict[str, HeadInput], dict[str, torch.Tensor]]:
        """Each task's HeadInput (its pyramid, with every task's score map on C5), and the score maps. Tasks that
        read the same features share one FPN pass."""
        x, task_feats, score_maps = self.features(images)
        pyramids: dict[int, OrderedDict] = {}
        inputs = {}
        for t in self.tasks:
            feats = task_feats[t.name]
            if id(feats) not in pyramids:
                pyramids[id(feats)] = self._pyramid(feats, score_maps)
            pyramid = pyramids[id(feats)]
            main = [pyramid[str(i)] for i in range(len(STAGES))]
            inputs[t.name] = HeadInput(pyramid, main, x, score_maps.get(t.name))
        return inputs, score_maps

    def _pyramid(self, feats: dict[int, torch.Tensor], score_maps: dict[str, torch.Tensor]) -> OrderedDict:
        c5 = feats[STAGES[-1]]
        if score_maps:
            maps = [F.interpolate(score_maps[t].to(c5.dtype), size=c5.shape[-2:], mode="bilinear", align_corners=False)
                    for t in self.lv_adapter.score_channels]
            c5 = torch.cat([c5, *maps], dim=1)
        levels = [feats[k] for k in STAGES[:-1]] + [c5]
        return self.neck(OrderedDict((str(i), f) for i, f in enumerate(levels)))

    def forward(self, images: torch.Tensor, batch: dict | None = None):
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"images: height and width must be multiples of 32, got {h}x{w}")
        inputs, score_maps = self.head_input(images)
        if not self.training:
            return {name: self.heads[name](inp) for name, inp in inputs.items()}
        if batch is None:
            raise ValueError("MultiTaskModel: the training forward needs the batch (labels): model(images, batch)")
        return self._losses(inputs, score_maps, batch)

    def _zero(self, head: nn.Module, inp: HeadInput) -> torch.Tensor:
        # Exact zero that still reaches every head parameter and the pyramid (DDP waits for all grads).
        z = sum(p.sum() for p in head.parameters()) * 0.0
        return z + sum(f.float().mean() for f in inp.pyramid.values()) * 0.0

    def _losses(self, inputs: dict[str, HeadInput], score_maps: dict, batch: dict) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for task in self.tasks:
            inp = inputs[task.name]
            idx = batch["has"][task.name].to(inp.images.device).bool().nonzero().flatten()
            counts[task.name] = int(idx.numel())
            head = self.heads[task.name]
            if counts[task.name] == 0:
                losses[task.name] = self._zero(head, inp)
                continue
            losses.update(head.losses(inp.select(idx), task.select(batch["targets"][task.name], idx)))
        if score_maps:
            losses["align"] = alignment_loss(score_maps, batch, self.tasks)
        self.last_task_counts = counts
        return losses

    # ------------------------------------------------------------------ loss weighting

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the task losses plus `align` x align_weight."""
        total = None
        for name in self.task_names:
            loss = losses[name]
            if self.cfg.loss.weighting == "uncertainty":
                s = self.loss_weights[name]
                present = self.last_task_counts.get(name, 1) > 0
                # an absent task must not pull its log-variance down, yet s takes part (DDP)
                term = torch.exp(-s) * loss + s if present else loss + 0.0 * s
            else:
                term = self.cfg.loss.weights.get(name, 1.0) * loss
            total = term if total is None else total + term
        if "align" in losses:
            total = total + self.lv_adapter.align_weight * losses["align"]
        return total


def build_model(model_cfg, input_size: tuple[int, int], load_weights: bool = True) -> MultiTaskModel:
    """The multi-task model for `model_cfg` at `input_size` = (width, height).

    `load_weights=False` skips reading `model.backbone.weights` (inspect, or before a
    paf_ray checkpoint's own state dict is loaded over the model).
    """
    return MultiTaskModel(model_cfg, tuple(input_size), load_weights)
