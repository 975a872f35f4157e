"""paf-ray study: the grid and its budget rule, validation, Δ_MTL and the sentences, the quick study."""

from __future__ import annotations

import csv
import json
import math
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
    cfg = study_cfg(paradigms=["single_task", "pretrain_finetune", "adapt_finetune", "finetune_adapters", "adapt_only"],
                    adapter_kinds=["bypass", "inline", "lora"], lv_adapter=[False, True], lv_context=["per_task", "shared"],
                    seeds=[0, 1], exposure="equal_steps")
    cells = study.check_study(cfg, "study.yaml")
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    # per checkpoint and seed: 3 single-task + pretrain_finetune (LV off, on x 2 contexts) + 3 adapter paradigms
    # x 3 kinds x (LV off, on x 2 contexts)
    assert len(cells) == 2 * 2 * (3 + 3 + 3 * 3 * 3)
    assert {c.lv_context for c in cells if c.lv} == {"per_task", "shared"} and not any(c.lv_context for c in cells if not c.lv)
    weights = study.checkpoint_weights(cfg, "/out")
    assert weights["ssl"] == study.Weights("/out/checkpoints/ssl.pth", "moco", "resnet50")
    for cell in cells:
        run = study.cell_config(cfg, cell, weights[cell.checkpoint])
        steps = [(s.kind, s.epochs * s.max_steps_per_epoch) for s in run.train.stages]
        assert sum(n for _, n in steps) == 120, (cell.id, steps)
        assert run.train.seed == cell.seed and run.model.lv_adapter.enabled == cell.lv
        if cell.lv:
            assert run.model.lv_adapter.context == cell.lv_context
        assert run.model.backbone.weights == weights[cell.checkpoint].path
        if cell.paradigm == "adapt_finetune":
            assert steps == [("adapt", 40), ("finetune", 80)]  # 0.25 x 6 epochs, rounded to 2 whole epochs
            assert run.model.adapter.kind == cell.adapter and run.train.stages[0].lr == 0.01
        elif cell.paradigm == "finetune_adapters":  # the capacity control: adapt_finetune's adapters, no frozen phase
            assert steps == [("finetune", 120)] and run.model.adapter.kind == cell.adapter != "none"
            assert run.train.stages[0].lr == 0.001
        elif cell.paradigm == "adapt_only":
            assert steps == [("adapt", 120)]
        else:
            assert steps == [("finetune", 120)] and run.model.adapter.kind == "none"
            assert run.train.stages[0].lr == 0.001
        if cell.paradigm == "single_task":
            assert run.model.tasks == [cell.task] and not cell.lv
    assert {study.capacity(cfg, {"paradigm": c.paradigm, "adapter": c.adapter}) for c in cells if c.adapter == "lora"} == {
        "lora adapters, backbone frozen for the first 40 steps", "lora adapters, all train from step 0",
        "lora adapters, backbone frozen throughout"}


