"""The multi-task model: checkpoint zoo, adapters, stage policy, partial-label losses, detection, inspect.

Everything runs real torchvision / open_clip modules at tiny sizes on CPU; checkpoints are
built here from random nets in each published key layout.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from paf_ray.config import ConfigError, StageConfig, from_dict, load_config
from paf_ray.data.bdd100k import DET_CLASSES, IGNORE_INDEX, SEM_CLASSES
from paf_ray.models.adapters.bypass import BypassAdapter
from paf_ray.models.adapters.lora import LoRAConv2d, add_lora, lora_layers, merge_lora
from paf_ray.models.backbones import BACKBONES
from paf_ray.models.multitask import build_model
from paf_ray.models.normalize import normalize_images
from paf_ray.models.stages import apply_stage, finish_stage, param_groups, trainable_summary
from paf_ray.models.zoo import CheckpointError
from paf_ray.models.zoo import load_backbone_weights as _load_weights
from paf_ray.tasks.det.heads import IgnoreAwareFCOSHead, ignore_mask
from paf_ray.tasks.seg_head import seg_loss


def build_backbone(name, width=8):
    entry = BACKBONES[name]
    return entry.build(entry.config(width=width) if entry.config is not None and name == "tiny" else None)


def load_backbone_weights(backbone, path, fmt="auto", trust_checkpoint=False, name=None):
    """The zoo's loader for the backbone `name` (default: what `backbone` was built as)."""
    entry = BACKBONES[name or ("clip_rn50" if hasattr(backbone, "attnpool") else
                                "tiny" if backbone.stage_channels[1] < 64 else "resnet18")]
    return _load_weights(backbone, entry, path, fmt, trust_checkpoint)


def sniff_format(obj):
    return BACKBONES["resnet18"].sniff(obj)


def has_lora(module):
    return bool(lora_layers(module))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


DET = {
    "representation_size": 64,
    "box_batch_size_per_image": 32,
    "rpn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 50,
    "anchor_sizes": [16, 32, 64, 128, 256],
}


def tiny_model_cfg(det=None, **model):
    base = {
        "backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
        "fpn_channels": 32,
        "heads": {"sem": {"channels": 16}, "drv": {"channels": 16}, "lane": {"channels": 16}, "det": {**DET, **(det or {})}},
    }
    for k, v in model.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return from_dict({"model": base}).model


W, H = 128, 64  # network input (width, height) for the model tests


def make_batch(has_det, has_sem, has_drv, seed=0):
    """A collated batch (data/contracts.Batch) of random frames with the tasks the flags give them."""
    g = torch.Generator().manual_seed(seed)
    b = len(has_det)
    boxes, labels, ignore = [], [], []
    for i in range(b):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([W - 40.0, H - 30.0])
        wh = 12 + torch.rand(3, 2, generator=g) * 24
        boxes.append(torch.cat([xy, xy + wh], 1) if has_det[i] else torch.zeros(0, 4))
        labels.append(torch.randint(0, len(DET_CLASSES), (3 if has_det[i] else 0,), generator=g))
        ignore.append(torch.tensor([[0.0, 0.0, 20.0, 20.0]]) if has_det[i] else torch.zeros(0, 4))
    sem = torch.randint(0, len(SEM_CLASSES), (b, H, W), generator=g).to(torch.uint8)
    drv = torch.randint(0, 3, (b, H, W), generator=g).to(torch.uint8)
    for i in range(b):
        if not has_sem[i]:
            sem[i] = 255
        if not has_drv[i]:
            drv[i] = 255
    return {
        "image": torch.randint(0, 256, (b, 3, H, W), dtype=torch.uint8, generator=g),
        "targets": {"det": {"boxes": boxes, "labels": labels, "ignore_boxes": ignore,
                            "ignore_labels": [torch.zeros(len(x), dtype=torch.int64) for x in ignore]},
                    "sem": sem, "drv": drv},
        "has": {"det": torch.tensor(has_det), "sem": torch.tensor(has_sem), "drv": torch.tensor(has_drv)},
    }


