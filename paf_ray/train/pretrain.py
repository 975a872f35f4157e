"""Make an "off-the-shelf" checkpoint when none can be downloaded (the demo, tests).

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

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from paf_ray.config import BackboneConfig
from paf_ray.data import bdd100k, storage
from paf_ray.data.decode import decode_mask
from paf_ray.data.normalize import normalize_images

ATTRIBUTES = (("weather", bdd100k.WEATHERS), ("scene", bdd100k.SCENES), ("timeofday", bdd100k.TIMES_OF_DAY))
N_DET, N_SEM = len(bdd100k.DET_CLASSES), len(bdd100k.SEM_CLASSES)


def _image_level_targets(rec: dict) -> tuple[list[int], list[float], list[float]]:
    """(attribute indices, -1 = unknown), det-class presence, sem-class presence (-1 = unknown)."""
    attrs = rec.get("attributes") or {}
    attr_idx = [values.index(attrs[key]) if attrs.get(key) in values else -1 for key, values in ATTRIBUTES]
    det = [-1.0] * N_DET
    if rec.get("has_det"):
        det = [0.0] * N_DET
        for label in rec.get("labels") or []:
            det[int(label)] = 1.0
    sem = [-1.0] * N_SEM
    if rec.get("sem"):
        ids = np.unique(decode_mask(rec["sem"], "sem"))
        sem = [1.0 if i in ids else 0.0 for i in range(N_SEM)]
    return attr_idx, det, sem


def load_image_level_samples(records: list[dict], size: tuple[int, int]):
    """Decode every frame -> uint8 images [N,3,h,w] and its image-level targets."""
    images, attrs, dets, sems = [], [], [], []
    for rec in records:
        img = Image.open(io.BytesIO(storage.read_bytes(rec["image"]))).convert("RGB").resize(size, Image.BILINEAR)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        a, d, s = _image_level_targets(rec)
        attrs.append(a)
        dets.append(d)
        sems.append(s)
    if not images:
        raise ValueError("no frames to pretrain on")
    return (torch.stack(images), torch.tensor(attrs, dtype=torch.long),
            torch.tensor(dets, dtype=torch.float32), torch.tensor(sems, dtype=torch.float32))


def _multilabel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = target >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


def pretrain_backbone(
    backbone_cfg: BackboneConfig,
    records: list[dict],
    out_path: str,
    steps: int = 288,
    size: tuple[int, int] = (320, 180),
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train backbone + fc on image-level labels for `steps` batches (whole shuffled passes over
    the frames, the last one cut short); save a torchvision-layout state dict to `out_path`."""
    from paf_ray.models.backbones import build_backbone

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, attrs, dets, sems = load_image_level_samples(records, size)
    backbone = build_backbone(backbone_cfg.name, backbone_cfg.tiny_width)
    attr_sizes = [len(values) for _, values in ATTRIBUTES]
    fc = torch.nn.Linear(backbone.out_channels[4], sum(attr_sizes) + N_DET + N_SEM)
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
            *attr_logits, det_logits, sem_logits = logits.split(attr_sizes + [N_DET, N_SEM], dim=1)
            loss = sum(F.cross_entropy(lg, attrs[idx, i], ignore_index=-1) for i, lg in enumerate(attr_logits)
                       if bool((attrs[idx, i] >= 0).any()))
            loss = loss + _multilabel_loss(det_logits, dets[idx]) + _multilabel_loss(sem_logits, sems[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    state = dict(backbone.state_dict())
    state["fc.weight"] = fc.weight.detach().clone()
    state["fc.bias"] = fc.bias.detach().clone()
    torch.save(state, out_path)
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
