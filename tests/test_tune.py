"""paf-ray tune: the search-space syntax, trial configs, the results table, and the smoke sweep."""

from __future__ import annotations

import csv
import glob
import os

import optuna
import pytest

from paf_ray.config import ConfigError, from_dict, load_config
from paf_ray.tune import search, space

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(ROOT, "jobs", "tune_smoke.yaml")


def sweep_cfg(search_space: dict, **tune):
    return from_dict({"model": {"backbone": {"random_init": True}}, "tune": {"search_space": search_space, **tune}},
                     "sweep.yaml")


# --------------------------------------------------------------------------- the space


def test_every_spec_kind_becomes_its_optuna_distribution():
    cfg = sweep_cfg(
        {
            "model.adapter.kind": {"choice": ["bypass", "lora"]},
            "model.adapter.stages": {"choice": [[1, 2, 3, 4], [3, 4]]},
            "train.stages.0.lr": {"loguniform": [1e-4, 1e-2]},
            "model.lv_adapter.tau": {"uniform": [0.03, 0.2]},
            "model.lv_adapter.n_ctx": {"int": [4, 16], "step": 4},
            "model": {"lv_adapter": {"ctx_init": {"choice": ["a photo of a", ""]}}},  # nested form
            "model.fpn_channels": 64,  # fixed
        },
        backbones=[{"name": "resnet50", "weights": "/ckpt/moco.pth.tar", "format": "moco"},
                   {"name": "clip_rn50", "weights": "/ckpt/RN50.safetensors", "format": "clip"}],
    )
    dims = space.parse_space(cfg.tune, "sweep.yaml")
    dists = space.optuna_distributions(dims)
    assert dists["model.adapter.kind"] == optuna.distributions.CategoricalDistribution(["bypass", "lora"])
    assert dists["model.adapter.stages"].choices == ("[1, 2, 3, 4]", "[3, 4]")
    assert dists["train.stages.0.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["model.lv_adapter.tau"] == optuna.distributions.FloatDistribution(0.03, 0.2)
    assert dists["model.lv_adapter.n_ctx"] == optuna.distributions.IntDistribution(4, 16, step=4)
    assert dists["model.lv_adapter.ctx_init"].choices == ("a photo of a", "")
    assert dists["backbone"].choices == ("resnet50:moco.pth.tar:moco", "clip_rn50:RN50.safetensors:clip")
    assert "model.fpn_channels" not in dists


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"model.adapter.kind": {"choice": []}}, "model.adapter.kind: choice: expected a non-empty list"),
        ({"train.stages.0.lr": {"loguniform": [0, 1e-2]}}, "train.stages.0.lr: loguniform: low must be > 0"),
        ({"model.lv_adapter.n_ctx": {"int": [4, 2.5]}}, "model.lv_adapter.n_ctx: int: high must be an integer"),
        ({"model.lv_adapter.tau": {"uniform": [0.2, 0.1]}}, "low must be below high"),
        ({"model.lv_adapter.tau": {"uniform": [0.1, 0.2], "log": True}}, "exactly one of"),
        ({"model.adapter.kindd": {"choice": ["bypass", "lora"]}}, "unknown key 'model.adapter.kindd'"),
        ({"model.adapter.kind": {"choice": ["bypass", "loraa"]}}, "model.adapter.kind"),
        ({"adapt_fraction": {"uniform": [0.2, 0.5]}}, "adapt_fraction needs tune.total_epochs"),
        ({"model.fpn_channels": 64}, "searches nothing"),
    ],
)
def test_bad_search_space_names_the_file_and_key(spec, message):
    cfg = sweep_cfg(spec)
    with pytest.raises(ConfigError, match="sweep.yaml") as err:
        search.check_sweep_config(cfg, "sweep.yaml")
    assert message in str(err.value)