# --------------------------------------------------------------------------- checkpoint zoo

_HEADS = ("fc.",)


def _no_fc(sd):
    return {k: v for k, v in sd.items() if not k.startswith(_HEADS)}


def _to_detectron2(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked") or k.startswith("fc."):
            continue
        k = re.sub(r"^conv1\.", "stem.conv1.", k)
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
        k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
        out[k] = v.numpy()
    out["fc1000.weight"] = np.zeros((3, 3), dtype=np.float32)
    return {"model": out, "__author__": "DetCo", "matching_heuristics": True}


def _to_simclr2_port(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        k = re.sub(r"^conv1\.", "net.0.0.", k)
        k = re.sub(r"^bn1\.", "net.0.1.0.", k)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(3)
            for a, b in (("conv1.", "net.0."), ("bn1.", "net.1.0."), ("conv2.", "net.2."), ("bn2.", "net.3.0."),
                         ("conv3.", "net.4."), ("bn3.", "net.5.0."), ("downsample.0.", "projection.shortcut."),
                         ("downsample.1.", "projection.bn.0.")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            k = f"net.{m.group(1)}.blocks.{m.group(2)}.{rest}"
        out[k] = v
    return {"resnet": out, "head": {"layers.0.weight": torch.zeros(4, 4)}}


def _layouts(sd):
    """format -> (checkpoint object, file suffix) in each published key layout."""
    fc_mlp = {"fc.0.weight": torch.randn(8, 8), "fc.0.bias": torch.zeros(8), "fc.2.weight": torch.randn(4, 8)}
    plain = _no_fc(sd)
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return {
        "torchvision": (dict(sd), ".pth"),
        "moco": ({"epoch": 200, "arch": "resnet", "optimizer": {"state": {}, "param_groups": []},
                  "state_dict": {**{f"module.encoder_q.{k}": v for k, v in {**plain, **fc_mlp}.items()},
                                 **{f"module.encoder_k.{k}": v.clone() for k, v in plain.items()},
                                 "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
                 ".pth.tar"),
        "mocov3": ({"epoch": 100, "arch": "resnet", "scaler": {"scale": 1024.0},
                    "state_dict": {**{f"module.base_encoder.{k}": v for k, v in {**plain, **fc_mlp}.items()},
                                   **{f"module.momentum_encoder.{k}": v.clone() for k, v in plain.items()},
                                   "module.predictor.0.weight": torch.randn(4, 4)}}, ".pth.tar"),
        "simclr": ({"state_dict": {**plain, "fc.weight": sd["fc.weight"]}}, ".pth"),
        "densecl": ({"state_dict": plain, "author": "DenseCL"}, ".pth"),
        "detco": (_to_detectron2(sd), ".pkl"),
        "swav": ({**{f"module.{k}": v for k, v in plain.items()},
                  "module.projection_head.0.weight": torch.randn(8, 8), "module.prototypes.weight": torch.randn(30, 8)},
                 ".pth.tar"),
        "byol": (no_counters, ".pth.tar"),
        "mmselfsup": ({"meta": {"epoch": 200, "mmselfsup_version": "1.0.0"},
                       "state_dict": {**{f"backbone.{k}": v for k, v in plain.items()},
                                      **{f"momentum_encoder.module.backbone.{k}": v.clone() for k, v in plain.items()},
                                      "neck.mlp.0.weight": torch.randn(4, 4), "head.predictor.0.weight": torch.randn(4, 4)}},
                      ".pth"),
    }


def _save(obj, path):
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    elif path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(obj, path)
    else:
        buf = io.BytesIO()  # round-trip through bytes as a downloaded file would be
        torch.save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())


EXPECTED_NORM = {"torchvision": "imagenet", "moco": "imagenet", "mocov3": "imagenet", "simclr": "none",
                 "simclr2": "none", "densecl": "imagenet", "detco": "imagenet", "swav": "swav", "byol": "imagenet",
                 "mmselfsup": "imagenet", "clip": "clip"}


def _assert_same_backbone(backbone, source_sd):
    own = backbone.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, source_sd[k]), k


@functools.lru_cache(maxsize=2)
def _random_resnet_sd(name):
    torch.manual_seed(1)
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    for m in net.modules():  # non-default BN statistics, so a skipped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.state_dict()


@pytest.mark.parametrize("fmt", ["torchvision", "moco", "mocov3", "simclr", "densecl", "detco", "swav", "byol", "mmselfsup"])
def test_zoo_layout_loads_with_only_heads_dropped(tmp_path, fmt):
    sd = _random_resnet_sd("resnet18")
    obj, suffix = _layouts(sd)[fmt]
    path = str(tmp_path / f"{fmt}{suffix}")
    _save(obj, path)
    backbone = build_backbone("resnet18")
    recipe = load_backbone_weights(backbone, path, "auto", trust_checkpoint=(fmt == "detco"), name="resnet18")
    _assert_same_backbone(backbone, sd)
    assert recipe == EXPECTED_NORM[fmt]
    # the explicit format gives the same result as sniffing
    loaded = torch.load(path, weights_only=True) if suffix != ".pkl" else obj
    assert sniff_format(loaded) == fmt
    backbone2 = build_backbone("resnet18")
    assert load_backbone_weights(backbone2, path, fmt, trust_checkpoint=(fmt == "detco"), name="resnet18") == EXPECTED_NORM[fmt]
    _assert_same_backbone(backbone2, sd)


def test_zoo_simclr2_port_and_safetensors_resnet50(tmp_path):
    sd = _random_resnet_sd("resnet50")
    path = str(tmp_path / "r50_1x_sk0.pth")
    _save(_to_simclr2_port(sd), path)
    backbone = build_backbone("resnet50")
    assert load_backbone_weights(backbone, path, name="resnet50") == "none"
    _assert_same_backbone(backbone, sd)

    st = str(tmp_path / "resnet50.safetensors")
    _save({k: v.contiguous() for k, v in sd.items()}, st)
    backbone = build_backbone("resnet50")
    assert load_backbone_weights(backbone, st, "torchvision", name="resnet50") == "imagenet"
    _assert_same_backbone(backbone, sd)


def test_zoo_clip_rn50_into_open_clip_visual(tmp_path):
    from open_clip import get_model_config
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(2)
    vis = get_model_config("RN50")["vision_cfg"]
    visual = ModifiedResNet(vis["layers"], 1024, 32, vis["image_size"], vis["width"])
    sd = {f"visual.{k}": v.half() for k, v in visual.state_dict().items()}  # OpenAI weights are fp16
    sd.update({"token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6),
               "transformer.resblocks.0.ln_1.weight": torch.ones(8)})
    path = str(tmp_path / "open_clip_model.safetensors")
    _save(sd, path)

    backbone = build_backbone("clip_rn50")
    assert load_backbone_weights(backbone, path) == "clip"
    own = backbone.state_dict()
    for k, v in own.items():
        assert torch.equal(v, sd[f"visual.{k}"].float()), k
    feats = backbone(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-3:]) for f in feats.values()] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]

    # A CLIP checkpoint never goes into a torchvision ResNet-50: clear error, not a silent partial load.
    with pytest.raises(CheckpointError, match="another backbone") as err:
        load_backbone_weights(build_backbone("resnet50"), path, name="resnet50")
    assert "conv1.weight" in str(err.value) and path in str(err.value)


