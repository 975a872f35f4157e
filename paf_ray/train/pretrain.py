"""Make an "off-the-shelf" checkpoint when none can be downloaded (the demo, tests).

A short image-level pretraining of the configured backbone: classify the synthetic
frames' weather, scene and time-of-day attributes (one linear `fc` over the pooled
features). It mirrors the paper's setting — a checkpoint trained for a different
objective than dense multi-task perception — and it is saved in the torchvision key
layout (`conv1.*`, `bn1.*`, `layer1..4.*`, `fc.*`), so it loads through the same
checkpoint-zoo path as a user's MoCo or supervised file.
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
from paf_ray.data.normalize import normalize_images

ATTRIBUTES = (("weather", bdd100k.WEATHERS), ("scene", bdd100k.SCENES), ("timeofday", bdd100k.TIMES_OF_DAY))


def _load_attribute_samples(records: list[dict], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the frames that carry attributes -> uint8 images [N,3,h,w], targets [N,3] (-1 = unknown)."""
    images, targets = [], []
    for rec in records:
        attrs = rec.get("attributes") or {}
        if not attrs:
            continue
        img = Image.open(io.BytesIO(storage.read_bytes(rec["image"]))).convert("RGB").resize(size, Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1))
        targets.append([values.index(attrs[key]) if attrs.get(key) in values else -1 for key, values in ATTRIBUTES])
    if not images:
        raise ValueError("no frames with weather/scene/timeofday attributes to pretrain on")
    return torch.stack(images), torch.tensor(targets, dtype=torch.long)


def pretrain_backbone(
    backbone_cfg: BackboneConfig,
    records: list[dict],
    out_path: str,
    epochs: int = 6,
    size: tuple[int, int] = (192, 112),
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict:
    """Train backbone + fc on frame attributes; save a torchvision-layout state dict to `out_path`."""
    from paf_ray.models.backbones import build_backbone

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, targets = _load_attribute_samples(records, size)
    backbone = build_backbone(backbone_cfg.name, backbone_cfg.tiny_width)
    sizes = [len(values) for _, values in ATTRIBUTES]
    fc = torch.nn.Linear(backbone.out_channels[4], sum(sizes))
    params = list(backbone.parameters()) + list(fc.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    backbone.train()
    gen = torch.Generator().manual_seed(seed)
    history = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        correct = total = 0
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(-1)
            feats = backbone(normalize_images(x, "imagenet"))[4]
            logits = fc(feats.mean(dim=(2, 3))).split(sizes, dim=1)
            y = targets[idx]
            loss = sum(F.cross_entropy(lg, y[:, i], ignore_index=-1) for i, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                for i, lg in enumerate(logits):
                    keep = y[:, i] >= 0
                    correct += int((lg.argmax(1)[keep] == y[keep, i]).sum())
                    total += int(keep.sum())
        history.append(correct / max(1, total))
    state = {k: v for k, v in backbone.state_dict().items()}
    state["fc.weight"] = fc.weight.detach().clone()
    state["fc.bias"] = fc.bias.detach().clone()
    torch.save(state, out_path)
    return {
        "path": out_path,
        "frames": len(images),
        "steps": step,
        "train_accuracy": round(100 * history[-1], 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
