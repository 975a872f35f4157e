"""model.norm: frozen / bn / syncbn build, train a step and checkpoint; syncbn on 2 gloo workers.

torch 2.14's nn.SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU"), so
the 2-worker test also proves paf_ray's CPU path: the statistics of 2 ranks' half-batches equal
BatchNorm's over the whole batch, and so do the input gradients.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from paf_ray.config import StageConfig, from_dict
from paf_ray.data.bdd100k import DET_CLASSES, SEM_CLASSES
from paf_ray.models.backbones.resnet import TinyConfig, tiny_resnet
from paf_ray.models.multitask import build_model
from paf_ray.models.norm import CPUSyncBatchNorm
from paf_ray.models.stages import apply_stage, param_groups, prepare_norm
from paf_ray.train.checkpoint import load_model, save_checkpoint

W, H = 128, 64


def _config(norm: str, weights: str) -> dict:
    return {
        "data": {"input_size": [W, H]},
        "model": {
            "norm": norm,
            "backbone": {"name": "tiny", "tiny": {"width": 8}, "weights": weights, "format": "torchvision"},
            "adapter": {"kind": "none"},
            "fpn_channels": 32,
            "heads": {
                "sem": {"channels": 16}, "drv": {"channels": 16},
                "det": {"representation_size": 32, "box_batch_size_per_image": 16, "rpn_pre_nms_top_n_train": 100,
                        "rpn_post_nms_top_n_train": 30, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 30,
                        "anchor_sizes": [16, 32, 64, 128, 256]}},
        },
        "train": {"stages": [{"kind": "finetune", "lr": 1e-3}]},
    }


def _pretrained_tiny(path: str) -> str:
    """A 'pretrained' tiny backbone with non-trivial BatchNorm statistics, in torchvision's layout."""
    torch.manual_seed(1)
    net = tiny_resnet(TinyConfig(width=8))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), path)
    return path


def _batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, 2, generator=g) * torch.tensor([W - 40.0, H - 30.0])
    boxes = [torch.cat([p, p + 20], 1) for p in xy]
    return {
        "image": torch.randint(0, 256, (n, 3, H, W), dtype=torch.uint8, generator=g),
        "targets": {
            "det": {"boxes": boxes, "labels": [torch.randint(0, len(DET_CLASSES), (2,), generator=g) for _ in range(n)],
                    "ignore_boxes": [torch.zeros(0, 4)] * n, "ignore_labels": [torch.zeros(0, dtype=torch.int64)] * n},
            "sem": torch.randint(0, len(SEM_CLASSES), (n, H, W), generator=g).to(torch.uint8),
            "drv": torch.randint(0, 3, (n, H, W), generator=g).to(torch.uint8)},
        "has": {t: torch.ones(n, dtype=torch.bool) for t in ("det", "sem", "drv")},
    }


def _slice(batch: dict, idx: slice) -> dict:
    det = batch["targets"]["det"]
    return {"image": batch["image"][idx], "has": {k: v[idx] for k, v in batch["has"].items()},
            "targets": {"det": {k: v[idx] for k, v in det.items()}, "sem": batch["targets"]["sem"][idx],
                        "drv": batch["targets"]["drv"][idx]}}


def _step(model, batch) -> None:
    opt = torch.optim.AdamW(param_groups(model, StageConfig(kind="finetune", lr=1e-3)))
    model.train()
    loss = model.total_loss(model(batch["image"], batch))
    opt.zero_grad()
    loss.backward()
    opt.step()


def _bn_stats(model) -> torch.Tensor:
    return torch.cat([b for n, b in model.backbone.named_buffers() if n.endswith(("running_mean", "running_var"))])


@pytest.mark.parametrize("norm", ["frozen", "bn", "syncbn"])
def test_each_norm_mode_builds_steps_and_checkpoints(norm, tmp_path):
    cfg = from_dict(_config(norm, _pretrained_tiny(str(tmp_path / "tiny.pth"))))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size)
    apply_stage(model, "finetune")
    assert prepare_norm(model, norm, world_size=1) == 0  # syncbn converts only when several workers run
    kinds = {type(m) for m in model.backbone.modules()}
    if norm == "frozen":
        assert FrozenBatchNorm2d in kinds and nn.BatchNorm2d not in kinds
    else:
        assert nn.BatchNorm2d in kinds and FrozenBatchNorm2d not in kinds
    pretrained = _bn_stats(model).clone()
    _step(model, _batch(2))
    moved = not torch.equal(_bn_stats(model), pretrained)
    assert moved is (norm != "frozen")  # frozen: the pretrained statistics stay put while finetuning

    save_checkpoint(str(tmp_path / "ckpt"), model, cfg, meta={"stage": "finetune"})
    loaded, loaded_cfg, _ = load_model(str(tmp_path / "ckpt"))
    assert loaded_cfg.model.norm == norm
    assert {type(m) for m in loaded.backbone.modules()} == kinds
    model.eval()
    images = _batch(1, seed=3)["image"]
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert torch.equal(a["sem"], b["sem"]) and torch.equal(a["det"][0]["boxes"], b["det"][0]["boxes"])


