"""Accuracy against cost: the cost/* metrics of every report, multi-objective sweeps and their
Pareto front, `tune.pick`, and MLflow tracking of trials and runs (read back with MLflow's client)."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import sys

import pytest

from paf_ray.config import ConfigError, from_dict, load_config
from paf_ray.config.pick import PickSyntaxError, parse_pick
from paf_ray.eval.keys import COST_GFLOPS, COST_KEYS, COST_PEAK_MEM_MB, COST_STEP_MS, COST_TRAINABLE_PARAMS
from paf_ray.tune import pareto, search, space

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PARETO = os.path.join(ROOT, "jobs", "tune_pareto_smoke.yaml")
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
NEEDS_MLFLOW = "mlflow is not installed: pip install 'paf_ray[mlflow]' (make test installs it)"


def multi_cfg(**tune):
    """The Pareto smoke sweep's config with `tune` keys replaced."""
    return load_config(PARETO, [f"tune.{k}={v}" for k, v in tune.items()])


# --------------------------------------------------------------------------- the front, from a hand-made table


def trial(tid, status, score, params, kind="bypass", fpn=16, **more):
    return {"trial": tid, "status": status, "model.adapter.kind": kind, "model.adapter.bypass.reduction": 8,
            "model.adapter.lora.rank": 4, "model.fpn_channels": fpn, "train.stages.0.lr": 1e-3,
            "score": score, "cost/trainable_params": params, "epochs": 2, "error": "", **more}


HAND_MADE = [
    trial("a", "completed", 30.0, 200_000, kind="lora", fpn=32),  # front: the best score
    trial("b", "completed", 25.0, 120_000),  # front
    trial("c", "completed", 24.0, 150_000),  # dominated by b (lower score, more parameters)
    trial("d", "completed", 10.0, 100_000, kind="none"),  # front: the fewest parameters
    trial("e", "stopped", 40.0, 90_000),  # would dominate all, but an early stop's metrics are an earlier epoch's
    trial("f", "error", None, None, error="boom"),
    trial("g", "completed", 25.0, 120_000),  # ties b on both: neither dominates, both on the front
]


def test_the_front_of_a_hand_made_table_is_the_non_dominated_completed_trials():
    front = pareto.pareto_front(HAND_MADE, ["score", "cost/trainable_params"], ["max", "min"])
    assert [r["trial"] for r in front] == ["a", "b", "g", "d"]
    # the same trials minimising both (a lower score is better): only the fewest-parameters trial is left
    assert [r["trial"] for r in pareto.pareto_front(HAND_MADE, ["score", "cost/trainable_params"], ["min", "min"])] == ["d"]
    # a third objective brings c back: it is the fastest
    rows = [dict(r, **{"cost/step_ms": {"c": 5.0}.get(r["trial"], 50.0)}) for r in HAND_MADE]
    three = pareto.pareto_front(rows, ["score", "cost/trainable_params", "cost/step_ms"], ["max", "min", "min"])
    assert sorted(r["trial"] for r in three) == ["a", "b", "c", "d", "g"]
    # no completed trial: the stopped ones take part
    only_stopped = [dict(r, status="stopped") for r in HAND_MADE if r["status"] == "completed"]
    assert len(pareto.pareto_front(only_stopped, ["score", "cost/trainable_params"], ["max", "min"])) == 4


def test_pick_rules_parse_and_choose():
    pick = parse_pick("highest score with cost/trainable_params <= 1.3e5")
    assert (pick.metric, pick.mode, pick.conditions) == ("score", "max", (("cost/trainable_params", "<=", 130000.0),))
    assert pick.text() == "highest score with cost/trainable_params <= 130000"
    two = parse_pick("lowest cost/trainable_params with score ≥ 20 and cost/step_ms < 100")
    assert two.conditions == (("score", ">=", 20.0), ("cost/step_ms", "<", 100.0))
    rows = search.sort_rows(list(HAND_MADE), "score", "max")
    assert search.best_row(rows)["trial"] == "a"  # no rule: the best completed trial by the first metric
    assert search.best_row(rows, pick)["trial"] == "b"
    assert search.best_row(rows, parse_pick("lowest cost/trainable_params with score >= 20"))["trial"] == "b"
    assert search.best_row(rows, parse_pick("highest score with cost/trainable_params < 1000")) is None
    for bad in ("best score", "highest score with cost/trainable_params <= many", "highest score with score"):
        with pytest.raises(PickSyntaxError):
            parse_pick(bad)


