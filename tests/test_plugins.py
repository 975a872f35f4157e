"""Tasks, adapter kinds and backbones are plug-ins: every combination the registries hold builds,
trains a step in each stage, saves, loads and exports, at a tiny size; a plug-in of a user's own
joins through `plugins:` with nothing else changed.

The loops read the registries, so a plug-in added there is tested here without a line of this file
changing."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from paf_ray.config import from_dict, to_dict
from paf_ray.export import TOLERANCE, export_model
from paf_ray.models.adapters import ADAPTERS
from paf_ray.models.backbones import BACKBONES
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import apply_stage, finish_stage, param_groups, trainable_summary
from paf_ray.tasks import TASKS, ordered
from paf_ray.train.checkpoint import load_model, save_checkpoint

W, H = 64, 64
SMALL_DET = {"representation_size": 16, "box_batch_size_per_image": 8, "rpn_batch_size_per_image": 16,
             "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20, "rpn_pre_nms_top_n_test": 50,
             "rpn_post_nms_top_n_test": 20, "anchor_sizes": [8, 16, 32, 64, 128]}


def config(backbone: str, adapter: str, tasks=None):
    # the heads at their smallest: a head section's width, and the detector's proposal counts
    heads = {}
    for t in TASKS:
        fields = t.config.__dataclass_fields__ if t.config is not None else {}
        heads[t.name] = {"channels": 8} if "channels" in fields else {k: v for k, v in SMALL_DET.items() if k in fields}
    return from_dict({
        "data": {"input_size": [W, H]},
        "model": {"tasks": list(tasks or TASKS.names()), "backbone": {"name": backbone, "random_init": True},
                  "adapter": {"kind": adapter, "stages": [2, 3, 4], "lora": {"rank": 2}}, "fpn_channels": 32,
                  "heads": heads},
        "train": {"stages": [{"kind": "adapt", "lr": 1e-3}, {"kind": "finetune", "lr": 1e-3}]},
    })


@pytest.fixture(scope="module")
def samples(synth_root):
    """Decoded samples of the synthetic BDD100K, every registered task's labels on them: a 100k frame
    and a 10k frame, so that each task is present in one and absent in the other."""
    from paf_ray.data.decode import load_sample
    from paf_ray.data.index import build_index

    records = build_index(synth_root, list(TASKS))["train"]
    by_set = {}
    for r in records:
        by_set.setdefault(r["image_set"], r)
    picked = list(by_set.values())
    assert {t for r in picked for t in r["labels"]} == set(TASKS.names()), "the synthetic data labels every task"
    return [load_sample(r, list(TASKS)) for r in picked]


def batch(samples, tasks) -> dict:
    """The collated batch (data/contracts.Batch) of `samples` at the input size: each task's transform
    and collate, the path Ray Data takes."""
    from paf_ray.data.collate import collate_rows, stack_rows
    from paf_ray.data.transforms import make_row, val_geometry

    rows = []
    for i, sample in enumerate(samples):
        h, w = sample["image"].shape[:2]
        row = make_row(sample["image"], sample["targets"], tasks, val_geometry(w, h, (W, H)))
        rows.append({**row, "name": f"f{i}.jpg", "error": ""})
    return collate_rows(stack_rows(rows), tasks)


BACKBONE_NAMES = [b.name for b in BACKBONES]
ADAPTER_KINDS = [a.name for a in ADAPTERS]


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("adapter", ADAPTER_KINDS)
def test_every_backbone_and_adapter_kind_with_every_task_trains_saves_loads_exports(backbone, adapter, samples, tmp_path):
    cfg = config(backbone, adapter)
    tasks = ordered(cfg.model.tasks)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size)
    b = batch(samples, tasks)
    for i, stage in enumerate(cfg.train.stages):
        apply_stage(model, stage.kind)
        summary = trainable_summary(model)["modules"]
        if stage.kind == "adapt":
            assert summary["backbone"]["trainable"] == 0, "adapt freezes the backbone"
            assert (summary["adapters"]["trainable"] > 0) == (adapter != "none")
        else:
            assert summary["backbone"]["trainable"] == summary["backbone"]["total"] > 0
        before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        optimizer = torch.optim.AdamW(param_groups(model, stage))
        model.train()
        losses = model(b["image"], b)
        assert set(cfg.model.tasks) <= set(losses) and all(torch.isfinite(v) for v in losses.values())
        model.total_loss(losses).backward()
        optimizer.step()
        changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(before[n], p)]
        if stage.kind == "adapt":
            owned = {id(p) for p in model.adapter.owned(model)}
            assert all(id(dict(model.backbone.named_parameters())[n]) in owned for n in changed), changed[:3]
        else:
            assert changed
        finish_stage(model, stage.kind)
    save_checkpoint(str(tmp_path / "ckpt"), model, cfg, meta={"stage": "finetune"})
    loaded, loaded_cfg, meta = load_model(str(tmp_path / "ckpt"))
    assert meta["adapters_merged"] == (adapter == "lora")
    model.eval()
    frame = b["image"][:1]
    with torch.no_grad():
        mine, theirs = model(frame), loaded(frame)
    for t in tasks:
        if t.name == "det":
            assert torch.equal(mine["det"][0]["boxes"], theirs["det"][0]["boxes"])
        else:
            assert torch.equal(mine[t.name], theirs[t.name]), t.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(str(tmp_path / "ckpt"), str(tmp_path / "model.pt"), frame_size=(96, 96))
    assert report["outputs"] == [n for t in tasks for n in t.export_kinds]
    assert all(v <= TOLERANCE[k] for k, v in report["max_abs_diff"].items())


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_lora_deltas_left_unmerged_are_merged_at_export(backbone, tmp_path):
    """A checkpoint whose LoRA deltas were not merged (adapt-only, merge_adapters: false) exports the
    plain network with the deltas folded in, every task's outputs checked against PyTorch."""
    cfg = config(backbone, "lora")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size)
    with torch.no_grad():
        for layer in model.adapter.owned(model):
            layer.normal_(std=0.05)  # trained, non-zero deltas
    save_checkpoint(str(tmp_path / "ckpt"), model, cfg, meta={"stage": "adapt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(str(tmp_path / "ckpt"), str(tmp_path / "model.pt"), frame_size=(128, 128))
    assert report["adapters_merged_at_export"]
    names = [n for t in ordered(cfg.model.tasks) for n in t.export_kinds]
    assert report["outputs"] == names and len(names) >= len(TASKS)
    assert all(v <= TOLERANCE[k] for k, v in report["max_abs_diff"].items())


def test_every_task_writes_predictions_its_scorer_reads(samples, tmp_path):
    """Each task's official writer and scorer agree: a model's predictions, written as `paf-ray predict`
    writes them, score 100 against themselves with `paf-ray score <task>`."""
    import argparse

    from paf_ray.predict import frame_outputs, write_final, write_outputs

    cfg = config("tiny", "none")
    tasks = ordered(cfg.model.tasks)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size).eval()
    b = batch(samples, tasks)
    with torch.no_grad():
        outputs = model(b["image"])
    records: dict[str, list] = {}
    for i, sample in enumerate(samples):
        scale = float(b["scale"][i])
        predictions = {t.name: t.postprocess(outputs[t.name][i], scale, sample["image"].shape[:2], 0.0) for t in tasks}
        files, frame_records = frame_outputs(f"f{i}.jpg", sample["image"], predictions, tasks)
        write_outputs(str(tmp_path), files)
        for name, record in frame_records.items():
            records.setdefault(name, []).append(record)
    written = write_final(str(tmp_path), records, tasks)
    for task in tasks:
        own = [w for w in written if os.path.basename(w).startswith(task.name)]
        where = own[0] if own else str(tmp_path / task.name)
        parser = argparse.ArgumentParser()
        task.add_score_arguments(parser)
        result = task.score(parser.parse_args([where, where]))
        assert result[task.headline.split("/", 1)[1]] == pytest.approx(100.0), task.name


def test_inspect_shows_a_convnext_and_a_sweep_can_search_it():
    from paf_ray.models.inspect import inspect_model
    from paf_ray.tune import space

    cfg = config("convnext_tiny", "bypass", ["sem", "drv"])
    report = inspect_model(cfg, "adapt", flops=False)
    assert report["backbone"]["name"] == "convnext_tiny" and report["backbone"]["stage_channels"]["4"] == 768
    assert report["modules"]["backbone"]["trainable"] == 0 and report["modules"]["adapters"]["trainable"] > 0
    assert 27_000_000 < report["modules"]["backbone"]["total"] < 29_000_000  # ConvNeXt-T without its classifier

    data = to_dict(cfg)
    data["tune"] = {"backbones": [{"label": "r18", "name": "resnet18", "random_init": True},
                                  {"label": "cnx", "name": "convnext_tiny", "random_init": True}],
                    "search_space": {"model.adapter.kind": {"choice": ["bypass", "lora"]}}}
    sweep = from_dict(data)
    dims = space.parse_space(sweep.tune)
    for point in space.corner_points(dims):
        trial = space.trial_config(sweep, dims, point, name="check")
        assert trial.model.backbone.name in ("resnet18", "convnext_tiny")
    trial = space.trial_config(sweep, dims, {"backbone": "cnx", "model.adapter.kind": "lora"}, name="t")
    assert trial.model.backbone.name == "convnext_tiny" and trial.model.adapter.kind == "lora"


def test_convnext_adapts_then_finetunes_on_ray_from_a_checkpoint_file(ray_local, synth_root, tmp_path):
    """The ConvNeXt-T smoke run: a checkpoint in torchvision's layout read by the zoo, adapt (the
    backbone frozen: its weights leave the stage as they came) then finetune (they train), through
    Ray Train and Ray Data, with the lane task beside two others."""
    from paf_ray.models.backbones.convnext import ConvNeXtConfig
    from paf_ray.train.checkpoint import resolve_checkpoint_dir
    from paf_ray.train.run import run_pipeline

    torch.manual_seed(0)
    weights = tmp_path / "convnext_tiny.pth"
    torch.save(BACKBONES["convnext_tiny"].build(ConvNeXtConfig()).state_dict(), weights)
    data = to_dict(config("convnext_tiny", "bypass", ["sem", "drv", "lane"]))
    data["model"]["backbone"] = {"name": "convnext_tiny", "weights": str(weights), "format": "torchvision"}
    data["data"].update(root=synth_root, input_size=[128, 96], batch_size=2, cpus=0.5, max_val_samples=2)
    data["train"] = {"stages": [{"kind": "adapt", "lr": 1e-3, "max_steps_per_epoch": 1},
                                {"kind": "finetune", "lr": 1e-3, "max_steps_per_epoch": 1}]}
    data["ray"] = {"num_workers": 1, "cpus_per_worker": 1.0}
    data["name"] = "cnx"
    summary = run_pipeline(from_dict(data), out=str(tmp_path / "runs"))
    assert [s["stage"] for s in summary["stages"]] == ["stage0-adapt", "stage1-finetune"]
    assert {"drv/mIoU", "lane/F1_pix2"} <= set(summary["metrics"])  # (the 2 val frames are 100k frames: no sem)

    start = torch.load(weights, weights_only=True)
    key = "features.7.2.block.0.weight"  # the last block's depthwise conv, in torchvision's names
    assert key in start

    def backbone_weight(stage: dict) -> torch.Tensor:
        model, _, _ = load_model(resolve_checkpoint_dir(stage["checkpoint"]))
        return model.backbone.state_dict()[key]

    adapted, finetuned = (backbone_weight(s) for s in summary["stages"])
    assert torch.equal(adapted, start[key])  # frozen in adapt
    assert not torch.equal(finetuned, start[key])  # trained in finetune


@pytest.mark.parametrize("task", TASKS.names())
def test_every_task_is_a_study_cell_and_a_sweep_metric(task):
    """The study plans a single-task cell per task of its model, and scores cells by the headlines;
    a sweep may rank its trials by any task's headline."""
    from paf_ray import study

    tasks = [task] + [t for t in TASKS.names() if t != task][:1]
    cfg = from_dict({
        "command": "study", "model": {"tasks": tasks},
        "train": {"stages": [{"kind": "adapt", "lr": 0.01}, {"kind": "finetune", "lr": 0.001}]},
        "study": {"checkpoints": {"sup": {"weights": "/w/sup.pth", "format": "torchvision"}},
                  "total_steps": 40, "steps_per_epoch": 20, "adapt_fraction": 0.5, "seeds": [0]}})
    cells = study.plan_cells(cfg)
    assert {c.task for c in cells if c.paradigm == "single_task"} == set(tasks)
    assert TASKS[task].headline in study.table_keys(tasks)
    sweep = from_dict({"model": {"tasks": tasks, "backbone": {"random_init": True}},
                       "tune": {"metric": TASKS[task].headline, "search_space": {"train.stages.0.lr": 1e-3}}})
    assert sweep.tune.metric == TASKS[task].headline