def test_zoo_wrong_prefix_fails_listing_keys(tmp_path):
    sd = _random_resnet_sd("resnet18")
    path = str(tmp_path / "wrong_prefix.pth")
    _save({"state_dict": {f"encoder.{k}": v for k, v in sd.items()}}, path)
    backbone = build_backbone("resnet18")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(backbone, path)
    msg = str(err.value)
    assert path in msg and "missing" in msg and "conv1.weight" in msg and "encoder.conv1.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # nothing half-loaded

    # An explicit format that does not match the file fails too.
    tv = str(tmp_path / "tv.pth")
    _save(sd, tv)
    with pytest.raises(CheckpointError, match="module.encoder_q"):
        load_backbone_weights(build_backbone("resnet18"), tv, "moco")
    with pytest.raises(CheckpointError, match="'clip' is not a layout of backbone resnet18"):
        load_backbone_weights(build_backbone("resnet18"), tv, "clip")
    # A truncated checkpoint (a stage missing) fails, naming the keys.
    cut = str(tmp_path / "cut.pth")
    _save({k: v for k, v in sd.items() if not k.startswith("layer4.")}, cut)
    with pytest.raises(CheckpointError, match="layer4.0.conv1.weight"):
        load_backbone_weights(build_backbone("resnet18"), cut)