def test_front_files_and_every_best_k_yaml_is_a_run_config(tmp_path):
    cfg = multi_cfg()
    dims = space.parse_space(cfg.tune, PARETO)
    rows = search.sort_rows(list(HAND_MADE), "score", "max")
    best = search.write_results(cfg, dims, rows, str(tmp_path))
    assert best["trial"] == "b"  # the job file's pick: highest score with cost/trainable_params <= 150000
    assert "by tune.pick 'highest score with cost/trainable_params <= 150000'" in (tmp_path / "best.yaml").read_text()

    with open(tmp_path / "pareto.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["k"], r["config"], r["trial"]) for r in table] == [
        ("1", "best-1.yaml", "a"), ("2", "best-2.yaml", "b"), ("3", "best-3.yaml", "g"), ("4", "best-4.yaml", "d")]
    assert table[0]["cost/trainable_params"] == "200000" and table[0]["model.adapter.kind"] == "lora"
    md = (tmp_path / "pareto.md").read_text()
    assert "Pareto front of score (max) vs cost/trainable_params (min)" in md and "![Pareto front](pareto.png)" in md
    assert "4 of 5 trials" in md  # the completed trials with both values; e (stopped) and f (error) take no part
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k, tid in enumerate(["a", "b", "g", "d"], start=1):
        text = (tmp_path / f"best-{k}.yaml").read_text()
        assert text.startswith(search.RUN_SHEBANG) and f"trial {tid} (completed)" in text
        run_cfg = load_config(tmp_path / f"best-{k}.yaml")
        row = next(r for r in HAND_MADE if r["trial"] == tid)
        assert run_cfg.command == "run" and run_cfg.name == f"tune_pareto_smoke-best-{k}"
        assert (run_cfg.model.adapter.kind, run_cfg.model.fpn_channels) == (row["model.adapter.kind"], row["model.fpn_channels"])

    # a later write with a smaller front (a resumed sweep) leaves no stale best-<k>.yaml behind
    search.write_results(cfg, dims, [r for r in rows if r["trial"] in ("a", "d")], str(tmp_path))
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "best-*.yaml"))) == ["best-1.yaml", "best-2.yaml"]
    # one metric: no front, best.yaml as before
    single = load_config(PARETO, ["tune.metric=score", "tune.mode=max", "tune.pick=null"])
    out = tmp_path / "single"
    out.mkdir()
    assert search.write_results(single, dims, rows, str(out))["trial"] == "a"
    assert not (out / "pareto.csv").exists() and not list(out.glob("best-*.yaml"))


# --------------------------------------------------------------------------- config and search set-up


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tune.metric=[score, cost/trainable_params]", "tune.mode=max"],
         "tune.mode: one mode (max or min) per metric: tune.metric has 2"),
        (["tune.mode=[max, least]"], "tune.mode: expected 'max' | 'min' or a list of 'max' | 'min'"),
        (["tune.metric=[score, cost/params]"], "tune.metric[1]: 'cost/params' is not a key of the per-epoch report"),
        (["tune.metric=pose/AP", "tune.mode=max"], "tune.metric: 'pose/AP' is not a key"),
        (["tune.metric=[score, score]"], "tune.metric: a metric repeats"),
        (["tune.pick=best score"], "tune.pick: expected 'highest|lowest KEY"),
        (["tune.pick=highest score with cost/flops < 3"], "tune.pick: 'cost/flops' is not a key"),
        (["tune.startup_trials=1"], "tune.startup_trials: nsga2 takes it as its population size"),
    ],
)
def test_bad_objectives_fail_at_load_naming_the_file_and_key(overrides, message):
    with pytest.raises(ConfigError, match="tune_pareto_smoke.yaml") as err:
        load_config(PARETO, overrides)
    assert len(str(err.value).splitlines()) == 1
    assert message in str(err.value), str(err.value)


