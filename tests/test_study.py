"""paf-ray study: the grid and its budget rule, validation, Δ_MTL and the sentences, the quick study."""

from __future__ import annotations

import csv
import json
import os

import pytest

from paf_ray import study
from paf_ray.config import ConfigError, from_dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "jobs", "study_demo.yaml")


def study_cfg(**grid):
    base = {
        "command": "study",
        "model": {"lv_adapter": {"random_init": True}},  # LV-on cells without a CLIP file, on purpose
        "train": {"stages": [{"kind": "adapt", "lr": 0.01}, {"kind": "finetune", "lr": 0.001}]},
        "study": {
            "checkpoints": {"sup": {"weights": "s3://bucket/sup.pth", "format": "torchvision"},
                            "ssl": {"pretrain": {"method": "moco", "steps": 5}}},
            "total_steps": 120,
            "steps_per_epoch": 20,
            "adapt_fraction": 0.25,
            **grid,
        },
    }
    return from_dict(base, "study.yaml")


# --------------------------------------------------------------------------- the grid


def test_every_cell_trains_the_same_steps_and_shared_cells_run_once():
    cfg = study_cfg(paradigms=["single_task", "pretrain_finetune", "adapt_finetune", "adapt_only"],
                    adapter_kinds=["bypass", "inline", "lora"], lv_adapter=[False, True], seeds=[0, 1])
    cells = study.check_study(cfg, "study.yaml")
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    # per checkpoint and seed: 3 single-task + 2 pretrain_finetune (LV off/on) + 2 x 3 x 2 adapt cells
    assert len(cells) == 2 * 2 * (3 + 2 + 12)
    weights = study.checkpoint_weights(cfg, "/out")
    assert weights["ssl"] == study.Weights("/out/checkpoints/ssl.pth", "moco", "resnet50")
    for cell in cells:
        run = study.cell_config(cfg, cell, weights[cell.checkpoint])
        steps = [(s.kind, s.epochs * s.max_steps_per_epoch) for s in run.train.stages]
        assert sum(n for _, n in steps) == 120, (cell.id, steps)
        assert run.train.seed == cell.seed and run.model.lv_adapter.enabled == cell.lv
        assert run.model.backbone.weights == weights[cell.checkpoint].path
        if cell.paradigm == "adapt_finetune":
            assert steps == [("adapt", 40), ("finetune", 80)]  # 0.25 x 6 epochs, rounded to 2 whole epochs
            assert run.model.adapter.kind == cell.adapter and run.train.stages[0].lr == 0.01
        elif cell.paradigm == "adapt_only":
            assert steps == [("adapt", 120)]
        else:
            assert steps == [("finetune", 120)] and run.model.adapter.kind == "none"
            assert run.train.stages[0].lr == 0.001
        if cell.paradigm == "single_task":
            assert run.model.tasks == [cell.task] and not cell.lv


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"total_steps": 110}, "study.total_steps: must be a multiple of study.steps_per_epoch (20)"),
        ({"adapt_fraction": 1.0}, "study.adapt_fraction"),
        ({"seeds": [0, 0]}, "study.seeds: values repeat"),
        ({"paradigms": ["finetune_only"]}, "study.paradigms[0]"),
        ({"adapter_kinds": ["none"]}, "study.adapter_kinds[0]"),
        ({"checkpoints": {"x": {"weights": "/a.pth", "pretrain": {"method": "simclr"}}}},
         "study.checkpoints.x: give exactly one of `weights`"),
        ({"checkpoints": {"a-b": {"weights": "/a.pth"}}}, "study.checkpoints.a-b: a checkpoint name"),
        ({"checkpoints": {"x": {"pretrain": {"method": "byol"}}}}, "study.checkpoints.x.pretrain.method"),
        ({"checkpoints": {}}, "study.checkpoints: name at least one checkpoint"),
        ({"lv_adpter": [True]}, "unknown key 'study.lv_adpter'"),
    ],
)
def test_bad_study_names_the_key(grid, message):
    with pytest.raises(ConfigError, match="study.yaml") as err:
        study_cfg(**grid)
    assert message in str(err.value)


def test_study_needs_the_two_stage_templates():
    with pytest.raises(ConfigError, match="train.stages: a study takes its stage settings"):
        from_dict({"command": "study", "train": {"stages": [{"kind": "finetune"}]},
                   "study": {"checkpoints": {"a": {"weights": "/a.pth"}}}}, "study.yaml")


def test_the_cluster_grid_file_is_valid_and_submits_as_a_study(monkeypatch):
    from paf_ray.jobs import build_job_spec

    cfg = study.load_study(os.path.join(ROOT, "jobs", "study.yaml"))
    cells = study.check_study(cfg, "jobs/study.yaml")
    assert len(cells) == 201  # the count its header states
    assert sum(c.lv for c in cells) == 21 and {c.checkpoint for c in cells if c.lv} == {"clip_rn50"}
    monkeypatch.chdir(ROOT)
    assert build_job_spec("jobs/study.yaml").entrypoint == "python -m paf_ray study jobs/study.yaml"


# --------------------------------------------------------------------------- the numbers


def _row(cell, paradigm, seed, det=None, sem=None, drv=None, task="", adapter="none"):
    return {"cell": cell, "checkpoint": "ck", "paradigm": paradigm, "task": task, "adapter": adapter,
            "lv_adapter": False, "seed": seed, "status": "done", "det/AP": det, "det/AP50": det,
            "sem/mIoU": sem, "drv/mIoU": drv}


