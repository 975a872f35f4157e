"""paf-ray pretrain: the self-supervised checkpoints load through the zoo like published ones."""

from __future__ import annotations

import pytest
import torch

from paf_ray.config import PretrainConfig, load_config
from paf_ray.models.backbones import BACKBONES
from paf_ray.models.zoo import load_backbone_weights, read_checkpoint
from paf_ray.train.pretrain import augment, nt_xent, train_contrastive

TINY = BACKBONES["tiny"]


@pytest.mark.parametrize("method, keys", [
    ("simclr", {"conv1.weight", "fc.weight"}),  # tonylins/simclr-converter: torchvision names, fc without bias
    ("moco", {"module.encoder_q.conv1.weight", "module.encoder_q.fc.2.weight", "module.encoder_k.conv1.weight",
              "module.queue", "module.queue_ptr"}),  # facebookresearch/moco
])
def test_contrastive_checkpoint_loads_through_the_zoo_as_its_method(method, keys, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 64), dtype=torch.uint8, generator=gen)
    backbone_cfg = load_config(None, ["model.backbone.name=tiny", "model.backbone.tiny.width=4",
                                      "model.backbone.random_init=true"]).model.backbone
    pc = PretrainConfig(method=method, steps=3, batch_size=4, lr=1e-2, queue=8, proj_dim=16)
    trained, obj, losses = train_contrastive(method, backbone_cfg, images, pc)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    path = str(tmp_path / f"{method}.pth")
    torch.save(obj, path)

    assert keys <= set(obj["state_dict"]) and "fc.bias" not in obj["state_dict"]
    assert TINY.sniff(read_checkpoint(path)) == method
    fresh = TINY.build(backbone_cfg.options["tiny"])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    recipe = load_backbone_weights(fresh, TINY, path, "auto")
    assert recipe == TINY.formats[method].normalization == {"simclr": "none", "moco": "imagenet"}[method]
    loaded, encoder = fresh.state_dict(), trained.state_dict()
    assert set(loaded) == set(encoder)
    assert all(torch.equal(loaded[k], encoder[k]) for k in loaded)
    assert not all(torch.equal(before[k], encoder[k]) for k in before if k.endswith("weight"))


def test_views_differ_and_the_loss_finds_the_positive():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 48), dtype=torch.uint8, generator=gen)
    v1, v2 = augment(images, gen), augment(images, gen)
    assert v1.shape == (4, 3, 32, 48) and 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    assert not torch.allclose(v1, v2)
    z = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    other = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    assert float(nt_xent(z, z, 0.1)) < float(nt_xent(z, other, 0.1))


def test_pretrain_command_writes_a_checkpoint_the_config_can_use(tmp_path, monkeypatch, capsys):
    import os

    from paf_ray.cli import main
    from paf_ray.models.multitask import build_model

    smoke = os.path.join(os.path.dirname(__file__), "..", "jobs", "smoke.yaml")
    monkeypatch.setenv("PAF_RAY_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "moco.pth.tar")
    assert main(["pretrain", smoke, "--method", "moco", "--out", out, "--steps", "2", "--batch-size", "4",
                 "--size", "64x32"]) == 0
    assert "--set model.backbone.format=moco" in capsys.readouterr().out
    cfg = load_config(smoke, [f"model.backbone.weights={out}", "model.backbone.format=auto"])
    model = build_model(cfg.model, cfg.data.input_size)  # the zoo reads it as a published MoCo file
    assert model.normalization == "imagenet"
    saved = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(model.backbone.conv1.weight, saved["module.encoder_q.conv1.weight"])


def test_a_backbone_without_the_methods_layout_is_refused_in_one_line():
    cfg = load_config(None, ["model.backbone.name=convnext_tiny", "model.backbone.random_init=true"]).model.backbone
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="simclr.*convnext_tiny does not read"):
        train_contrastive("simclr", cfg, images, PretrainConfig(method="simclr", steps=1, batch_size=2))