def test_zoo_pickles_need_trust(tmp_path):
    sd = _random_resnet_sd("resnet18")
    path = str(tmp_path / "detco.pkl")
    _save(_to_detectron2(sd), path)
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        load_backbone_weights(build_backbone("resnet18"), path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone_weights(build_backbone("resnet18"), str(tmp_path / "absent.pth"))


def test_build_model_follows_checkpoint_normalization(tmp_path):
    src = build_backbone("tiny")
    sd = src.state_dict()
    path = str(tmp_path / "swav_tiny.pth.tar")
    _save({f"module.{k}": v for k, v in sd.items()} | {"module.prototypes.weight": torch.randn(5, 4)}, path)
    cfg = tiny_model_cfg(tasks=["sem"], backbone={"weights": path})
    model = build_model(cfg, (W, H))
    assert model.normalization == "swav"
    _assert_same_backbone(model.backbone, sd)
    # Rebuilt for a paf_ray checkpoint (weights not loaded): the file still picks the normalisation.
    assert build_model(cfg, (W, H), load_weights=False).normalization == "swav"
    assert build_model(tiny_model_cfg(tasks=["sem"]), (W, H)).normalization == "imagenet"
    assert build_model(tiny_model_cfg(tasks=["sem"], backbone={"weights": path, "normalization": "none"}),
                       (W, H)).normalization == "none"


# --------------------------------------------------------------------------- adapters


def test_adapters_are_identity_at_init():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    plain = build_backbone("tiny").eval()
    ref = plain(normalize_images(x, "imagenet"))

    adapter = BypassAdapter(64, reduction=4, init_scale=0.5)
    f = torch.randn(2, 64, 4, 4)
    assert torch.equal(adapter(f), f)

    model = build_model(tiny_model_cfg(tasks=["sem"], adapter={"kind": "bypass"}), (W, H)).eval()
    model.backbone.load_state_dict(plain.state_dict())
    feats = model.features(x)[1]["sem"]
    assert all(torch.equal(feats[k], ref[k]) for k in ref)

    lora = build_model(tiny_model_cfg(tasks=["sem"], adapter={"kind": "lora", "lora": {"rank": 2}}), (W, H)).eval()
    lora.backbone.load_state_dict(plain.state_dict(), strict=False)
    assert has_lora(lora.backbone)
    feats = lora.features(x)[1]["sem"]
    assert all(torch.allclose(feats[k], ref[k], atol=1e-6) for k in ref)


def test_inline_adapters_are_identity_at_init_and_feed_the_next_stage():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    plain = build_backbone("tiny").eval()
    ref = plain(normalize_images(x, "imagenet"))
    models = {}
    for kind in ("inline", "bypass"):
        model = build_model(tiny_model_cfg(tasks=["sem"], adapter={"kind": kind}), (W, H)).eval()
        model.backbone.load_state_dict(plain.state_dict())
        models[kind] = model
    feats = models["inline"].features(x)[1]["sem"]
    assert all(torch.equal(feats[k], ref[k]) for k in ref)  # identity at init: the plain backbone's outputs

    for model in models.values():  # only the stride-4 adapter (after layer1) becomes non-zero
        torch.nn.init.normal_(model.adapters["1"].up.weight, std=0.5)
    with torch.no_grad():
        inline = models["inline"].features(x)[1]["sem"]
        bypass = models["bypass"].features(x)[1]["sem"]
    assert not torch.allclose(inline[1], ref[1]) and not torch.allclose(bypass[1], ref[1])
    # in-line: the adapted C2 is what layer2 reads, so C3..C5 change; bypass leaves them as they were
    assert all(not torch.allclose(inline[k], ref[k]) for k in (2, 3, 4))
    assert all(torch.equal(bypass[k], ref[k]) for k in (2, 3, 4))


def test_inline_adapters_train_in_adapt_through_the_frozen_backbone():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(tasks=["sem"], adapter={"kind": "inline", "stages": [1, 4]}), (W, H))
    apply_stage(model, "adapt")
    model.train()
    for a in model.adapters.values():
        torch.nn.init.normal_(a.up.weight, std=0.1)
    x = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    batch = {"has": {"sem": torch.ones(2, dtype=torch.bool)},
             "targets": {"sem": torch.randint(0, len(SEM_CLASSES), (2, H, W)).to(torch.uint8)}}
    model.total_loss(model(x, batch)).backward()
    # the stride-4 adapter's gradient passes back through the frozen layer2..layer4
    assert model.adapters["1"].down.weight.grad is not None and model.adapters["1"].down.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    from paf_ray.config import to_dict
    from paf_ray.models.inspect import inspect_model

    # `paf-ray inspect` tells the placements apart: only the in-line adapt forward records the backbone
    for kind, graph in (("inline", True), ("bypass", False)):
        cfg = from_dict({"model": {**to_dict(model.cfg), "adapter": {"kind": kind, "stages": [1, 4]}},
                         "data": {"input_size": [W, H]}})
        report = inspect_model(cfg, "adapt", flops=False)
        assert report["adapter"]["kind"] == kind and report["backbone_graph"] is graph
        assert ("feeds the next stage" in report["adapter"]["placement"]) is graph