def test_delta_mtl_and_the_sentence_are_computed_from_the_cells(tmp_path):
    # Maninis et al.: the mean relative change over the tasks, in %
    assert study.delta_mtl({"det/AP": 11.0, "sem/mIoU": 45.0, "drv/mIoU": 80.0},
                           {"det": 10.0, "sem": 50.0, "drv": 80.0}, ["det", "sem", "drv"]) == pytest.approx(0.0)
    assert study.delta_mtl({"det/AP": 12.0, "sem/mIoU": 50.0, "drv/mIoU": 80.0},
                           {"det": 10.0, "sem": 50.0, "drv": 80.0}, ["det", "sem", "drv"]) == pytest.approx(20 / 3)
    assert study.delta_mtl({"det/AP": 1.0}, {"det": 0.0}, ["det"]) is None

    cfg = study_cfg(seeds=[0, 1])
    cells = [c for c in study.plan_cells(cfg) if c.checkpoint == "sup"]
    runs = tmp_path / "cells"
    values = {  # (det AP, sem mIoU, drv mIoU) per cell
        "sup-single_det-s0": (10, None, None), "sup-single_sem-s0": (None, 50, None), "sup-single_drv-s0": (None, None, 80),
        "sup-single_det-s1": (10, None, None), "sup-single_sem-s1": (None, 40, None), "sup-single_drv-s1": (None, None, 80),
        "sup-pretrain_finetune-s0": (8, 50, 80), "sup-pretrain_finetune-s1": (9, 40, 82),
        "sup-adapt_finetune-bypass-s0": (9, 51, 79), "sup-adapt_finetune-bypass-s1": (10, 39, 83),
    }
    for cell_id, (det, sem, drv) in values.items():
        metrics = {k: float(v) for k, v in (("det/AP", det), ("det/AP50", det), ("sem/mIoU", sem), ("drv/mIoU", drv))
                   if v is not None}
        (runs / cell_id).mkdir(parents=True)
        (runs / cell_id / "summary.json").write_text(json.dumps({"metrics": metrics, "wall_s": 1.0}))
    rows = study.cell_rows(cfg, cells, str(runs))
    by = {r["cell"]: r for r in rows}
    assert by["sup-pretrain_finetune-s0"]["delta_mtl"] == pytest.approx(100 * (-0.2 + 0 + 0) / 3)
    assert by["sup-adapt_finetune-bypass-s1"]["delta_mtl"] == pytest.approx(100 * (0 - 1 / 40 + 3 / 80) / 3)
    assert by["sup-single_det-s0"]["sem/mIoU"] is None and by["sup-single_det-s0"]["delta_mtl"] is None

    table = {(e["paradigm"], e["adapter"]): e for e in study.table_rows(rows, study.table_keys(["det", "sem", "drv"]))}
    mean, std, n = table[("single_task", "none")]["sem/mIoU"]
    assert (mean, n) == (45.0, 2) and std == pytest.approx(7.0711, abs=1e-4)
    assert table[("single_task", "none")]["delta_mtl"] == (0.0, 0.0, 2)

    [sentence] = study.sentences(rows, ["det", "sem", "drv"])
    assert sentence.startswith("sup (bypass adapters): adapt→finetune beat pretrain→finetune on ")
    assert "det AP in 2/2 seeds (mean +1.00)" in sentence
    assert "sem mIoU in 1/2 seeds (mean +0.00)" in sentence
    assert "drv mIoU in 1/2 seeds (mean +0.00)" in sentence
    assert "Δ_MTL in 2/2 seeds" in sentence


# --------------------------------------------------------------------------- the quick study


def test_quick_study_writes_table_csv_json_and_plot_with_every_value(ray_local, tmp_path, capsys):
    from paf_ray.cli import main

    out = str(tmp_path / "study")
    assert main(["study", DEMO, "--out", out, "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "[study] 4/4 cells done" in printed and "ETA" in printed

    with open(os.path.join(out, "study.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["cell"] for r in rows) == ["simclr-adapt_finetune-bypass-s0", "simclr-pretrain_finetune-s0",
                                               "simclr-single_drv-s0", "simclr-single_sem-s0"]
    for r in rows:  # every metric of the cell's tasks, and Δ_MTL for the multi-task cells
        assert r["status"] == "done"
        tasks = [r["task"]] if r["task"] else ["sem", "drv"]
        keys = study.table_keys(tasks) + ([] if r["task"] else ["delta_mtl"])
        assert all(r[k] != "" and float(r[k]) == float(r[k]) for k in keys), r
        assert "det/AP" not in r  # the columns are the study's tasks'

    doc = json.load(open(os.path.join(out, "study.json")))
    assert doc["complete"] and doc["budget"]["total_steps"] == 4
    assert doc["budget"]["stages"]["adapt_finetune"] == [["adapt", 2], ["finetune", 2]]
    assert [e["paradigm"] for e in doc["table"]] == ["single_task", "pretrain_finetune", "adapt_finetune"]
    assert all(e[k] is not None for e in doc["table"] for k in ("sem/mIoU", "drv/mIoU", "delta_mtl"))
    [sentence] = doc["sentences"]
    assert sentence.startswith("simclr (bypass adapters): adapt→finetune beat pretrain→finetune on sem mIoU in ")

    table = open(os.path.join(out, "study.md")).read()
    assert "| checkpoint | paradigm | seeds | sem mIoU | drv mIoU | Δ_MTL (%) |" in table
    body = [line for line in table.splitlines() if line.startswith("| simclr")]
    assert len(body) == 3 and not any(" - |" in line or "||" in line for line in body), body
    assert sentence in table
    with open(os.path.join(out, "study.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # the same folder again is refused; --resume reruns no cell and gives the same numbers
    cfg = study.load_study(DEMO, quick=True)
    with pytest.raises(ConfigError, match="--resume"):
        study.run_study(cfg, out=out, source=DEMO)
    again = study.run_study(cfg, out=out, resume=True, source=DEMO)
    assert again["rows"] == json.loads(json.dumps(doc["cells"]))