def test_frozen_norm_needs_pretrained_statistics():
    from paf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="model.norm"):
        from_dict(_config("frozen", None))


def _worker(rank: int, world: int, init_file: str, out_dir: str, weights: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # 1. one layer: this rank's half of the batch, statistics and input gradients of the whole
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 6) * 3 + 1
        bn = nn.BatchNorm2d(3)
        layer = nn.Sequential(bn)
        prepare_norm(layer, "syncbn", world)
        half = x[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
        y = layer(half)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        torch.save({"y": y.detach(), "grad": half.grad, "mean": layer[0].running_mean, "var": layer[0].running_var},
                   os.path.join(out_dir, f"layer{rank}.pt"))

        # 2. the model: syncbn converted before DDP, a training step, a checkpoint from rank 0
        cfg = from_dict(_config("syncbn", weights))
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.input_size)
        apply_stage(model, "finetune")
        synced = prepare_norm(model, "syncbn", world)
        assert synced > 0 and all(type(m) is not nn.BatchNorm2d for m in model.modules())
        assert any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(param_groups(model, StageConfig(kind="finetune", lr=1e-3)))
        batch = _slice(_batch(4), slice(2 * rank, 2 * rank + 2))
        ddp.train()
        loss = model.total_loss(ddp(batch["image"], batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.save({"bn1_mean": model.backbone.bn1.running_mean, "bn1_var": model.backbone.bn1.running_var,
                    "synced": synced}, os.path.join(out_dir, f"model{rank}.pt"))
        if rank == 0:
            save_checkpoint(os.path.join(out_dir, "ckpt"), model, cfg, meta={"stage": "finetune"})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_syncbn_on_two_gloo_workers_uses_the_whole_batch(tmp_path):
    weights = _pretrained_tiny(str(tmp_path / "tiny.pth"))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), weights), nprocs=2, join=True)

    # the layer: both halves normalised with the whole batch's statistics, gradients included
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6) * 3 + 1).requires_grad_(True)
    bn = nn.BatchNorm2d(3)
    y = bn(x)
    (y * torch.arange(y[:2].numel()).view_as(y[:2]).sin().repeat(2, 1, 1, 1)).sum().backward()
    parts = [torch.load(tmp_path / f"layer{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.allclose(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([p["grad"] for p in parts]), x.grad, atol=1e-5)
    for p in parts:
        assert torch.allclose(p["mean"], bn.running_mean, atol=1e-6)
        assert torch.allclose(p["var"], bn.running_var, atol=1e-5)

    # the model: the first BatchNorm's running statistics are those of the whole 4-image batch
    cfg = from_dict(_config("bn", weights))
    torch.manual_seed(0)
    whole = build_model(cfg.model, cfg.data.input_size)
    apply_stage(whole, "finetune")
    _step(whole, _batch(4))
    ranks = [torch.load(tmp_path / f"model{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["synced"] == sum(isinstance(m, nn.BatchNorm2d) for m in whole.modules())
        assert torch.allclose(r["bn1_mean"], whole.backbone.bn1.running_mean, atol=1e-5)
        assert torch.allclose(r["bn1_var"], whole.backbone.bn1.running_var, rtol=1e-4, atol=1e-5)

    # rank 0's checkpoint loads back as a plain model (SyncBatchNorm keeps BatchNorm's keys)
    loaded, loaded_cfg, _ = load_model(str(tmp_path / "ckpt"))
    assert loaded_cfg.model.norm == "syncbn"
    assert torch.equal(loaded.backbone.bn1.running_mean, ranks[0]["bn1_mean"])
    assert not any(isinstance(m, CPUSyncBatchNorm) for m in loaded.modules())