def test_lora_merge_gives_plain_backbone_with_same_outputs():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    plain_keys = set(backbone.state_dict())
    n = add_lora(backbone, BACKBONES["resnet18"].lora_targets(backbone, [2, 3, 4]), rank=4, alpha=8.0)
    assert n > 0 and set(backbone.state_dict()) > plain_keys
    for m in backbone.modules():
        if isinstance(m, LoRAConv2d):
            torch.nn.init.normal_(m.lora_B, std=0.02)  # a trained, non-zero delta
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        assert merge_lora(backbone) == n
        after = backbone(x)
    assert not has_lora(backbone)
    assert set(backbone.state_dict()) == plain_keys
    for k in before:
        assert (before[k] - after[k]).abs().max() <= 1e-5 * max(1.0, before[k].abs().max().item())


# --------------------------------------------------------------------------- stage policy


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["bypass", "lora"])
def test_adapt_step_keeps_backbone_bit_identical(kind):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(adapter={"kind": kind, "lora": {"rank": 2}}), (W, H))
    apply_stage(model, "adapt")
    model.train()
    assert not model.backbone.training  # frozen BN stays in eval mode after .train()
    stage = StageConfig(kind="adapt", lr=1e-2)
    opt = torch.optim.AdamW(param_groups(model, stage))
    backbone_before = _snapshot(model.backbone)
    rest_before = {k: v for k, v in _snapshot(model).items() if not k.startswith("backbone.")}

    batch = make_batch([True, True], [True, False], [False, True])
    losses = model(batch["image"], batch)
    model.total_loss(losses).backward()
    opt.step()

    after = _snapshot(model.backbone)
    frozen = [k for k in backbone_before if ".lora_" not in k]
    assert all(torch.equal(backbone_before[k], after[k]) for k in frozen)  # weights and BN statistics
    changed = {k for k, v in _snapshot(model).items() if k in rest_before and not torch.equal(v, rest_before[k])}
    for prefix in ("neck.", "heads.det.", "heads.sem.", "heads.drv."):
        assert any(k.startswith(prefix) for k in changed), prefix
    if kind == "bypass":
        assert any(k.startswith("adapters.") for k in changed)
    else:
        lora_changed = [k for k in backbone_before if ".lora_" in k and not torch.equal(backbone_before[k], after[k])]
        assert lora_changed