def test_trial_config_applies_sampled_values_and_splits_the_epoch_budget():
    cfg = sweep_cfg(
        {
            "adapt_fraction": {"choice": [0.0, 0.25, 0.5]},
            "model.adapter.kind": {"choice": ["bypass", "lora"]},
            "model.adapter.stages": {"choice": [[1, 2, 3, 4], [3, 4]]},
            "train.stages.1.lr": {"loguniform": [1e-5, 1e-3]},
        },
        total_epochs=8,
        backbones=[{"label": "moco", "name": "resnet50", "weights": "/ckpt/moco.pth.tar", "format": "moco"},
                   {"label": "rand18", "name": "resnet18"}],
    )
    dims = space.parse_space(cfg.tune, "sweep.yaml")
    params = {"adapt_fraction": 0.25, "model.adapter.kind": "lora", "model.adapter.stages": "[3, 4]",
              "train.stages.1.lr": 3e-4, "backbone": "moco"}
    trial = space.trial_config(cfg, dims, params, name="abc_00001")
    assert trial.name == "abc_00001" and trial.command == "run"
    assert [(s.kind, s.epochs) for s in trial.train.stages] == [("adapt", 2), ("finetune", 6)]
    assert trial.train.stages[1].lr == 3e-4
    assert trial.model.adapter.kind == "lora" and trial.model.adapter.stages == [3, 4]
    b = trial.model.backbone
    assert (b.name, b.weights, b.format) == ("resnet50", "/ckpt/moco.pth.tar", "moco")
    assert trial.tune.search_space == {}  # a plain run config

    # an entry without weights must not inherit the other entry's file
    rand = space.trial_config(cfg, dims, {**params, "backbone": "rand18"}, name="t2").model.backbone
    assert (rand.name, rand.weights, rand.format) == ("resnet18", None, "auto")

    # adapt_fraction 0 = pretrain-finetune on the same budget: no adapt stage, no adapters
    pf = space.trial_config(cfg, dims, {**params, "adapt_fraction": 0.0}, name="t3")
    assert [(s.kind, s.epochs) for s in pf.train.stages] == [("finetune", 8)]
    assert pf.model.adapter.kind == "none" and pf.train.stages[0].lr == 3e-4


def test_epoch_split_keeps_one_epoch_per_stage():
    assert space.split_epochs(10, 0.0, "x") == (0, 10)
    assert space.split_epochs(10, 0.01, "x") == (1, 9)
    assert space.split_epochs(10, 0.99, "x") == (9, 1)
    assert space.split_epochs(2, 0.5, "x") == (1, 1)
    with pytest.raises(ConfigError, match="at least 1 epoch each"):
        space.split_epochs(1, 0.5, "x")


# --------------------------------------------------------------------------- results


def test_asha_first_rung_comes_after_the_longest_adapt_phase():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    def first_milestone(scheduler) -> int:
        return min(milestone for milestone, _ in scheduler._brackets[0]._rungs)

    # the split is searched: trials leave adapt after 0, 2 or 4 of 10 epochs -> no rung before epoch 5
    cfg = sweep_cfg({"adapt_fraction": {"choice": [0.0, 0.2, 0.4]}}, total_epochs=10)
    dims = search.check_sweep_config(cfg, "sweep.yaml")
    assert search.adapt_epoch_range(cfg, dims) == (0, 4)
    scheduler = search.make_scheduler(cfg, dims)
    assert isinstance(scheduler, ASHAScheduler) and first_milestone(scheduler) == 5
    # a uniform split: its upper bound is the longest adapt phase (0.4 x 10 = 4 epochs)
    cfg = sweep_cfg({"adapt_fraction": {"uniform": [0.1, 0.4]}}, total_epochs=10)
    assert first_milestone(search.make_scheduler(cfg, search.check_sweep_config(cfg, "sweep.yaml"))) == 5
    # a fixed split: every trial is in the same phase at every epoch, so the configured grace period holds
    cfg = sweep_cfg({"adapt_fraction": 0.3, "train.stages.1.lr": {"loguniform": [1e-5, 1e-3]}}, total_epochs=10)
    assert first_milestone(search.make_scheduler(cfg, search.check_sweep_config(cfg, "sweep.yaml"))) == 1
    # no rung fits after the longest adapt phase (the smoke sweep's 2-epoch budget): every trial runs out
    cfg = load_config(SMOKE)
    assert isinstance(search.make_scheduler(cfg, search.check_sweep_config(cfg, SMOKE)), FIFOScheduler)


