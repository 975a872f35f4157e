"""Make an "off-the-shelf" checkpoint when none can be downloaded (the demo, the study, tests).

`paf-ray pretrain --method supervised|simclr|moco` (and `study.checkpoints.<name>.pretrain`, which
can train on a differently seeded synthetic set, `data_seed`, so that the checkpoint never sees the
downstream frames or their labels):

* supervised (below): image-level labels, torchvision layout.
* simclr / moco (`train_contrastive`): self-supervised on the frames it is given, two augmented
  views per frame and an InfoNCE loss on a projection head that is dropped afterwards. SimCLR
  contrasts each view against the other views of the batch; MoCo (v2) against a queue of
  earlier keys from a momentum encoder. Each file is written in the layout the published
  checkpoints of that method have (notes in models/zoo.py), so it loads through the same zoo
  code, with the same sniffed format and input normalisation (SimCLR: none).

The supervised method:

A short **image-level** pretraining of the configured backbone, like a supervised
ImageNet classifier: from the pooled features, one linear `fc` predicts the frame's
weather / scene / time-of-day attributes (softmax each) and which detection classes and
which semantic classes appear in the frame (multi-label). No box, mask or pixel target
is used: it is a checkpoint trained for a different objective than dense multi-task
perception, as in the paper's setting. It is saved in the torchvision key layout
(`conv1.*`, `bn1.*`, `layer1..4.*`, `fc.*`), so it loads through the same checkpoint-zoo
path as a user's MoCo or supervised file.
"""

from __future__ import annotations

import copy
import io
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from paf_ray.config import BackboneConfig, PretrainConfig
from paf_ray.data import bdd100k
from paf_ray.data.decode import decode_image, load_sample
from paf_ray.models.backbones import BACKBONES
from paf_ray.models.normalize import normalize_images
from paf_ray.runtime import files
from paf_ray.tasks import TASKS

ATTRIBUTES = (("weather", bdd100k.WEATHERS), ("scene", bdd100k.SCENES), ("timeofday", bdd100k.TIMES_OF_DAY))


def image_level_targets(rec: dict, sample: dict, tasks) -> tuple[list[int], list[float]]:
    """(attribute indices, -1 = unknown), and for each task the presence of each of its classes in the
    frame (-1 = unknown: the frame has no label of the task, or the task offers no image labels)."""
    attrs = rec.get("attributes") or {}
    attr_idx = [values.index(attrs[key]) if attrs.get(key) in values else -1 for key, values in ATTRIBUTES]
    presence: list[float] = []
    for task in tasks:
        target = sample["targets"].get(task.name)
        labels = task.image_labels(target) if target is not None else None
        presence += labels.tolist() if labels is not None else [-1.0] * len(task.classes)
    return attr_idx, presence


def load_image_level_samples(records: list[dict], size: tuple[int, int], tasks):
    """Decode every frame -> uint8 images [N,3,h,w], attribute indices [N, 3], class presence [N, K]."""
    images, attrs, presence = [], [], []
    for rec in records:
        sample = load_sample(rec, tasks)
        a, p = image_level_targets(rec, sample, tasks)
        resized = Image.fromarray(sample["image"]).resize(size, Image.BILINEAR)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
        attrs.append(a)
        presence.append(p)
    if not images:
        raise ValueError("no frames to pretrain on")
    return torch.stack(images), torch.tensor(attrs, dtype=torch.long), torch.tensor(presence, dtype=torch.float32)


def _multilabel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = target >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