def test_equal_labels_gives_a_single_task_model_the_labels_a_multi_task_model_sees():
    cfg = study_cfg(paradigms=["single_task", "pretrain_finetune"], seeds=[0])
    assert cfg.study.exposure == "equal_labels"  # the default
    records = ([{"labels": {"det": 1, "drv": 1}}] * 5 + [{"labels": {"sem": 1}}] * 3
               + [{"labels": {"det": 1, "sem": 1, "drv": 1}}] * 2)
    shares = study.label_shares(records, ["det", "sem", "drv"])
    assert shares == {"det": 0.7, "sem": 0.5, "drv": 0.7}
    cells = {c.id: c for c in study.plan_cells(cfg) if c.checkpoint == "sup"}
    weights = study.checkpoint_weights(cfg, "/out")
    sem = study.cell_config(cfg, cells["sup-single_sem-s0"], weights["sup"], shares=shares)
    assert [(s.epochs, s.max_steps_per_epoch) for s in sem.train.stages] == [(6, 10)]  # 6 epochs of 0.5 x 20 steps
    assert study.cell_steps(cfg, cells["sup-single_det-s0"], shares) == 6 * 14
    multi = cells["sup-pretrain_finetune-s0"]
    assert study.cell_steps(cfg, multi, shares) == 120
    batch = cfg.data.batch_size
    assert study.labelled_samples(cfg, multi, shares) == {"det": 120 * batch * 0.7, "sem": 60.0 * batch,
                                                          "drv": 120 * batch * 0.7}
    assert study.labelled_samples(cfg, cells["sup-single_sem-s0"], shares) == {"sem": 60.0 * batch}
    equal_steps = study_cfg(paradigms=["single_task", "pretrain_finetune"], seeds=[0], exposure="equal_steps")
    assert study.cell_steps(equal_steps, cells["sup-single_sem-s0"], shares) == 120


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
        ({"lv_context": ["mixed"]}, "study.lv_context[0]"),
        ({"lv_context": []}, "study.lv_context: needs at least one value"),
        ({"exposure": "equal_epochs"}, "study.exposure"),
        ({"checkpoints": {"x": {"pretrain": {"method": "simclr", "data_seed": 0}}}},
         "study.checkpoints.x.pretrain.data_seed: 0 is data.synth.seed"),
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
    assert len(cells) == 294  # the count its header states
    assert sum(c.lv for c in cells) == 60 and {c.checkpoint for c in cells if c.lv} == {"clip_rn50"}
    assert cfg.model.norm == "frozen" and cfg.study.exposure == "equal_labels"
    assert {c.paradigm for c in cells} >= {"finetune_adapters"} and {c.lv_context for c in cells if c.lv} == {
        "per_task", "shared"}
    monkeypatch.chdir(ROOT)
    assert build_job_spec("jobs/study.yaml").entrypoint == "python -m paf_ray study jobs/study.yaml"


def test_the_cpu_experiment_file_plans_four_arms_on_five_seeds_without_the_downstream_frames():
    cfg = study.load_study(os.path.join(ROOT, "jobs", "study_cpu.yaml"))
    cells = study.check_study(cfg, "jobs/study_cpu.yaml")
    assert len(cells) == 25 and cfg.model.tasks == ["sem", "drv"] and cfg.study.exposure == "equal_labels"
    assert {c.paradigm for c in cells} == {"single_task", "pretrain_finetune", "adapt_finetune", "finetune_adapters"}
    assert sorted({c.seed for c in cells}) == [0, 1, 2, 3, 4]
    for path in ("study_cpu.yaml", "study_demo.yaml"):  # every checkpoint made here trains on another synthetic set
        cfg = study.load_study(os.path.join(ROOT, "jobs", path))
        seeds = {ck.pretrain.data_seed for ck in cfg.study.checkpoints.values()}
        assert None not in seeds and cfg.data.synth.seed not in seeds, path
    with pytest.raises(ConfigError, match=r"study.checkpoints.simclr.pretrain.data_seed: a differently seeded set"):
        study.load_study(os.path.join(ROOT, "jobs", "study_cpu.yaml"), ["data.root=/data/bdd100k"])


# --------------------------------------------------------------------------- the numbers


def test_delta_mtl_formula():
    # Maninis et al.: the mean relative change over the tasks, in %
    assert study.delta_mtl({"det/AP": 11.0, "sem/mIoU": 45.0, "drv/mIoU": 80.0},
                           {"det": 10.0, "sem": 50.0, "drv": 80.0}, ["det", "sem", "drv"]) == pytest.approx(0.0)
    assert study.delta_mtl({"det/AP": 12.0, "sem/mIoU": 50.0, "drv/mIoU": 80.0},
                           {"det": 10.0, "sem": 50.0, "drv": 80.0}, ["det", "sem", "drv"]) == pytest.approx(20 / 3)
    assert study.delta_mtl({"det/AP": 1.0}, {"det": 0.0}, ["det"]) is None


def test_intervals_and_verdicts():
    assert study.t_975(4) == 2.776 and study.t_975(2.94) == 4.303 and study.t_975(35) == 2.042
    assert study.t_975(500) == 1.980 and study.t_975(0.5) == math.inf
    iv = study.paired_interval([-3.0, -3.5, -2.5])  # mean -3, sd 0.5: -3 ± 4.303 x 0.5 / sqrt(3)
    assert iv["mean"] == pytest.approx(-3.0) and iv["hi"] == pytest.approx(-3 + 4.303 * 0.5 / math.sqrt(3))
    assert study.verdict(iv) == "worse" and study.verdict(iv, higher_is_better=False) == "better"
    assert study.verdict(study.paired_interval([2.0, 2.5, 3.0])) == "better"  # 2.5 ± 1.24
    assert study.verdict(study.paired_interval([-1.0, 2.0, 5.0])) == "not resolved at n=3 seeds"
    assert study.verdict(study.paired_interval([4.0])) == "not resolved at n=1 seed"
    w = study.welch_interval([45.0, 50.0, 55.0], [40.0, 50.0, 60.0])  # var 25 and 100: df 2.94 -> t(2)
    assert w["mean"] == 0 and w["hi"] == pytest.approx(4.303 * math.sqrt(25 / 3 + 100 / 3))