def test_results_table_is_sorted_and_best_yaml_is_a_run_config(tmp_path):
    cfg = load_config(SMOKE)
    dims = space.parse_space(cfg.tune, SMOKE)
    base_row = {"adapt_fraction": 0.5, "model.adapter.kind": "bypass", "model.adapter.bypass.reduction": 4,
                "model.adapter.lora.rank": 2, "train.stages.0.lr": 1e-3, "train.stages.1.lr": 1e-4, "backbone": "tiny-w8"}
    rows = [
        {"trial": "t1", "status": "stopped", **base_row, "score": 30.0, "epochs": 1, "error": ""},
        {"trial": "t2", "status": "completed", **base_row, "adapt_fraction": 0.0, "backbone": "tiny-w12",
         "score": 20.0, "epochs": 2, "error": ""},
        {"trial": "t3", "status": "error", **base_row, "score": None, "epochs": 0, "error": "boom"},
        {"trial": "t4", "status": "completed", **base_row, "score": 10.0, "epochs": 2, "error": ""},
    ]
    rows = search.sort_rows(rows, "score", "max")
    assert [r["trial"] for r in rows] == ["t1", "t2", "t4", "t3"]
    best = search.write_results(cfg, dims, rows, str(tmp_path))
    assert best["trial"] == "t2"  # the best *completed* trial, not the early-stopped leader

    with open(tmp_path / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["t1", "t2", "t4", "t3"]
    assert table[3]["score"] == "" and table[3]["error"] == "boom"
    md = (tmp_path / "trials.md").read_text()
    assert md.index("| t1 |") < md.index("| t2 |") < md.index("| t3 |")

    text = (tmp_path / "best.yaml").read_text()
    assert text.startswith("#!/usr/bin/env -S python -m paf_ray run\n")
    best_cfg = load_config(tmp_path / "best.yaml")
    assert best_cfg.command == "run" and best_cfg.name == "tune_smoke-best"
    assert [s.kind for s in best_cfg.train.stages] == ["finetune"]  # t2 sampled adapt_fraction 0
    assert best_cfg.train.stages[0].epochs == 2
    assert best_cfg.model.backbone.options["tiny"].width == 12


# --------------------------------------------------------------------------- the smoke sweep


def test_smoke_sweep_writes_table_best_config_tensorboard_and_study(ray_local, tmp_path, capsys):
    from paf_ray.cli import main
    from paf_ray.train.run import run_pipeline

    cfg = load_config(SMOKE)
    out = str(tmp_path / "sweep")
    assert main(["tune", SMOKE, "--out", out]) == 0
    assert "best config:" in capsys.readouterr().out

    with open(os.path.join(out, "trials.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for r in rows:  # the split is searched in 2 epochs: no ASHA rung fits after adapt, so every trial runs out
        assert r["status"] == "completed" and int(r["epochs"]) == 2, r
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert os.path.exists(os.path.join(out, "trials.md"))
    # Tune's logger writes TensorBoard events for every trial under the sweep folder
    assert len(glob.glob(os.path.join(out, cfg.name, "trial_*", "events.out.tfevents.*"))) == 3
    # the Optuna study persisted in the default SQLite storage, one finished trial per Tune trial
    study = optuna.load_study(study_name=cfg.name, storage="sqlite:///" + os.path.join(out, "optuna.db"))
    assert len(study.trials) == 3 and all(t.value is not None for t in study.trials)

    # a second sweep into the same folder is refused; --resume restores the finished one and reruns nothing
    with pytest.raises(ConfigError, match="--resume"):
        search.run_sweep(cfg, out=out, source=SMOKE)
    again = search.run_sweep(cfg, out=out, resume=True, source=SMOKE)
    assert sorted(r["trial"] for r in again["rows"]) == sorted(r["trial"] for r in rows)

    # best.yaml is the best completed trial, and a plain run config that runs as is
    best_row = next(r for r in rows if r["status"] == "completed")
    text = open(os.path.join(out, "best.yaml")).read()
    assert f"trial {best_row['trial']} (completed)" in text
    best_cfg = load_config(os.path.join(out, "best.yaml"))
    assert best_cfg.model.backbone.options["tiny"].width == {"tiny-w8": 8, "tiny-w12": 12}[best_row["backbone"]]
    result = run_pipeline(best_cfg, out=str(tmp_path / "best_run"))
    assert len(result["stages"]) == len(best_cfg.train.stages)
    assert isinstance(result["metrics"]["score"], float)
