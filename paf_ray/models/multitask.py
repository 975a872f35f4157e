"""The multi-task model: backbone -> adapters -> (LV-Adapter) -> FPN -> det / sem / drv heads.

Contract (docs/architecture.md §4):
* ``model(images_uint8, batch)`` in training mode -> dict of scalar losses. Each task's
  loss counts only the samples that carry that task; a task absent from the whole batch
  gives an exact zero that still touches every parameter of its head (DDP never waits).
* ``model(images_uint8)`` in eval mode -> {"det": [{"boxes", "scores", "labels"}], "sem": logits, "drv": logits}.
* ``model.total_loss(losses)`` applies fixed or uncertainty weighting (+ the LV alignment loss).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from paf_ray.config import ModelConfig
from paf_ray.data import storage
from paf_ray.data.bdd100k import NUM_CLASSES, SEG_TASKS, TASKS
from paf_ray.data.normalize import FORMAT_NORMALIZATION, normalize_images
from paf_ray.models.adapters import add_lora, build_residual_adapters
from paf_ray.models.backbones import STAGES, build_backbone, default_normalization
from paf_ray.models.detection import build_det_head
from paf_ray.models.heads import SegHead, seg_loss
from paf_ray.models.stages import build_norm
from paf_ray.models.stages import backbone_builds_graph
from paf_ray.models.zoo import load_backbone_weights, read_checkpoint, sniff_format

log = logging.getLogger(__name__)

LOSS_TASKS = TASKS + ("align",)  # the keys total_loss weighs; other loss keys are for logging


def _check_tasks(tasks: list[str]) -> None:
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"model.tasks: expected a non-empty subset of {list(TASKS)} without repeats, got {tasks}")


def resolve_normalization(model_cfg: ModelConfig, loaded_recipe: str | None = None) -> str:
    bb = model_cfg.backbone
    if bb.normalization != "auto":
        return bb.normalization
    if loaded_recipe is not None:
        return loaded_recipe
    if bb.weights and bb.format != "auto":
        return FORMAT_NORMALIZATION[bb.format]
    if bb.weights and storage.exists(bb.weights):
        # weights not loaded (a paf_ray checkpoint follows): the file's layout still picks the recipe
        return FORMAT_NORMALIZATION[sniff_format(read_checkpoint(bb.weights, bb.trust_checkpoint))]
    if bb.weights:
        log.warning("model.backbone.weights %s not found and format is auto: assuming %s normalisation; "
                    "set model.backbone.format (or normalization) explicitly", bb.weights, default_normalization(bb.name))
    return default_normalization(bb.name)


class MultiTaskModel(nn.Module):
    def __init__(self, cfg: ModelConfig, input_size: tuple[int, int], load_weights: bool = True):
        super().__init__()
        _check_tasks(cfg.tasks)
        width, height = input_size
        if width % 32 or height % 32:
            raise ValueError(f"data.input_size: width and height must be multiples of 32, got {tuple(input_size)}")
        bad_stages = [s for s in cfg.adapter.stages if s not in STAGES]
        if bad_stages:
            raise ValueError(f"model.adapter.stages: stages are 1..4 (strides 4..32), got {cfg.adapter.stages}")
        unknown = sorted(set(cfg.loss.class_balance) - set(SEG_TASKS))
        if unknown:
            raise ValueError(f"model.loss.class_balance: keys are the segmentation tasks {SEG_TASKS}, got {unknown}")
        self.cfg = cfg
        self.tasks = [t for t in TASKS if t in cfg.tasks]
        self.input_size = (width, height)
        self.backbone_frozen = False
        self.adapters_merged = False
        self.last_task_counts: dict[str, int] = {}

        self.backbone = build_backbone(cfg.backbone.name, cfg.backbone.tiny_width)
        recipe = None
        if cfg.backbone.weights and load_weights:
            recipe = load_backbone_weights(self.backbone, cfg.backbone.weights, cfg.backbone.format,
                                           cfg.backbone.trust_checkpoint)
        self.normalization = resolve_normalization(cfg, recipe)
        channels = dict(self.backbone.out_channels)
        # CLIP's attention pool leaves the backbone; the LV-Adapter starts its projection from it.
        attnpool = self.backbone.take_attnpool() if hasattr(self.backbone, "take_attnpool") else None

        self.adapter_kind = cfg.adapter.kind
        if cfg.adapter.kind in ("bypass", "inline"):
            self.adapters = build_residual_adapters(channels, cfg.adapter.stages, cfg.adapter.reduction, cfg.adapter.init_scale)
        else:
            self.adapters = nn.ModuleDict()  # lora deltas live inside the backbone convs
            if cfg.adapter.kind == "lora":
                add_lora(self.backbone, cfg.adapter.stages, cfg.adapter.rank, cfg.adapter.lora_alpha)

        score_channels: dict[str, int] = {}
        if cfg.lv_adapter.enabled:
            from paf_ray.models.lv_adapter import LVAdapter

            self.lv_adapter = LVAdapter(cfg.lv_adapter, self.tasks, channels, load_weights=load_weights, attnpool=attnpool)
            score_channels = dict(self.lv_adapter.score_channels)

        fpn_in = [channels[k] for k in STAGES]
        fpn_in[-1] += sum(score_channels.values())  # all tasks' score maps ride on C5
        extra = None
        if "det" in self.tasks:
            extra = LastLevelMaxPool() if cfg.det.kind == "faster_rcnn" else LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)
        self.neck = FeaturePyramidNetwork(fpn_in, cfg.fpn_channels, extra_blocks=extra)

        if "det" in self.tasks:
            self.det_head = build_det_head(cfg.fpn_channels, NUM_CLASSES["det"], cfg.det)
        for t in SEG_TASKS:
            if t in self.tasks:
                head = SegHead(cfg.fpn_channels, cfg.seg_channels, NUM_CLASSES[t], extra_channels=score_channels.get(t, 0))
                setattr(self, f"{t}_head", head)

        build_norm(self, cfg.norm)

        if cfg.loss.weighting == "uncertainty":
            # log-variances s_t (Kendall et al. 2018): total = sum exp(-s_t) * L_t + s_t
            self.loss_weights = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    # ------------------------------------------------------------------ mode

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()  # frozen BatchNorm keeps its pretrained statistics
        return self

    def compile_dense(self, **options) -> None:
        """torch.compile the dense part in place: backbone, adapters, FPN, segmentation heads (state-dict
        keys unchanged). The detection head stays eager: proposals and NMS have data-dependent shapes."""
        parts = [self.backbone, *self.adapters.values(), self.neck]
        parts += [getattr(self, f"{t}_head") for t in SEG_TASKS if t in self.tasks]
        for part in parts:
            part.compile(**options)

    # ------------------------------------------------------------------ forward

    def features(self, images: torch.Tensor):
        """Normalised input, adapted backbone features {1..4}, LV score maps ({} when off)."""
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"images: height and width must be multiples of 32, got {h}x{w}")
        x = normalize_images(images, self.normalization)
        # Adapt with bypass adapters: the frozen backbone's forward builds no autograd graph at all.
        needs_grad = torch.is_grad_enabled() and backbone_builds_graph(self)
        with torch.set_grad_enabled(needs_grad):
            feats = self.backbone(x, self.adapters if self.adapter_kind == "inline" else None)
        if self.adapter_kind == "bypass":
            feats = {k: self.adapters[str(k)](f) if str(k) in self.adapters else f for k, f in feats.items()}
        score_maps: dict[str, torch.Tensor] = {}
        if hasattr(self, "lv_adapter"):
            feats, score_maps = self.lv_adapter(feats)
        return x, feats, score_maps

    def pyramid(self, feats: dict[int, torch.Tensor], score_maps: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        c5 = feats[4]
        if score_maps:
            maps = [F.interpolate(score_maps[t].to(c5.dtype), size=c5.shape[-2:], mode="bilinear", align_corners=False)
                    for t in self.lv_adapter.score_channels]
            c5 = torch.cat([c5, *maps], dim=1)
        return self.neck(OrderedDict([("0", feats[1]), ("1", feats[2]), ("2", feats[3]), ("3", c5)]))

    def _seg_extra(self, task: str, score_maps, size, idx=None):
        if task not in score_maps:
            return None
        m = score_maps[task] if idx is None else score_maps[task][idx]
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, batch: dict | None = None):
        x, feats, score_maps = self.features(images)
        pyr = self.pyramid(feats, score_maps)
        levels = [pyr[k] for k in ("0", "1", "2", "3")]
        out_size = tuple(images.shape[-2:])
        if not self.training:
            out = {}
            if "det" in self.tasks:
                out["det"] = self.det_head(pyr, x)
            for t in SEG_TASKS:
                if t in self.tasks:
                    out[t] = getattr(self, f"{t}_head")(levels, out_size, self._seg_extra(t, score_maps, levels[0].shape[-2:]))
            return out
        if batch is None:
            raise ValueError("MultiTaskModel: the training forward needs the batch (labels): model(images, batch)")
        return self._losses(x, pyr, levels, score_maps, out_size, batch)

    def _zero(self, head: nn.Module, pyr) -> torch.Tensor:
        # Exact zero that still reaches every head parameter and the pyramid (DDP waits for all grads).
        z = sum(p.sum() for p in head.parameters()) * 0.0
        return z + sum(f.float().mean() for f in pyr.values()) * 0.0

    def _losses(self, x, pyr, levels, score_maps, out_size, batch: dict) -> dict[str, torch.Tensor]:
        device = x.device
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for t in self.tasks:
            key = f"has_{t}"
            if key not in batch:
                raise KeyError(f"batch: missing {key!r} (model.tasks has {t!r})")
            idx = torch.as_tensor(batch[key], device=device).bool().nonzero().flatten()
            counts[t] = int(idx.numel())
            head = self.det_head if t == "det" else getattr(self, f"{t}_head")
            if counts[t] == 0:
                losses[t] = self._zero(head, pyr)
                continue
            if t == "det":
                sel = idx.tolist()
                targets = tuple([batch[k][i].to(device) for i in sel] for k in ("boxes", "labels", "ignore_boxes"))
                sub = OrderedDict((k, v[idx]) for k, v in pyr.items())
                parts = self.det_head(sub, x[idx], targets)
                losses["det"] = sum(parts.values())
                losses.update({k: v.detach() for k, v in parts.items()})
            else:
                target = torch.as_tensor(batch[t], device=device)[idx].long()
                logits = head([f[idx] for f in levels], out_size, self._seg_extra(t, score_maps, levels[0].shape[-2:], idx))
                losses[t] = seg_loss(logits, target, self.cfg.loss.class_balance.get(t, 0.0))
        if score_maps:
            losses["align"] = self.lv_adapter.alignment_loss(score_maps, batch)
        self.last_task_counts = counts
        return losses

    # ------------------------------------------------------------------ loss weighting

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the task losses (`det`, `sem`, `drv`) plus `align` x align_weight."""
        total = None
        for t in self.tasks:
            loss = losses[t]
            if self.cfg.loss.weighting == "uncertainty":
                s = self.loss_weights[t]
                present = self.last_task_counts.get(t, 1) > 0
                # an absent task must not pull its log-variance down, yet s takes part (DDP)
                term = torch.exp(-s) * loss + s if present else loss + 0.0 * s
            else:
                term = self.cfg.loss.weights.get(t, 1.0) * loss
            total = term if total is None else total + term
        if "align" in losses:
            weight = getattr(getattr(self, "lv_adapter", None), "align_weight", self.cfg.lv_adapter.align_weight)
            total = total + weight * losses["align"]
        return total


def build_model(model_cfg: ModelConfig, input_size: tuple[int, int], load_weights: bool = True) -> MultiTaskModel:
    """The multi-task model for `model_cfg` at `input_size` = (width, height).

    `load_weights=False` skips reading `model.backbone.weights` (inspect, or before a
    paf_ray checkpoint's own state dict is loaded over the model).
    """
    return MultiTaskModel(model_cfg, tuple(input_size), load_weights)