def test_a_single_metric_stays_a_string_and_task_metrics_are_known_keys():
    cfg = load_config(PARETO, ["tune.metric=det/AP", "tune.mode=max"])
    assert (cfg.tune.metric, cfg.tune.metrics, cfg.tune.modes) == ("det/AP", ["det/AP"], ["max"])
    assert multi_cfg().tune.metrics == ["score", "cost/trainable_params"]


def test_multi_objective_optuna_study_is_seeded_with_one_direction_per_metric(tmp_path):
    import optuna

    cfg = multi_cfg()
    dims = search.check_sweep_config(cfg, PARETO)
    searcher = search.make_searcher(cfg, dims, "sqlite:///" + str(tmp_path / "o.db"))
    assert searcher.metric == ["score", "cost/trainable_params"] and searcher.mode == ["max", "min"]
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    assert searcher._ot_study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    tpe = search.make_searcher(multi_cfg(sampler="tpe", study_name="tpe"), dims, "sqlite:///" + str(tmp_path / "o.db"))
    assert isinstance(tpe._sampler, optuna.samplers.TPESampler) and len(tpe._ot_study.directions) == 2
    # the seed decides the samples: two searchers with the same seed propose the same first trial
    again = search.make_searcher(multi_cfg(study_name="again"), dims, "sqlite:///" + str(tmp_path / "o.db"))
    assert searcher.suggest("t1") == again.suggest("t1")


def test_asha_ranks_on_the_first_metric_or_the_sweep_runs_fifo_and_says_which(capsys):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = multi_cfg(**{"scheduler.kind": "asha"})
    dims = search.check_sweep_config(cfg, PARETO)
    scheduler = search.make_scheduler(cfg, dims)
    assert isinstance(scheduler, ASHAScheduler)
    log = capsys.readouterr().out
    assert "ASHA ranks on one metric" in log and "stop trials on score alone" in log and "scheduler.kind: fifo" in log
    assert isinstance(search.make_scheduler(multi_cfg(), dims), FIFOScheduler)  # the job file: fifo
    assert "scheduler fifo, every trial runs out" in capsys.readouterr().out
    single = load_config(PARETO, ["tune.metric=score", "tune.mode=max"])
    search.make_scheduler(single, dims)
    assert "objectives" not in capsys.readouterr().out  # a single-metric sweep logs as before


def test_tracking_without_mlflow_is_refused_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ConfigError) as err:
        load_config(PARETO, ["tracking.mlflow=true"])
    assert str(err.value) == (f"{PARETO} (with --set overrides): tracking.mlflow: true, but the mlflow package is not "
                              "installed: pip install 'paf_ray[mlflow]'")
    assert load_config(PARETO).tracking.mlflow is False  # off by default: no mlflow needed


def test_tracking_store_is_a_folder_in_the_run_storage_unless_a_uri_says_otherwise(tmp_path):
    from paf_ray.config import TrackingConfig
    from paf_ray.train.tracking import store_for

    assert store_for(TrackingConfig(), str(tmp_path), "x") is None
    store = store_for(TrackingConfig(mlflow=True), str(tmp_path), "x")
    assert store.uri == "sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db")
    assert store.artifact_root == str(tmp_path / "mlruns" / "artifacts") and store.experiment == "x"
    elsewhere = store_for(TrackingConfig(mlflow=True, uri=str(tmp_path / "team"), experiment="e"), "s3://b/runs", "x")
    assert elsewhere.uri == "sqlite:///" + str(tmp_path / "team" / "mlflow.db") and elsewhere.experiment == "e"
    server = store_for(TrackingConfig(mlflow=True, uri="http://127.0.0.1:5000"), "s3://b/runs", "x")
    assert (server.uri, server.artifact_root) == ("http://127.0.0.1:5000", None)
    with pytest.raises(ConfigError, match="tracking.uri: the run storage s3://b/runs is object storage"):
        store_for(TrackingConfig(mlflow=True), "s3://b/runs", "x")