def test_stage_policy_trainables_groups_and_merge():
    model = build_model(tiny_model_cfg(adapter={"kind": "lora", "lora": {"rank": 2}}), (W, H))
    apply_stage(model, "adapt")
    s = trainable_summary(model)["modules"]
    assert s["backbone"]["trainable"] == 0 and s["adapters"]["trainable"] == s["adapters"]["total"] > 0

    assert finish_stage(model, "adapt", merge_adapters=True)
    assert not finish_stage(model, "adapt", merge_adapters=True)  # once
    assert model.adapters_merged and not has_lora(model.backbone)
    apply_stage(model, "finetune")
    s = trainable_summary(model)["modules"]
    assert s["backbone"]["trainable"] == s["backbone"]["total"] > 0 and s["adapters"]["total"] == 0
    assert model.backbone.training == model.training

    groups = param_groups(model, StageConfig(kind="finetune", lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05))
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "backbone.bn1.weight" in no_decay and "neck.inner_blocks.0.0.bias" in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    stage = StageConfig(kind="finetune", lr=1e-3, backbone_lr_mult=0.1, head_lr_mult={"det": 0.5})
    lr_of = {names[id(p)]: g["lr"] for g in param_groups(model, stage) for p in g["params"]}
    assert lr_of["heads.det.detector.roi_heads.box_predictor.cls_score.weight"] == pytest.approx(5e-4)
    assert lr_of["heads.det.detector.rpn.head.conv.0.0.bias"] == pytest.approx(5e-4)
    seg_lrs = [lr for n, lr in lr_of.items() if n.startswith(("heads.sem.", "heads.drv."))]
    assert seg_lrs and seg_lrs == pytest.approx([1e-3] * len(seg_lrs))
    assert lr_of["neck.inner_blocks.0.0.weight"] == pytest.approx(1e-3)
    assert lr_of["backbone.conv1.weight"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"head_lr_mult.*unknown task 'seg'"):
        load_config(None, ["model.backbone.random_init=true", "train.stages.1.head_lr_mult={seg: 0.5}"])


# --------------------------------------------------------------------------- forward and losses


def test_mixed_task_batch_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(loss={"weighting": "uncertainty"}), (W, H))
    apply_stage(model, "finetune")
    model.train()
    # det on sample 0 only, sem on nobody, drv on both
    batch = make_batch([True, False], [False, False], [True, True])
    losses = model(batch["image"], batch)
    assert {"det", "sem", "drv", "det_rpn_cls", "det_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["sem"].item() == 0.0 and losses["det"].item() > 0 and losses["drv"].item() > 0
    total = model.total_loss(losses)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # DDP waits for every parameter
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.loss_weights["det"].grad.item() != 0.0
    assert model.loss_weights["sem"].grad.item() == 0.0  # an absent task leaves its log-variance alone


def test_seg_loss_counts_only_labelled_samples():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(tasks=["sem", "drv"]), (W, H))
    apply_stage(model, "adapt")  # frozen BN: samples do not interact
    model.train()
    both = make_batch([False, False], [True, False], [True, True], seed=3)
    both["targets"]["sem"][1] = 5  # garbage labels on a sample flagged as unlabelled must not count
    alone = {"image": both["image"][:1], "has": {k: v[:1] for k, v in both["has"].items()},
             "targets": {"det": {k: v[:1] for k, v in both["targets"]["det"].items()},
                         "sem": both["targets"]["sem"][:1], "drv": both["targets"]["drv"][:1]}}
    with torch.no_grad():
        l_both = model(both["image"], both)
        l_alone = model(alone["image"], alone)
    assert torch.allclose(l_both["sem"], l_alone["sem"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(l_both["drv"], l_alone["drv"])  # drv has both samples


def test_class_balanced_seg_loss_gives_rare_classes_their_share():
    """With class_balance=1 every class present counts as much as any other, however few its
    pixels: a thin pole against a large road moves the loss as much as the road does."""
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 16, 16)
    target = torch.zeros(1, 16, 16, dtype=torch.long)  # road everywhere ...
    target[0, :, 7] = 2  # ... a one-pixel-wide pole ...
    target[0, 0, :] = IGNORE_INDEX  # ... and an unlabelled row
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    per_class = [ce[target == c].mean() for c in (0, 2)]
    assert torch.allclose(seg_loss(logits, target, 1.0), sum(per_class) / 2, atol=1e-6)
    plain = ce[target != IGNORE_INDEX].mean()
    assert torch.allclose(seg_loss(logits, target, 0.0), plain, atol=1e-6)
    assert seg_loss(logits, torch.full_like(target, IGNORE_INDEX), 0.5) == 0.0  # nothing labelled: 0, not NaN


def test_eval_outputs_and_single_task_baseline():
    model = build_model(tiny_model_cfg(), (W, H)).eval()
    images = make_batch([True, True], [True, True], [True, True])["image"]
    with torch.no_grad():
        out = model(images)
    assert out["sem"].shape == (2, len(SEM_CLASSES), H, W) and out["drv"].shape == (2, 3, H, W)
    assert len(out["det"]) == 2
    for d in out["det"]:
        assert d["boxes"].shape[1] == 4 and d["labels"].dtype == torch.int64
        assert ((d["labels"] >= 0) & (d["labels"] < len(DET_CLASSES))).all()
        assert (d["boxes"][:, [0, 2]] <= W).all() and (d["boxes"][:, [1, 3]] <= H).all()

    sem_only = build_model(tiny_model_cfg(tasks=["sem"]), (W, H))
    assert set(sem_only.heads) == {"sem"}
    sem_only.train()
    batch = make_batch([True, True], [True, False], [True, True])
    assert set(sem_only(batch["image"], batch)) == {"sem"}
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 64, dtype=torch.uint8))


