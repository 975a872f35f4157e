"""Every path a URI: weights, checkpoints and run folders on a real S3 endpoint (moto_server on
loopback, the `s3_endpoint` fixture), read through each node's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pyarrow.fs as pafs
import pytest
import torch

from paf_ray.runtime import storage

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def s3_prefix(s3_endpoint) -> str:
    """A fresh folder in the test bucket."""
    return f"s3://{s3_endpoint[1]}/{uuid.uuid4().hex[:12]}"


def upload_dir(local: str, uri: str) -> None:
    fs, inner = storage.resolve(uri)
    pafs.copy_files(local, inner, destination_filesystem=fs)


def tiny_backbone_state() -> dict:
    from paf_ray.models.backbones import BACKBONES
    from paf_ray.models.backbones.resnet import TinyConfig

    torch.manual_seed(1)
    return BACKBONES["tiny"].build(TinyConfig(width=8)).state_dict()


def fetched_entries(cache: str) -> list[str]:
    folder = os.path.join(cache, "fetched")
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock"))


def test_weights_from_s3_are_fetched_once_per_node_even_when_asked_at_once(s3_endpoint, tmp_path):
    """Four processes of one node ask for the same weights URI together: one cached copy, all complete;
    a changed object is fetched again; a missing one is an error naming the URI."""
    uri = s3_prefix(s3_endpoint) + "/weights/tiny.pth"
    state = tiny_backbone_state()
    local = tmp_path / "tiny.pth"
    torch.save(state, local)
    storage.upload_file(str(local), uri)
    cache = tmp_path / "node_cache"
    env = {**os.environ, "PAF_RAY_CACHE": str(cache), "PYTHONPATH": REPO}
    code = "import sys; from paf_ray.runtime.storage import local_file; print(local_file(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1, paths
    (path,) = paths
    assert path.startswith(str(cache)) and path.endswith("tiny.pth")
    assert open(path, "rb").read() == local.read_bytes()
    assert len(fetched_entries(str(cache))) == 1
    assert os.listdir(os.path.dirname(path)) == ["tiny.pth"]  # no partial file left behind

    # the model builder reads the URI through the cache
    from paf_ray.config import from_dict
    from paf_ray.models.multitask import build_model

    os.environ["PAF_RAY_CACHE"] = str(cache)
    try:
        cfg = from_dict({"model": {"backbone": {"name": "tiny", "tiny": {"width": 8}, "weights": uri, "format": "torchvision"},
                                   "fpn_channels": 16, "heads": {"sem": {"channels": 8}, "drv": {"channels": 8}}}})
        model = build_model(cfg.model, input_size=(128, 96))
        assert torch.equal(model.backbone.state_dict()["conv1.weight"], state["conv1.weight"])

        # the object changes: a new cache entry with the new content
        state2 = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        torch.save(state2, local)
        storage.upload_file(str(local), uri)
        path2 = storage.local_file(uri)
        assert path2 != path and torch.equal(torch.load(path2, weights_only=True)["conv1.weight"], state2["conv1.weight"])
        with pytest.raises(Exception, match="no such file"):
            build_model(from_dict({"model": {"backbone": {"name": "tiny", "tiny": {"width": 8}, "weights": uri + ".gone",
                                                          "format": "torchvision"}}}).model, input_size=(128, 96))
    finally:
        os.environ.pop("PAF_RAY_CACHE")


def _tiny_checkpoint(directory: str) -> str:
    from paf_ray.config import from_dict
    from paf_ray.models.multitask import build_model
    from paf_ray.train.checkpoint import save_checkpoint

    cfg = from_dict({"data": {"input_size": [128, 96]},
                     "model": {"backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
                               "fpn_channels": 16, "heads": {"sem": {"channels": 8}, "drv": {"channels": 8}}, "adapter": {"kind": "none"}},
                     "train": {"stages": [{"kind": "finetune"}]}})
    torch.manual_seed(0)
    model = build_model(cfg.model, input_size=cfg.data.input_size)
    save_checkpoint(directory, model, cfg, {"stage": "finetune", "epoch": 1, "step": 3})
    return directory


def test_checkpoint_dir_run_dir_and_model_file_on_s3_load_anywhere(s3_endpoint, tmp_path, testdata_dir):
    """train.init_checkpoint, eval, predict, export and paf_ray.load take a checkpoint dir, a run dir
    (summary.json) or a model.pt as an s3:// URI."""
    import paf_ray
    from paf_ray.train.checkpoint import checkpoint_location, load_model, resolve_checkpoint_dir

    testdata = testdata_dir
    prefix = s3_prefix(s3_endpoint)
    ckpt_uri = f"{prefix}/runs/r1/stage0-finetune/checkpoint_000001"
    upload_dir(_tiny_checkpoint(str(tmp_path / "ckpt")), ckpt_uri)
    storage.write_bytes(f"{prefix}/runs/r1/summary.json", json.dumps({"checkpoint": ckpt_uri}).encode())
    os.environ["PAF_RAY_CACHE"] = str(tmp_path / "cache")
    try:
        for given in (ckpt_uri, ckpt_uri + "/", f"{prefix}/runs/r1", ckpt_uri + "/model.pt"):
            assert checkpoint_location(given) == ckpt_uri, given
        local = resolve_checkpoint_dir(f"{prefix}/runs/r1")
        assert local.startswith(str(tmp_path / "cache"))
        assert sorted(os.listdir(local)) == ["config.yaml", "meta.json", "model.pt"]
        assert resolve_checkpoint_dir(ckpt_uri) == local  # fetched once
        model, cfg, meta = load_model(f"{prefix}/runs/r1")
        assert meta["step"] == 3 and cfg.model.backbone.name == "tiny"
        predictor = paf_ray.load(ckpt_uri)
        out = predictor.predict(torch.zeros(96, 128, 3, dtype=torch.uint8).numpy())
        assert set(out) >= {"sem", "drv"}
        with pytest.raises(FileNotFoundError, match="not a paf_ray checkpoint"):
            checkpoint_location(f"{prefix}/runs/nothing-here")
        # paf-ray predict with the run and the images in S3
        from paf_ray import cli

        frame = sorted(os.listdir(os.path.join(testdata, "bdd100k-images")))[0]
        storage.upload_file(os.path.join(testdata, "bdd100k-images", frame), f"{prefix}/frames/{frame}")
        assert cli.main(["predict", f"{prefix}/runs/r1", f"{prefix}/frames", "--out", str(tmp_path / "preds")]) == 0
        assert os.listdir(tmp_path / "preds" / "sem") == [frame.rsplit(".", 1)[0] + ".png"]
    finally:
        os.environ.pop("PAF_RAY_CACHE")