# --------------------------------------------------------------------------- cost metrics in every report


def test_every_report_carries_the_stage_costs(ray_local, synth_root, tmp_path):
    """Local mode with a checkpoint every step: mid-epoch and end-of-epoch reports alike."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from paf_ray.models.inspect import forward_gflops
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import apply_stage
    from paf_ray.train.run import make_datasets, prepare_data, run_stage

    raw = {
        "name": "c", "data": {"root": synth_root, "input_size": [256, 160], "batch_size": 2, "cpus": 0.5},
        "model": {"backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
                  "adapter": {"kind": "bypass"}, "fpn_channels": 16,
                  "heads": {"sem": {"channels": 16}, "drv": {"channels": 16},
                            "det": {"rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32,
                                    "representation_size": 64}}},
        "train": {"stages": [{"kind": "adapt", "epochs": 2, "lr": 1e-3, "max_steps_per_epoch": 2}],
                  "checkpoint_every_steps": 1, "log_every": 0},
        "ray": {"num_workers": 0},
    }
    cfg, train, val = prepare_data(from_dict(raw))
    result = run_stage(cfg, 0, str(tmp_path), make_datasets(cfg, train, val, 0), len(train), None, 0)
    assert result.error is None
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 6  # 2 epochs x (2 mid-epoch reports + the epoch's)
    torch.manual_seed(cfg.train.seed)  # the loop's seed for stage 0 on rank 0: the same initial weights
    model = build_model(cfg.model, input_size=cfg.data.input_size, load_weights=False)
    apply_stage(model, "adapt")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gflops, _ = forward_gflops(model, cfg.data.input_size)
    for row in rows:
        assert set(COST_KEYS) <= set(row), row.keys()
        assert row[COST_TRAINABLE_PARAMS] == trainable < sum(p.numel() for p in model.parameters())
        assert row[COST_GFLOPS] == pytest.approx(gflops, rel=0.05)
        assert 0 < row[COST_STEP_MS] < 60_000 and row[COST_PEAK_MEM_MB] > 100
    assert rows[-1]["global_step"] == 4
    events = EventAccumulator(glob.glob(str(tmp_path / "tb"))[0]).Reload()
    assert set(COST_KEYS) <= set(events.Tags()["scalars"])


# --------------------------------------------------------------------------- the multi-objective smoke sweep


@pytest.fixture(scope="module")
def pareto_sweep(ray_local, tmp_path_factory):
    """The Pareto smoke sweep at 3 one-epoch trials (tracked in MLflow where it is installed), resumed
    once, and its best-1.yaml run as it is written."""
    from paf_ray.cli import main
    from paf_ray.train.run import run_config

    base = tmp_path_factory.mktemp("pareto")
    out = str(base / "sweep")
    overrides = ["tune.num_samples=3", "train.stages.0.epochs=1", "tune.startup_trials=2", "tune.pick=null",
                 f"tracking.mlflow={'true' if HAVE_MLFLOW else 'false'}"]
    code = main(["tune", PARETO, "--out", out, *[a for o in overrides for a in ("--set", o)]])
    cfg = load_config(PARETO, overrides)
    resumed = search.run_sweep(cfg, out=out, resume=True, source=PARETO)
    best_cfg = load_config(os.path.join(out, "best-1.yaml"))
    best_run = run_config(best_cfg, out=str(base / "best_run"), resume=None)
    return {"code": code, "out": out, "cfg": cfg, "resumed": resumed, "best_cfg": best_cfg, "best_run": best_run,
            "best_out": str(base / "best_run")}


def test_multi_objective_sweep_writes_a_front_whose_best_k_yaml_files_run(pareto_sweep):
    out, cfg = pareto_sweep["out"], pareto_sweep["cfg"]
    assert pareto_sweep["code"] == 0
    with open(os.path.join(out, "trials.csv"), newline="") as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    # every trial reported its costs: in the table, and in every row of its metrics.jsonl and summary.json
    for t in trials:
        assert all(t[k] != "" for k in COST_KEYS), t
        run_dir = os.path.join(out, "trials", t["trial"])
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert rows and all(set(COST_KEYS) <= set(r) for r in rows)
        assert set(COST_KEYS) <= set(json.load(open(os.path.join(run_dir, "summary.json")))["cost"])
    # the front written is the front of the trials table
    table = [{**t, "score": float(t["score"]), "cost/trainable_params": float(t["cost/trainable_params"])} for t in trials]
    expected = [r["trial"] for r in pareto.pareto_front(table, cfg.tune.metrics, cfg.tune.modes)]
    with open(os.path.join(out, "pareto.csv"), newline="") as f:
        front = list(csv.DictReader(f))
    assert [r["trial"] for r in front] == expected and front
    assert os.path.exists(os.path.join(out, "pareto.png")) and os.path.exists(os.path.join(out, "pareto.md"))
    assert sorted(os.listdir(out)).count("best.yaml") == 1
    assert sorted(glob.glob(os.path.join(out, "best-*.yaml"))) == [os.path.join(out, f"best-{k}.yaml")
                                                                   for k in range(1, len(front) + 1)]
    # --resume restores the finished sweep, reruns nothing and writes the same front
    assert sorted(r["trial"] for r in pareto_sweep["resumed"]["rows"]) == sorted(t["trial"] for t in trials)
    assert [r["trial"] for r in pareto_sweep["resumed"]["front"]] == expected
    # best-1.yaml ran as written: the front's first trial's settings, its own costs in its summary
    first = next(t for t in trials if t["trial"] == front[0]["trial"])
    best_cfg, summary = pareto_sweep["best_cfg"], pareto_sweep["best_run"]
    assert best_cfg.model.adapter.kind == first["model.adapter.kind"]
    assert best_cfg.model.fpn_channels == int(first["model.fpn_channels"])
    assert summary["cost"][COST_TRAINABLE_PARAMS] == int(first["cost/trainable_params"])
    assert isinstance(summary["metrics"]["score"], float)


@pytest.mark.skipif(not HAVE_MLFLOW, reason=NEEDS_MLFLOW)
def test_mlflow_holds_every_trial_and_the_run_read_back_with_its_own_client(pareto_sweep):
    from mlflow.tracking import MlflowClient

    out = pareto_sweep["out"]
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlruns", "mlflow.db"))
    experiment = client.get_experiment_by_name(pareto_sweep["cfg"].name)
    runs = client.search_runs([experiment.experiment_id])
    with open(os.path.join(out, "trials.csv"), newline="") as f:
        trials = {t["trial"]: t for t in csv.DictReader(f)}
    assert sorted(r.info.run_name for r in runs) == sorted(trials)  # one run per trial, none twice after --resume
    for run in runs:
        t = trials[run.info.run_name]
        assert run.info.status == "FINISHED" and run.data.tags["paf_ray_status"] == "completed"
        assert run.data.params["model.adapter.kind"] == t["model.adapter.kind"]
        history = client.get_metric_history(run.info.run_id, "score")
        assert [m.step for m in history] == [1] and history[0].value == pytest.approx(float(t["score"]))
        assert run.data.metrics[COST_TRAINABLE_PARAMS] == float(t["cost/trainable_params"])
        assert {"summary.json", "curves.png", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # the `paf-ray run` of best-1.yaml (tracking.mlflow came with the sweep's config): one run in its own storage
    summary = pareto_sweep["best_run"]
    client = MlflowClient("sqlite:///" + os.path.join(pareto_sweep["best_out"], "mlruns", "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name(pareto_sweep["best_cfg"].name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["name"] == os.path.basename(summary["run_dir"])
    history = client.get_metric_history(run.info.run_id, "score")
    assert [m.value for m in history] == [pytest.approx(summary["metrics"]["score"])]
    assert run.data.metrics[COST_TRAINABLE_PARAMS] == summary["cost"][COST_TRAINABLE_PARAMS]
    assert {"summary.json", "curves.png", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