TWO_TASKS = {  # checkpoint sup, seeds 0..2: (sem mIoU, drv mIoU) per cell, the hand-computed example below
    "single_sem": [(40, None), (50, None), (60, None)],
    "single_drv": [(None, 80), (None, 80), (None, 80)],
    "pretrain_finetune": [(45, 80), (50, 84), (55, 76)],
    "adapt_finetune-bypass": [(47, 82), (53, 84), (56, 80)],
    "finetune_adapters-bypass": [(45, 80), (50, 84), (55, 76)],
}


def test_the_table_and_sentences_follow_from_a_hand_computed_study(tmp_path):
    data = {"command": "study", "model": {"tasks": ["sem", "drv"]},
            "train": {"stages": [{"kind": "adapt", "lr": 0.01}, {"kind": "finetune", "lr": 0.001}]},
            "study": {"checkpoints": {"sup": {"weights": "/sup.pth", "format": "torchvision"}},
                      "paradigms": ["single_task", "pretrain_finetune", "adapt_finetune", "finetune_adapters"],
                      "seeds": [0, 1, 2], "total_steps": 120, "steps_per_epoch": 20}}
    cfg = from_dict(data, "study.yaml")
    runs = tmp_path / "cells"
    for name, values in TWO_TASKS.items():
        for seed, (sem, drv) in enumerate(values):
            metrics = {k: float(v) for k, v in (("sem/mIoU", sem), ("drv/mIoU", drv)) if v is not None}
            (runs / f"sup-{name}-s{seed}").mkdir(parents=True)
            (runs / f"sup-{name}-s{seed}" / "summary.json").write_text(json.dumps({"metrics": metrics, "wall_s": 1.0}))
    shares = {"sem": 0.5, "drv": 0.7}
    (tmp_path / "plan.json").write_text(json.dumps({"exposure": "equal_labels", "label_shares": shares}))
    result = study.report_folder(cfg, str(tmp_path))

    with open(tmp_path / "study.csv", newline="") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    # Δ_MTL against the seeds' mean single-task model (sem 50, drv 80), e.g. seed 0: ((45-50)/50 + 0) / 2
    expected = {"pretrain_finetune": [-5.0, 2.5, 2.5], "adapt_finetune-bypass": [-1.75, 5.5, 6.0]}
    for name, values in expected.items():
        for seed, value in enumerate(values):
            assert float(rows[f"sup-{name}-s{seed}"]["delta_mtl"]) == pytest.approx(value)
    # the same-seed pairing stays as a column: seed 0's sem baseline is 40
    assert float(rows["sup-pretrain_finetune-s0"]["delta_mtl_seed"]) == pytest.approx(100 * (5 / 40) / 2)
    # exposure: 6 epochs of round(0.5 x 20) and round(0.7 x 20) steps; labelled samples equal the multi-task cells'
    assert rows["sup-single_sem-s0"]["steps"] == "60" and rows["sup-single_drv-s0"]["steps"] == "84"
    assert rows["sup-pretrain_finetune-s0"]["steps"] == "120"
    assert float(rows["sup-single_sem-s0"]["labels_sem"]) == float(rows["sup-pretrain_finetune-s0"]["labels_sem"]) == 240
    assert float(rows["sup-single_drv-s0"]["labels_drv"]) == float(rows["sup-pretrain_finetune-s0"]["labels_drv"]) == 336
    assert {r["exposure"] for r in rows.values()} == {"equal_labels"}
    assert rows["sup-finetune_adapters-bypass-s0"]["capacity"] == "bypass adapters, all train from step 0"
    assert rows["sup-adapt_finetune-bypass-s0"]["capacity"] == "bypass adapters, backbone frozen for the first 40 steps"

    comps = {(c["a"], c["b"], c["key"]): c for c in result["comparisons"]}
    # adapt→finetune − pretrain→finetune per seed: sem 2, 3, 1; drv 2, 0, 4; Δ_MTL 3.25, 3.0, 3.5
    sem = comps[("adapt_finetune", "pretrain_finetune", "sem/mIoU")]
    assert (sem["n"], sem["mean"]) == (3, pytest.approx(2.0))
    assert sem["hi"] == pytest.approx(2 + 4.303 * 1 / math.sqrt(3)) and sem["verdict"] == "not resolved at n=3 seeds"
    d = comps[("adapt_finetune", "pretrain_finetune", "delta_mtl")]
    assert d["mean"] == pytest.approx(3.25) and d["lo"] == pytest.approx(3.25 - 4.303 * 0.25 / math.sqrt(3))
    assert d["verdict"] == "better"
    # the capacity control equals pretrain→finetune here: the frozen phase is what differs
    assert comps[("finetune_adapters", "pretrain_finetune", "delta_mtl")]["mean"] == pytest.approx(0.0)
    assert comps[("adapt_finetune", "finetune_adapters", "delta_mtl")]["verdict"] == "better"
    welch = comps[("pretrain_finetune", "single_task", "sem/mIoU")]
    assert welch["kind"] == "welch" and welch["mean"] == pytest.approx(0.0) and welch["verdict"].startswith("not resolved")

    said = result["sentences"]
    assert ("sup (bypass adapters): adapt→finetune against pretrain→finetune, paired by seed: sem mIoU: not resolved "
            "at n=3 seeds (+2.00, 95% CI [-0.48, +4.48], n=3); drv mIoU: not resolved at n=3 seeds") in said[0]
    assert said[0].endswith("Δ_MTL: better (+3.25 points, 95% CI [+2.63, +3.87], n=3).")
    md = (tmp_path / "study.md").read_text()
    assert "Exposure control: equal_labels" in md and "sem 0.50, drv 0.70" in md
    assert ("| sup | single-task | no adapters | 3 | sem 60, drv 84 | sem 240, drv 336 | 50.00 ± 10.00 | 80.00 ± 0.00 "
            "| 0 (reference) |") in md
    assert "| sup | finetune+adapters (bypass) | bypass adapters, all train from step 0 | 3 | 120 | sem 240, drv 336 |" in md
    assert "| sup | adapt→finetune − pretrain→finetune | bypass adapters | Δ_MTL | 3 | +3.25 | [+2.63, +3.87] | better |" in md
    assert all(s in md for s in said)


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
    assert doc["checkpoints_made"]["simclr"]["data_seed"] == 1  # not the downstream frames (data seed 0)
    assert doc["budget"]["exposure"] == "equal_labels" and set(doc["budget"]["label_shares"]) == {"sem", "drv"}
    paired, *welch = doc["sentences"]  # one seed: every verdict says so
    assert paired.startswith("simclr (bypass adapters): adapt→finetune against pretrain→finetune, paired by seed: "
                             "sem mIoU: not resolved at n=1 seed (")
    assert [s.split(" (")[0] for s in welch] == ["simclr: pretrain→finetune", "simclr: adapt→finetune"]

    table = open(os.path.join(out, "study.md")).read()
    assert ("| checkpoint | paradigm | capacity | seeds | steps | labelled samples | sem mIoU | drv mIoU | Δ_MTL (%) |"
            in table) and "Exposure control: equal_labels" in table
    lines = table.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| checkpoint | paradigm |"))) + 2
    body = lines[start:lines.index("", start)]  # the main table, up to the paired differences
    assert len(body) == 3 and not any(" - |" in line or "||" in line for line in body), body
    assert "| simclr | adapt→finetune − pretrain→finetune | bypass adapters | Δ_MTL | 1 |" in table
    assert all(s in table for s in doc["sentences"])
    with open(os.path.join(out, "study.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # the same folder again is refused; --resume reruns no cell and gives the same numbers
    cfg = study.load_study(DEMO, quick=True)
    with pytest.raises(ConfigError, match="--resume"):
        study.run_study(cfg, out=out, source=DEMO)
    again = study.run_study(cfg, out=out, resume=True, source=DEMO)
    assert again["rows"] == json.loads(json.dumps(doc["cells"]))