def test_run_with_data_init_checkpoint_and_storage_in_s3_leaves_its_logs_in_the_bucket(
        ray_local, synth_root, s3_endpoint, tmp_path):
    """A 1-worker run whose dataset, init checkpoint and run storage are all in S3: the logs rank 0
    writes (metrics.jsonl, TensorBoard), curves.png, summary.json and the skipped counts land in
    <storage>/<name>/ in the bucket, and the run's checkpoint loads from there."""
    from test_train import tiny_config

    from paf_ray.config import from_dict
    from paf_ray.models.multitask import build_model
    from paf_ray.train.checkpoint import load_model, save_checkpoint
    from paf_ray.train.run import run_pipeline

    prefix = s3_prefix(s3_endpoint)
    upload_dir(synth_root, f"{prefix}/bdd100k")
    cfg_dict = tiny_config(
        f"{prefix}/bdd100k",
        train={"stages": [{"kind": "finetune", "epochs": 1, "lr": 1e-3, "max_steps_per_epoch": 2}], "log_every": 1},
        ray={"num_workers": 1, "cpus_per_worker": 1.0, "storage_path": f"{prefix}/runs"},
    )
    cfg_dict["data"]["max_val_samples"] = 4
    cfg = from_dict(cfg_dict)
    model = build_model(cfg.model, input_size=cfg.data.input_size)
    save_checkpoint(str(tmp_path / "init"), model, cfg, {"stage": "adapt", "epoch": 1, "step": 1})
    upload_dir(str(tmp_path / "init"), f"{prefix}/init/checkpoint_000000")
    cfg_dict["train"]["init_checkpoint"] = f"{prefix}/init/checkpoint_000000"

    summary = run_pipeline(from_dict(cfg_dict))
    run_dir = f"{prefix}/runs/t"
    assert summary["run_dir"] == run_dir and summary["checkpoint"].startswith(run_dir + "/stage0-finetune/")
    rows = [json.loads(line) for line in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("stage0-finetune", 1)]
    assert any(n.startswith("events.out.tfevents.") for n in storage.list_files(f"{run_dir}/tb"))
    assert storage.file_size(f"{run_dir}/curves.png") > 1000
    on_s3 = json.loads(storage.read_bytes(f"{run_dir}/summary.json"))
    assert on_s3["skipped_samples"] == {"stage0-finetune": 0, "index": {"train": 0, "val": 0}, "total": 0}
    _, _, meta = load_model(run_dir)
    assert meta["stage"] == "finetune" and meta["final"] is True


