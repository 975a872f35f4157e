"""Training on Ray Train for real: local mode, 1 and 2 workers, handoff, fault tolerance, resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from paf_ray.config import from_dict, to_dict

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(root: str, **sections) -> dict:
    cfg = {
        "name": "t",
        "data": {"root": root, "input_size": [256, 160], "batch_size": 2, "cpus": 0.5},
        "model": {
            "backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
            "adapter": {"kind": "lora", "lora": {"rank": 2}},
            "fpn_channels": 32,
            "heads": {
                "sem": {"channels": 16},
                "drv": {"channels": 16},
                "det": {
                    "rpn_pre_nms_top_n_train": 200,
                    "rpn_post_nms_top_n_train": 100,
                    "rpn_pre_nms_top_n_test": 100,
                    "rpn_post_nms_top_n_test": 50,
                    "box_batch_size_per_image": 32,
                    "representation_size": 64,
                },
            },
        },
        "train": {
            "stages": [{"kind": "adapt", "epochs": 1, "lr": 1e-3}, {"kind": "finetune", "epochs": 1, "lr": 1e-3}],
            "log_every": 5,
        },
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


def read_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_lr_schedule_warmup_then_cosine_to_zero():
    from paf_ray.train.step import lr_lambda

    f = lr_lambda("cosine", warmup_steps=4, total_steps=20)
    assert f(0) == pytest.approx(0.25)
    assert f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.0, abs=1e-9)
    assert 0 < f(12) < 1


def test_training_processes_get_a_short_openmp_spin_unless_the_user_set_one():
    from paf_ray.train.step import TRAIN_PROCESS_ENV, train_process_env

    assert train_process_env({}) == TRAIN_PROCESS_ENV == {"GOMP_SPINCOUNT": "30000"}
    assert train_process_env({"PATH": "/bin"}) == TRAIN_PROCESS_ENV
    # a user's own setting reaches the workers unchanged (they inherit the job's environment)
    assert train_process_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert train_process_env({"GOMP_SPINCOUNT": "infinite"}) == {}


def _backbone_weights_file(directory) -> str:
    """A tiny backbone saved as a torchvision-layout checkpoint: the 'pretrained' weights of a test run."""
    from paf_ray.models.backbones import BACKBONES
    from paf_ray.models.backbones.resnet import TinyConfig

    torch.manual_seed(123)
    path = os.path.join(str(directory), "tiny_backbone.pth")
    torch.save(BACKBONES["tiny"].build(TinyConfig(width=8)).state_dict(), path)
    return path


def test_adapt_then_finetune_on_one_worker(ray_local, synth_root, tmp_path):
    """The paf pipeline end to end: the run folder holds what a user looks for, the pretrained
    backbone untouched by adapt except for the merged low-rank deltas, LoRA merged at the handoff."""
    from paf_ray.train.checkpoint import MODEL_FILE, load_model, read_meta, resolve_checkpoint_dir
    from paf_ray.train.run import run_pipeline

    raw = tiny_config(synth_root)
    weights = _backbone_weights_file(tmp_path)
    raw["model"]["backbone"] = {**raw["model"]["backbone"], "weights": weights, "format": "torchvision"}
    summary = run_pipeline(from_dict(raw), out=str(tmp_path / "runs"))
    run_dir = os.path.join(str(tmp_path), "runs", "t")
    for name in ("summary.json", "metrics.jsonl", "curves.png", "config.yaml"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))
    on_disk = json.load(open(os.path.join(run_dir, "summary.json")))
    assert [s["stage"] for s in on_disk["stages"]] == ["stage0-adapt", "stage1-finetune"]
    for key in ("det/AP", "det/AP50", "sem/mIoU", "drv/mIoU", "drv/mIoU3", "score"):
        assert key in on_disk["metrics"], key
    assert on_disk["skipped_samples"]["total"] == 0
    # the adapt stage's final checkpoint has its LoRA deltas merged; finetune starts from it
    adapt_ckpt = resolve_checkpoint_dir(summary["stages"][0]["checkpoint"])
    assert read_meta(adapt_ckpt)["adapters_merged"] is True
    model, loaded_cfg, meta = load_model(summary["checkpoint"])
    assert meta["stage"] == "finetune" and meta["final"] is True
    assert not any("lora" in k for k in model.state_dict())
    rows = read_rows(run_dir)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("stage0-adapt", 1), ("stage1-finetune", 1)]

    # Adapt froze the pretrained backbone: after it, every backbone tensor equals the pretrained file's
    # (BN statistics included), except the adapted convs, which differ by exactly a rank-2 delta.
    pretrained = torch.load(weights, weights_only=True)
    adapted = torch.load(os.path.join(adapt_ckpt, MODEL_FILE), weights_only=True)
    moved = []
    for key, before in pretrained.items():
        after = adapted[f"backbone.{key}"]
        if torch.equal(before, after):
            continue
        delta = (after - before).reshape(after.shape[0], -1)
        assert before.dim() == 4 and torch.linalg.matrix_rank(delta, atol=1e-6, rtol=1e-3) <= 2, f"{key} moved beyond its LoRA delta"
        moved.append(key)
    assert moved, "adapt trained no LoRA delta"
    finetuned = torch.load(os.path.join(resolve_checkpoint_dir(summary["checkpoint"]), MODEL_FILE), weights_only=True)
    assert any(not torch.equal(adapted[f"backbone.{k}"], finetuned[f"backbone.{k}"]) for k in pretrained)


def test_local_mode_loop_reports_metrics(ray_local, synth_root, tmp_path):
    """num_workers=0 runs the same loop in this process (fast path for loop logic)."""
    from paf_ray.train.run import make_datasets, prepare_data, run_stage

    cfg = from_dict(tiny_config(synth_root, ray={"num_workers": 0}))
    cfg, train, val = prepare_data(cfg)
    result = run_stage(cfg, 0, str(tmp_path), make_datasets(cfg, train, val, 0), len(train), None, 0)
    assert result.error is None
    assert result.metrics["epoch"] == 1 and "score" in result.metrics
    assert result.metrics["train/loss_sem"] > 0


def test_two_workers_ddp_with_partial_labels(ray_local, synth_root, tmp_path):
    """2 CPU workers on gloo; batch size 1 so ranks regularly hold different tasks in the same step.
    model.norm syncbn: the backbone's BatchNorm runs on both workers' images (tests/test_norm.py checks the values)."""
    from paf_ray.train.run import run_pipeline

    cfg = from_dict(
        tiny_config(
            synth_root,
            model={**tiny_config(synth_root)["model"], "norm": "syncbn"},
            data={"root": synth_root, "input_size": [256, 160], "batch_size": 1, "cpus": 0.5, "max_train_samples": 12},
            ray={"num_workers": 2, "cpus_per_worker": 0.5},
            train={"stages": [{"kind": "finetune", "epochs": 1, "lr": 1e-3}], "log_every": 1},
        )
    )
    summary = run_pipeline(cfg, out=str(tmp_path))
    rows = read_rows(os.path.join(str(tmp_path), "t"))
    assert all(torch.isfinite(torch.tensor(r["train/loss_det"])) for r in rows)
    # each worker trained on its own half of the 12 frames: 6 steps of batch 1, not 12
    assert [r["step"] for r in rows] == [6]
    assert all(0.0 <= summary["metrics"][k] <= 100.0 for k in ("det/AP50", "sem/mIoU", "drv/mIoU"))


def _first_checkpoint(stage_dir: str) -> bool:
    """True once Ray Train has registered a checkpoint (not merely uploaded its files)."""
    snapshot = os.path.join(stage_dir, "checkpoint_manager_snapshot.json")
    try:
        with open(snapshot, encoding="utf-8") as f:
            return "checkpoint_" in f.read()
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_worker_killed_restarts_from_checkpoint(ray_local, synth_root, tmp_path):
    """SIGKILL a training worker after its first checkpoint: the run restarts from it and finishes."""
    from ray.util.state import list_actors

    from paf_ray.train.run import run_pipeline

    cfg = from_dict(
        tiny_config(
            synth_root,
            train={"stages": [{"kind": "finetune", "epochs": 4, "lr": 1e-3}], "log_every": 1},
            ray={"num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 1},
        )
    )
    box: dict = {}

    def target():
        try:
            box["summary"] = run_pipeline(cfg, out=str(tmp_path))
        except BaseException as e:  # surfaced below
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    stage_dir = os.path.join(str(tmp_path), "t", "stage0-finetune")
    deadline = time.time() + 240
    while not _first_checkpoint(stage_dir) and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
    assert _first_checkpoint(stage_dir), box.get("error")
    gcs = ray_local.get_runtime_context().gcs_address  # this session's Ray, whatever else runs here
    alive = list_actors(address=gcs, filters=[("state", "=", "ALIVE")])
    workers = [a for a in alive if "TrainWorker" in a.class_name]
    assert workers, "no live training worker found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert "error" not in box, box.get("error")
    rows = read_rows(os.path.join(str(tmp_path), "t"))
    epochs = [r["epoch"] for r in rows]
    assert epochs == [1, 2, 3, 4], epochs  # each epoch reported once: nothing before the checkpoint was redone
    from paf_ray.train.checkpoint import load_model

    _, _, meta = load_model(box["summary"]["checkpoint"])
    assert meta["epoch"] == 4 and meta["final"] is True


def test_interrupted_driver_resumes(synth_root, tmp_path):
    """Interrupt `paf-ray run` after its first checkpoint; `--resume` finishes without redoing epochs."""
    cfg = tiny_config(
        synth_root, train={"stages": [{"kind": "finetune", "epochs": 3, "lr": 1e-3}], "log_every": 1}
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "paf_ray", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240

    def stage_dir():  # the run folder is t-<time>-<id>
        runs = glob.glob(os.path.join(str(out), "t-*"))
        return os.path.join(runs[0], "stage0-finetune") if runs else ""

    while not _first_checkpoint(stage_dir()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert _first_checkpoint(stage_dir()), proc.communicate(timeout=30)[0][-3000:]
    run_dir = os.path.dirname(stage_dir())
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not os.path.exists(os.path.join(run_dir, "summary.json")), "the run finished before the interrupt"
    # bare --resume continues the newest run of the config's name (--resume NAME: that run)
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout + resumed.stderr
    assert glob.glob(os.path.join(str(out), "t-*")) == [run_dir]
    rows = read_rows(run_dir)
    epochs = [r["epoch"] for r in rows]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3, epochs


def test_each_run_of_a_config_gets_its_own_folder_and_resume_finds_the_newest(ray_local, synth_root, tmp_path):
    """The same config run twice (as a job file submitted twice): two run folders, both complete;
    `--resume` continues the newest instead of starting a third. Train local mode keeps it cheap."""
    from paf_ray import cli

    cfg = tiny_config(synth_root, train={"stages": [{"kind": "finetune", "epochs": 1, "max_steps_per_epoch": 1}]},
                      ray={"num_workers": 0})
    cfg["data"]["max_val_samples"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["run", str(path), "--out", str(tmp_path / "runs")]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    runs = sorted(glob.glob(str(tmp_path / "runs" / "t-*")))
    assert len(runs) == 2, runs
    for run_dir in runs:
        assert json.load(open(os.path.join(run_dir, "summary.json")))["name"] == os.path.basename(run_dir)
    newest = max(runs, key=lambda r: r[-20:-5])
    assert cli.main(args + ["--resume"]) == 0
    assert cli.main(args + ["--resume", os.path.basename(runs[0])]) == 0
    assert sorted(glob.glob(str(tmp_path / "runs" / "t-*"))) == runs
    assert newest in runs


@pytest.mark.timeout(240)
def test_a_stage_whose_workers_never_start_fails_naming_the_timeout_key(ray_local, synth_root, tmp_path):
    """More CPUs per worker than this cluster has: after ray.worker_start_timeout_s the stage fails with
    an error naming the key (no fixed retry count, no endless wait)."""
    from paf_ray.train.run import WorkersDidNotStartError, run_pipeline

    cfg = from_dict(tiny_config(synth_root, ray={"num_workers": 1, "cpus_per_worker": 64.0,
                                                 "worker_start_timeout_s": 4}))
    with pytest.raises(WorkersDidNotStartError, match=r"ray\.worker_start_timeout_s=4 s"):
        run_pipeline(cfg, out=str(tmp_path))


def test_demo_learns(ray_local, tmp_path):
    """A CI-sized `paf-ray demo` of the 4-task variant: pretraining, adapt and finetune leave a model
    clearly better than before, lane marking included (the demo config's F-score bar: 2x)."""
    from paf_ray.train.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(
        os.path.join(REPO, "jobs", "demo_lane.yaml"),
        str(out),
        overrides=[
            "data.synth.images=64",
            "data.synth.val_fraction=0.2",
            "data.input_size=[256,160]",
            "train.stages.0.epochs=1",
            "train.stages.1.epochs=2",
            "train.log_every=5",
        ],
    )
    on_disk = json.load(open(out / "summary.json"))
    assert on_disk["checkpoint"] == summary["checkpoint"] and os.path.isdir(summary["checkpoint"])
    before, after = on_disk["metrics_before"], on_disk["metrics"]
    assert after["drv/mIoU3"] > before["drv/mIoU3"] + 15, (before, after)
    assert after["sem/mIoU"] > before["sem/mIoU"] + 3, (before, after)
    assert after["score"] > before["score"] + 5, (before, after)
    assert after["lane/F1_pix2"] >= 2 * before["lane/F1_pix2"], (before, after)
    # the pretrained file went through the checkpoint zoo in the torchvision layout
    state = torch.load(out / "pretrained_backbone.pth", weights_only=True)
    assert "fc.weight" in state and any(k.startswith("layer4.") for k in state)