def pretrain_backbone(
    backbone_cfg: BackboneConfig,
    records: list[dict],
    tasks,
    out_path: str,
    steps: int = 288,
    size: tuple[int, int] = (320, 180),
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train backbone + fc on image-level labels (frame attributes, and which classes of `tasks` the frame
    shows) for `steps` batches (whole shuffled passes over the frames, the last one cut short); save a
    torchvision-layout state dict to `out_path`."""
    entry = BACKBONES[backbone_cfg.name]
    check_layout(entry, "supervised")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, attrs, presence = load_image_level_samples(records, size, tasks)
    backbone = entry.build(backbone_cfg.options.get(entry.name))
    attr_sizes = [len(values) for _, values in ATTRIBUTES]
    fc = torch.nn.Linear(backbone.stage_channels[4], sum(attr_sizes) + presence.shape[1])
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(fc.parameters()), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(images) // batch_size)
    steps = max(1, int(steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    backbone.train()
    losses = []
    while len(losses) < steps:
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, min(steps_per_epoch, steps - len(losses)) * batch_size, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(-1)
            logits = fc(backbone(normalize_images(x, "imagenet"))[4].mean(dim=(2, 3)))
            *attr_logits, class_logits = logits.split(attr_sizes + [presence.shape[1]], dim=1)
            loss = sum(F.cross_entropy(lg, attrs[idx, i], ignore_index=-1) for i, lg in enumerate(attr_logits)
                       if bool((attrs[idx, i] >= 0).any()))
            loss = loss + _multilabel_loss(class_logits, presence[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    state = dict(backbone.state_dict())
    state["fc.weight"] = fc.weight.detach().clone()  # the classifier: the zoo drops it, as a published one
    state["fc.bias"] = fc.bias.detach().clone()
    _save(state, out_path)
    first = float(np.mean(losses[:steps_per_epoch]))
    last = float(np.mean(losses[-steps_per_epoch:]))
    return {
        "path": out_path,
        "frames": len(images),
        "steps": len(losses),
        "loss_first_epoch": round(first, 3),
        "loss_last_epoch": round(last, 3),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- self-supervised

METHOD_FORMAT = {"supervised": "torchvision", "simclr": "simclr", "moco": "moco"}


def check_layout(entry, method: str) -> None:
    """The method writes its published layout (ResNet names, a head under `fc`): the backbone must read it."""
    fmt = METHOD_FORMAT[method]
    if fmt not in entry.formats or "fc." not in entry.leftover_prefixes:
        raise ValueError(f"pretrain --method {method} writes the {fmt!r} layout of ResNets, which backbone "
                         f"{entry.name} does not read ({', '.join(entry.formats)})")


def _save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    files.write_bytes(path, buf.getvalue())


def load_frames(records: list[dict], size: tuple[int, int]) -> torch.Tensor:
    """Decode every frame, resized to `size` = (width, height) -> uint8 [N, 3, h, w]."""
    if not records:
        raise ValueError("no frames to pretrain on")
    frames = []
    for rec in records:
        img = Image.fromarray(decode_image(rec["image"])).resize(size, Image.BILINEAR)
        frames.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(frames)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One SimCLR-style view per uint8 image -> float [0, 1], same size: a random resized crop
    (8-100% of the area, aspect 3/4-4/3), a horizontal flip, colour jitter, sometimes grey."""
    n, _, h, w = images.shape
    x = images.float() / 255.0
    views = []
    for i in range(n):
        r = torch.rand(6, generator=gen).tolist()
        area = (0.08 + 0.92 * r[0]) * h * w
        aspect = float(np.exp(np.log(3 / 4) + r[1] * (np.log(4 / 3) - np.log(3 / 4))))
        ch = max(8, min(h, int(round((area / aspect) ** 0.5))))
        cw = max(8, min(w, int(round((area * aspect) ** 0.5))))
        y0, x0 = int(r[2] * (h - ch + 1)), int(r[3] * (w - cw + 1))
        crop = F.interpolate(x[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
        if r[4] < 0.5:
            crop = crop.flip(-1)
        views.append(crop)
    v = torch.cat(views)
    jitter = 1.0 + 0.8 * (torch.rand(n, 3, 1, 1, 1, generator=gen) - 0.5)  # brightness, contrast, saturation
    v = v * jitter[:, 0]
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - mean) * jitter[:, 1] + mean
    grey = v.mean(dim=1, keepdim=True)
    v = (v - grey) * jitter[:, 2] + grey
    to_grey = torch.rand(n, 1, 1, 1, generator=gen) < 0.2
    v = torch.where(to_grey, v.mean(dim=1, keepdim=True).expand_as(v), v)
    return v.clamp(0.0, 1.0)


def projection_head(channels: int, proj_dim: int) -> torch.nn.Sequential:
    """MoCo v2 / SimCLR MLP on the pooled C5 features; indices 0 and 2 are the linears (`fc.0`, `fc.2`)."""
    return torch.nn.Sequential(torch.nn.Linear(channels, channels), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(channels, proj_dim))


def _embed(backbone, head, views: torch.Tensor, recipe: str) -> torch.Tensor:
    return F.normalize(head(backbone(normalize_images(views, recipe))[4].mean(dim=(2, 3))), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's InfoNCE over 2N views: each view's positive is the other view of its frame."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def train_contrastive(method: str, backbone_cfg: BackboneConfig, images: torch.Tensor, pc: PretrainConfig):
    """Train an encoder on `images` (uint8 [N, 3, h, w]) with SimCLR or MoCo v2.

    Returns (the trained backbone, the checkpoint object in the method's published layout, losses).
    """
    if method not in ("simclr", "moco"):
        raise ValueError(f"method: expected simclr or moco, got {method!r}")
    entry = BACKBONES[backbone_cfg.name]
    check_layout(entry, method)
    torch.manual_seed(pc.seed)
    gen = torch.Generator().manual_seed(pc.seed)
    recipe = entry.formats[METHOD_FORMAT[method]].normalization  # what the zoo will feed this layout
    backbone = entry.build(backbone_cfg.options.get(entry.name))
    head = projection_head(backbone.stage_channels[4], pc.proj_dim)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pc.lr, total_steps=pc.steps)
    batch = min(pc.batch_size, len(images))
    if batch < 2:
        raise ValueError("contrastive pretraining needs at least 2 frames")
    if method == "moco":
        key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
        for p in list(key_backbone.parameters()) + list(key_head.parameters()):
            p.requires_grad_(False)
        queue = F.normalize(torch.randn(pc.queue, pc.proj_dim, generator=gen), dim=1)
        ptr = 0
    backbone.train()
    losses: list[float] = []
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    while len(losses) < pc.steps:
        if pos + batch > len(images):
            order, pos = torch.randperm(len(images), generator=gen), 0
        x = images[order[pos : pos + batch]]
        pos += batch
        v1, v2 = augment(x, gen), augment(x, gen)
        if method == "simclr":
            loss = nt_xent(_embed(backbone, head, v1, recipe), _embed(backbone, head, v2, recipe), pc.temperature)
        else:
            q = _embed(backbone, head, v1, recipe)
            with torch.no_grad():
                for online, key in ((backbone, key_backbone), (head, key_head)):
                    for po, pk in zip(online.parameters(), key.parameters()):
                        pk.mul_(pc.momentum).add_(po.detach(), alpha=1.0 - pc.momentum)
                k = _embed(key_backbone, key_head, v2, recipe)
            logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.t()], dim=1) / pc.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if method == "moco":  # enqueue the newest keys over the oldest
            queue[(torch.arange(len(k)) + ptr) % pc.queue] = k
            ptr = int((ptr + len(k)) % pc.queue)
        losses.append(float(loss.detach()))

    encoder = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    if method == "simclr":
        # tonylins/simclr-converter's layout: torchvision names plus an `fc.weight` without `fc.bias`
        # (there the linear-eval classifier; here the projection head's first layer). The zoo drops it.
        obj = {"state_dict": {**encoder, "fc.weight": head[0].weight.detach().clone()}}
    else:
        # facebookresearch/moco's layout: both encoders with their `fc` MLP heads, and the queue [dim, K].
        sd = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
        sd.update({f"module.encoder_q.fc.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        sd.update({f"module.encoder_k.{k}": v.detach().clone() for k, v in key_backbone.state_dict().items()})
        sd.update({f"module.encoder_k.fc.{k}": v.detach().clone() for k, v in key_head.state_dict().items()})
        sd["module.queue"] = queue.t().contiguous()
        sd["module.queue_ptr"] = torch.tensor([ptr])
        obj = {"epoch": len(losses), "arch": backbone_cfg.name, "state_dict": sd}
    return backbone, obj, losses


def pretrain_checkpoint(backbone_cfg: BackboneConfig, records: list[dict], tasks, out_path: str,
                        pc: PretrainConfig) -> dict:
    """Make a checkpoint with `pc.method` on the frames of `records`; write it to `out_path` (path or URI).

    Returns a summary with the zoo `format` the file has."""
    t0 = time.perf_counter()
    if pc.method == "supervised":
        summary = pretrain_backbone(backbone_cfg, records, tasks, out_path, steps=pc.steps, size=tuple(pc.size),
                                    batch_size=pc.batch_size, lr=pc.lr, seed=pc.seed)
    else:
        images = load_frames(records, tuple(pc.size))
        _, obj, losses = train_contrastive(pc.method, backbone_cfg, images, pc)
        _save(obj, out_path)
        k = max(1, len(losses) // 10)
        summary = {"path": out_path, "frames": len(images), "steps": len(losses),
                   "loss_first_tenth": round(float(np.mean(losses[:k])), 3),
                   "loss_last_tenth": round(float(np.mean(losses[-k:])), 3)}
    summary.update({"method": pc.method, "format": METHOD_FORMAT[pc.method], "backbone": backbone_cfg.name,
                    "wall_s": round(time.perf_counter() - t0, 1)})
    return summary