def test_a_row_decoded_from_s3_equals_the_same_row_from_disk(s3_endpoint, synth_root):
    """The loader reads a record's image and masks from object storage (concurrently) to the same arrays."""
    import numpy as np

    from paf_ray.data.decode import load_sample
    from paf_ray.data.index import build_index

    from paf_ray.tasks import TASKS

    tasks = list(TASKS)
    local = next(r for r in build_index(synth_root, tasks)["train"] if {"sem", "drv", "lane"} <= set(r["labels"]))
    root = s3_prefix(s3_endpoint) + "/bdd"

    def uploaded(path: str) -> str:
        uri = f"{root}/{os.path.relpath(path, synth_root)}"
        storage.upload_file(path, uri)
        return uri

    remote = {**local, "image": uploaded(local["image"]),
              "labels": {t: uploaded(v) if isinstance(v, str) else v for t, v in local["labels"].items()}}
    a, b = load_sample(local, tasks), load_sample(remote, tasks)
    assert np.array_equal(a["image"], b["image"])
    for task in ("sem", "drv", "lane"):
        assert np.array_equal(a["targets"][task], b["targets"][task]), task
    assert np.array_equal(a["targets"]["det"]["boxes"], b["targets"]["det"]["boxes"])


def test_a_sweep_folder_in_s3_keeps_its_optuna_study_there(s3_endpoint, tmp_path):
    """The default SQLite study of a sweep on object storage: a working copy on the driver's node,
    kept in the sweep folder after the sweep and fetched again to continue it."""
    import optuna

    from paf_ray.config import load_config
    from paf_ray.tune import search

    cfg = load_config(os.path.join(REPO, "jobs", "tune_smoke.yaml"))
    out_dir = s3_prefix(s3_endpoint) + "/sweeps/s1"
    os.environ["PAF_RAY_CACHE"] = str(tmp_path / "cache")
    try:
        search.fetch_study(cfg, out_dir)
        url = search.study_storage_url(cfg, out_dir)
        assert url.startswith("sqlite:///" + str(tmp_path / "cache"))
        study = optuna.create_study(study_name="s", storage=url)
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
        search.keep_study(cfg, out_dir)
        assert storage.exists(out_dir + "/optuna.db")
        os.remove(search.local_study_path(out_dir))  # another driver, another node
        search.fetch_study(cfg, out_dir)
        assert len(optuna.load_study(study_name="s", storage=url).trials) == 1
    finally:
        os.environ.pop("PAF_RAY_CACHE")