def test_detection_learns_a_box_in_input_pixels():
    """Overfit one box on a wide (non-square) image: the top detection lands on it in input pixels."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(tasks=["det"], adapter={"kind": "none"}), (W, H))
    apply_stage(model, "finetune")
    img = torch.full((1, 3, H, W), 60, dtype=torch.uint8)
    box = torch.tensor([[84.0, 16.0, 120.0, 56.0]])  # right half: x beyond H catches swapped/normalised coords
    img[:, :, 16:56, 84:120] = 220
    batch = {"targets": {"det": {"boxes": [box], "labels": [torch.tensor([2])], "ignore_boxes": [torch.zeros(0, 4)],
                                 "ignore_labels": [torch.zeros(0, dtype=torch.int64)]}},
             "has": {"det": torch.tensor([True])}}
    opt = torch.optim.AdamW(param_groups(model, StageConfig(kind="finetune", lr=3e-3, weight_decay=0.0)))
    iou = 0.0
    for step in range(60):
        model.train()
        loss = model.total_loss(model(img, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 14 and step % 5 == 4:
            model.eval()
            with torch.no_grad():
                d = model(img)["det"][0]
            if len(d["boxes"]):
                iou = box_iou(d["boxes"][:1], box).item()
                if iou > 0.6 and d["labels"][0].item() == 2:
                    break
    assert iou > 0.6, iou


def test_ignore_regions_are_neither_positive_nor_negative():
    anchors = torch.tensor([[0.0, 0, 10, 10], [2, 2, 8, 8], [40, 40, 60, 60], [100, 100, 120, 120]])
    ignore = torch.tensor([[0.0, 0, 12, 12]])
    assert ignore_mask(anchors, ignore, 0.5).tolist() == [True, True, False, False]

    model = build_model(tiny_model_cfg(tasks=["det"]), (W, H))
    rpn, roi = model.heads["det"].detector.rpn, model.heads["det"].detector.roi_heads
    gt = torch.tensor([[40.0, 40, 60, 60]])
    targets = [{"boxes": gt, "labels": torch.tensor([3]), "ignore_boxes": ignore}]
    labels, _ = rpn.assign_targets_to_anchors([anchors], targets)
    assert labels[0].tolist() == [-1.0, -1.0, 1.0, 0.0]  # in the ignore box: dropped; far away: negative
    roi._ignore_boxes = [ignore]
    _, labels = roi.assign_targets_to_proposals([anchors], [gt], [torch.tensor([3])])
    roi._ignore_boxes = None
    assert labels[0].tolist() == [-1, -1, 3, 0]

    # FCOS: points inside an ignore region give no classification loss at all.
    head = IgnoreAwareFCOSHead(32, 1, 3, num_convs=1)
    pts = torch.tensor([[0.0, 0, 8, 8], [16, 16, 24, 24]])
    logits = torch.full((1, 2, 3), 5.0, requires_grad=True)
    outs = {"cls_logits": logits, "bbox_regression": torch.zeros(1, 2, 4), "bbox_ctrness": torch.zeros(1, 2, 1)}
    tgt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "ignore_boxes": ignore}]
    loss = head.compute_loss(tgt, outs, [pts], [torch.tensor([-1, -1])])["classification"]
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0


def test_fcos_detector_trains_and_predicts():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(tasks=["det", "drv"], fpn_channels=64, det={"kind": "fcos", "fcos_num_convs": 1})
    model = build_model(cfg, (W, H))
    apply_stage(model, "adapt")
    model.train()
    batch = make_batch([True, True], [False, False], [False, True])
    losses = model(batch["image"], batch)
    assert {"det", "det_cls", "det_box", "det_ctr", "drv"} <= set(losses)
    model.total_loss(losses).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        dets = model(batch["image"])["det"]
    assert len(dets) == 2 and all(((d["labels"] >= 0) & (d["labels"] < 10)).all() for d in dets)


# --------------------------------------------------------------------------- inspect and job files


def _inspect(capsys, *args):
    from paf_ray.cli import main

    assert main(["inspect", *args, "--json"]) == 0  # the CLI path, in-process (no second torch import)
    return json.loads(capsys.readouterr().out)


def test_inspect_job_files_r50(capsys):
    # counts do not depend on the input size or proposal count; FLOPs stay cheap
    small = ["--set", "data.input_size=[128,96]", "--set", "model.heads.det.rpn_post_nms_top_n_test=100"]
    adapt = _inspect(capsys, os.path.join(REPO, "jobs", "adapt.yaml"), *small)
    m = adapt["modules"]
    assert adapt["stage"] == "adapt"
    assert m["backbone"]["trainable"] == 0 and m["adapters"]["trainable"] > 0
    assert m["adapters"]["total"] <= 0.10 * m["backbone"]["total"]
    assert m["backbone"]["total"] > 23_000_000  # ResNet-50
    assert {"neck", "det_head", "sem_head", "drv_head"} <= set(m) and adapt["gflops"] > 0
    assert adapt["total"] == sum(v["total"] for v in m.values())

    from paf_ray.models.inspect import inspect_model

    fine = inspect_model(load_config(os.path.join(REPO, "jobs", "finetune.yaml")), "finetune", flops=False)
    assert fine["modules"]["backbone"]["trainable"] == fine["modules"]["backbone"]["total"]
    assert fine["trainable"] == fine["total"]


def test_job_files_are_full_configs():
    for name in ("adapt.yaml", "finetune.yaml"):
        path = os.path.join(REPO, "jobs", name)
        with open(path, encoding="utf-8") as f:
            assert f.readline().rstrip("\n") == "#!/usr/bin/env -S python -m paf_ray run"
        cfg = load_config(path)
        assert cfg.model.backbone.name == "resnet50" and cfg.model.tasks == ["det", "sem", "drv"]
        assert cfg.ray.use_gpu and cfg.data.root
        assert cfg.data.input_size[0] % 32 == 0 and cfg.data.input_size[1] % 32 == 0
    assert [s.kind for s in load_config(os.path.join(REPO, "jobs", "finetune.yaml")).train.stages] == ["finetune"]
    assert load_config(os.path.join(REPO, "jobs", "finetune.yaml")).train.init_checkpoint
