"""End to end on a real multi-node Ray cluster with a real S3 endpoint (tests/cluster_fixtures.py).

One cluster for the module: a head (no CPUs) and worker nodes a and b (2 logical CPUs each) that
share nothing but the bucket, as separate machines would. Training runs put one worker per node
(`ray.cpus_per_worker=1.5`: two never fit on one node), so DDP (gloo) crosses nodes. The data set,
the backbone weights and the run storage are all in S3. Tests that need an earlier run use the
module fixtures (`smoke_runs`), so each run happens once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster_fixtures import BUCKET, REPO, kill_process_group, start_cluster, stop_cluster, wait_until

# Bounded, but generous: a 2-core machine shared with other work runs a job in 2-7 minutes.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]

DATA = f"s3://{BUCKET}/data/synth"
WEIGHTS = f"s3://{BUCKET}/weights/tiny16.pth"
RUNS = f"s3://{BUCKET}/runs"
# The same settings for every run on the cluster: inputs and outputs in S3, one worker per node.
CLUSTER_SETS = [
    f"data.root={DATA}",
    f"model.backbone.weights={WEIGHTS}",
    f"ray.storage_path={RUNS}",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1.5",
    "data.input_size=[160, 96]",
]
JOB_TIMEOUT = 900  # one job on the cluster


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def summary_uri_in(log: str) -> str:
    found = re.findall(r"\[paf-ray\] summary: (s3://\S+)/summary\.json", log)
    assert found, f"no summary line in the log:\n{log[-4000:]}"
    return found[-1]


def key_of(uri: str) -> str:
    assert uri.startswith(f"s3://{BUCKET}/"), uri
    return uri[len(f"s3://{BUCKET}/"):]


def metrics_rows(cluster, run_uri: str) -> list[dict]:
    return [json.loads(line) for line in cluster.s3_read(key_of(run_uri) + "/metrics.jsonl").splitlines() if line.strip()]


# Which node each Ray Train worker actor ran on (alive or dead), by the nodes' `local_node_<name>` resource.
_TRAIN_WORKER_NODES = """
import json, os
from ray.util.state import list_actors, list_nodes
address = os.environ["RAY_API_SERVER_ADDRESS"]
names = {}
for node in list_nodes(address=address, detail=True, limit=100):
    found = [k[len("local_node_"):] for k in (node.resources_total or {}) if k.startswith("local_node_")]
    names[node.node_id] = "head" if node.is_head_node else (found[0] if found else "?")
actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)
print(json.dumps([{"node": names.get(a.node_id, "?"), "job_id": a.job_id, "state": a.state} for a in actors]))
"""

_JOB_ID = """
import os, sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).get_job_info(sys.argv[1]).job_id)
"""


def train_worker_nodes(cluster) -> list[dict]:
    return json.loads(cluster.python(_TRAIN_WORKER_NODES))


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + nodes a, b + S3, with the synthetic data set and tiny backbone weights in the bucket."""
    import torch

    from paf_ray.data.bdd100k.synth import write_synthetic
    from paf_ray.models.backbones import BACKBONES
    from paf_ray.models.backbones.resnet import TinyConfig

    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root: unshare (network and mount namespaces), nsenter, mount")
    # Short path: Ray's unix sockets live under the nodes' temp dirs (~107 characters at most).
    root = Path(tempfile.mkdtemp(prefix="prc_", dir="/tmp"))
    # The worker nodes also must not see this test session's HOME and temporary folders.
    hide = [os.environ["HOME"], str(tmp_path_factory.getbasetemp())]
    t0 = time.monotonic()
    c = start_cluster(root, hide)
    try:
        local = c.driver_dir / "upload"
        write_synthetic(str(local / "synth"), images=24, seed=0, size=(320, 180), val_fraction=0.25)
        torch.save(BACKBONES["tiny"].build(TinyConfig(width=16)).state_dict(), local / "tiny16.pth")
        c.s3_upload(local / "synth", key_of(DATA))
        c.s3_upload(local / "tiny16.pth", key_of(WEIGHTS))
        print(f"cluster + data up in {time.monotonic() - t0:.0f} s")
        yield c
    finally:
        stop_cluster(root, c.env)
        shutil.rmtree(root, ignore_errors=True)


def test_nodes_share_nothing_but_object_storage(cluster):
    probe = """
import json, os, ray
ray.init(address=os.environ["LOCAL_CLUSTER_GCS"], logging_level="error")
root = os.environ["ROOT"]

@ray.remote(num_cpus=0)
def look(write):
    home = os.path.expanduser("~")
    if write:
        with open(os.path.join(home, "written_on_a"), "w") as f:
            f.write("a")
    return {"home": home, "sees_a_file": os.path.exists(os.path.join(root, "a", "home", "written_on_a")),
            "head_files": os.listdir(os.path.join(root, "head")), "driver_files": os.listdir(os.path.join(root, "driver"))}

on = lambda res: look.options(resources={res: 0.001})
out = {"a": ray.get(on("local_node_a").remote(True))}
out["b"] = ray.get(on("local_node_b").remote(False))
out["head"] = ray.get(on("node:__internal_head__").remote(False))
print(json.dumps(out))
"""
    done = cluster.run([sys.executable, "-c", probe], timeout=180, cwd=cluster.driver_dir, ROOT=str(cluster.dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["a"]["home"] == str(cluster.dir / "a" / "home") and seen["b"]["home"] == str(cluster.dir / "b" / "home")
    assert seen["a"]["sees_a_file"] and seen["head"]["sees_a_file"] is False and seen["b"]["sees_a_file"] is False
    assert seen["a"]["head_files"] == [] and seen["b"]["driver_files"] == []  # the head's disk is not theirs
    assert seen["head"]["head_files"]  # ... while the head itself sees its folder

    # No port of the cluster is open on this machine's network: every listener is in the cluster's
    # own network namespace, and there on loopback only.
    listeners = cluster.run(["ss", "-Hltn"], timeout=30).stdout.split("\n")
    addresses = [line.split()[3] for line in listeners if line.strip()]
    assert len(addresses) >= 10, addresses  # GCS, dashboard, raylets, agents, S3, ...
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in addresses), addresses
    ours = set(cluster.pids())
    assert len(ours) >= 10
    assert not [c for c in psutil.net_connections(kind="inet") if c.pid in ours]


# --------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def smoke_runs(cluster):
    """jobs/smoke.yaml submitted twice with the same settings: once with the stock `ray job submit`,
    once with `paf-ray submit --wait`. Returns {"cli": run URI, "sdk": run URI}."""
    runs = {}
    cli = cluster.run(
        ["ray", "job", "submit", "--working-dir", ".", "--submission-id", "smoke-cli", "--", "jobs/smoke.yaml",
         *sets(CLUSTER_SETS)],
        timeout=JOB_TIMEOUT,
    )
    assert cli.returncode == 0, cli.stdout[-6000:] + cli.stderr[-3000:]
    runs["cli"] = summary_uri_in(cli.stdout)
    sdk = cluster.run(
        [sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", cluster.dashboard, "--wait",
         "--submission-id", "smoke-sdk", *sets(CLUSTER_SETS)],
        timeout=JOB_TIMEOUT,
    )
    assert sdk.returncode == 0, sdk.stdout[-6000:] + sdk.stderr[-3000:]
    runs["sdk"] = summary_uri_in(sdk.stdout)
    return runs


def test_the_same_job_submitted_twice_makes_two_runs_in_the_bucket(cluster, smoke_runs):
    assert smoke_runs["cli"] != smoke_runs["sdk"]
    for uri in smoke_runs.values():
        assert uri.startswith(RUNS + "/smoke")
        summary = json.loads(cluster.s3_read(key_of(uri) + "/summary.json"))
        assert [s["kind"] for s in summary["stages"]] == ["adapt", "finetune"]
        for stage in summary["stages"]:
            assert stage["checkpoint"].startswith(uri + "/"), stage["checkpoint"]
            assert cluster.s3_keys(key_of(stage["checkpoint"]) + "/"), f"{stage['checkpoint']}: empty in the bucket"


def test_training_workers_run_on_both_worker_nodes(cluster, smoke_runs):
    job_id = cluster.python(_JOB_ID, "smoke-cli").strip()
    nodes = sorted(w["node"] for w in train_worker_nodes(cluster) if w["job_id"] == job_id)
    # Two stages, two workers each (DDP over gloo between the nodes), one on each worker node.
    assert nodes == ["a", "a", "b", "b"], nodes


def test_run_logs_land_in_the_bucket(cluster, smoke_runs):
    """metrics.jsonl, TensorBoard events, curves.png and summary.json, written from whichever node rank 0 was on."""
    run = smoke_runs["cli"]
    keys = cluster.s3_keys(key_of(run) + "/")
    prefix = key_of(run) + "/"
    assert keys.get(prefix + "curves.png", 0) > 1000
    events = [k for k in keys if k.startswith(prefix + "tb/") and "tfevents" in k]
    assert events and all(keys[k] > 0 for k in events), events
    rows = metrics_rows(cluster, run)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("stage0-adapt", 1), ("stage1-finetune", 1)]
    assert all("score" in r and any(k.startswith("train/loss") for k in r) for r in rows)
    summary = json.loads(cluster.s3_read(prefix + "summary.json"))
    assert summary["skipped_samples"]["total"] == 0 and "stage0-adapt" in summary["skipped_samples"]


def test_eval_and_predict_on_the_s3_run_from_a_fresh_home(cluster, smoke_runs, tmp_path):
    run = smoke_runs["sdk"]
    home = cluster.driver_dir / "fresh_home"
    evaluated = cluster.run(
        [sys.executable, "-m", "paf_ray", "eval", run, "--json"], timeout=JOB_TIMEOUT, cwd=cluster.driver_dir,
        home=home, RAY_ADDRESS=cluster.gcs,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-4000:] + evaluated.stderr[-4000:]
    printed = re.findall(r"^\{\n.*?^\}$", evaluated.stdout, re.S | re.M)
    assert printed, evaluated.stdout[-4000:]
    metrics = json.loads(printed[-1])
    assert {"score", "sem/mIoU", "drv/mIoU", "det/AP"} <= set(metrics)

    frame = next((cluster.driver_dir / "upload" / "synth" / "images" / "100k" / "val").glob("*.jpg"))
    out = cluster.driver_dir / "predicted"
    predicted = cluster.run(
        [sys.executable, "-m", "paf_ray", "predict", run, str(frame), "--out", str(out), "--device", "cpu"],
        timeout=300, cwd=cluster.driver_dir, home=cluster.driver_dir / "fresh_home2",
    )
    assert predicted.returncode == 0, predicted.stdout[-4000:] + predicted.stderr[-4000:]
    assert json.loads((out / "det.json").read_text())[0]["name"] == frame.name
    for folder in ("overlay", "sem", "drv"):
        assert (out / folder / f"{frame.stem}.png").is_file(), sorted(out.rglob("*"))


def test_tune_sweep_with_storage_in_s3(cluster):
    sweeps = f"s3://{BUCKET}/sweeps"
    done = cluster.run(
        [sys.executable, "-m", "paf_ray", "submit", "jobs/tune_smoke.yaml", "--address", cluster.dashboard, "--wait",
         "--submission-id", "tune-s3",
         *sets([f"data.root={DATA}", f"ray.storage_path={sweeps}", "tune.num_samples=2", "data.input_size=[160, 96]",
                f"tune.storage_url=sqlite:///{cluster.dir}/head/tmp/optuna.db"])],
        timeout=2 * JOB_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    folders = re.findall(r"\[paf-ray\] sweep folder: (s3://\S+)", done.stdout)
    assert folders, done.stdout[-4000:]
    prefix = key_of(folders[-1]) + "/"
    keys = cluster.s3_keys(prefix)
    # Every trial's run (its metrics.jsonl, also for a trial ASHA stopped early), the sweep's
    # tables and best config, and Tune's own experiment state (what --resume reads) are in the bucket.
    trials = {k[len(prefix + "trials/"):].split("/")[0] for k in keys
              if k.startswith(prefix + "trials/") and k.endswith("/metrics.jsonl")}
    assert len(trials) == 2, sorted(keys)
    assert {prefix + "best.yaml", prefix + "trials.csv"} <= set(keys), sorted(keys)
    assert any(k.endswith("/summary.json") for k in keys), sorted(keys)  # the trial that ran to the end
    assert any("/experiment_state-" in k for k in keys), sorted(keys)


# --------------------------------------------------------------------------- failures


def write_config(cluster, name: str, stages: list[dict], **extra) -> Path:
    """A config in the driver's working folder: jobs/smoke.yaml's model with these stages, all in S3."""
    cfg = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    cfg.pop("job", None)
    cfg["name"] = name
    cfg["data"].pop("synth", None)
    cfg["data"].update(root=DATA, input_size=[160, 96])
    cfg["model"]["backbone"]["weights"] = WEIGHTS
    cfg["train"]["stages"] = stages
    cfg["ray"].update(address=cluster.gcs, storage_path=RUNS, num_workers=2, cpus_per_worker=1.5,
                      worker_start_timeout_s=300)
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    path = cluster.driver_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_driver(cluster, config: Path, log: Path, *args: str):
    return cluster.popen([sys.executable, "-m", "paf_ray", "run", str(config), *args], log, cwd=cluster.driver_dir,
                         home=cluster.driver_dir / "driver_home")


@pytest.fixture(scope="module")
def interrupted_adapt_run(cluster):
    """An adapt run (2 epochs) whose driver is killed after the first epoch's checkpoint reached S3,
    then continued with `paf-ray run --resume NAME`. Returns (run URI, the resumed driver's output)."""
    stages = [{"kind": "adapt", "epochs": 2, "lr": 1.0e-3, "max_steps_per_epoch": 2}]
    config = write_config(cluster, "adapt", stages, ray__num_workers=1)
    log = cluster.driver_dir / "adapt1.log"
    first = start_driver(cluster, config, log)
    try:
        snapshot = cluster.s3_wait_for(key_of(RUNS) + "/adapt-", "stage0-adapt/checkpoint_manager_snapshot.json",
                                       timeout=JOB_TIMEOUT)
        assert snapshot, log.read_text()[-4000:]
    finally:
        kill_process_group(first)  # the driver and everything it started on this machine
    out1 = log.read_text()
    assert "summary:" not in out1, "the run finished before the driver was killed: nothing to resume"
    name = re.search(r"\[paf-ray\] run (\S+) in ", out1).group(1)
    second = cluster.run([sys.executable, "-m", "paf_ray", "run", str(config), "--resume", name], timeout=JOB_TIMEOUT,
                         cwd=cluster.driver_dir, home=cluster.driver_dir / "driver_home")
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    run = summary_uri_in(second.stdout)
    assert run.endswith("/" + name)
    return run, second.stdout


def test_resume_from_s3_after_the_driver_is_killed(cluster, interrupted_adapt_run):
    run, out = interrupted_adapt_run
    assert "resumed at epoch 1" in out, out[-4000:]
    epochs = [r["epoch"] for r in metrics_rows(cluster, run) if r["stage"] == "stage0-adapt"]
    assert epochs == [1, 2]


def test_finetune_from_the_adapt_run_uri_survives_losing_a_node(cluster, interrupted_adapt_run):
    """The finetune-only run starts from the adapt run's URI in S3. After its first epoch's checkpoint
    reached the bucket, the worker node its training worker runs on is killed (raylet, workers and
    all); the stage restarts from that checkpoint on the node left and ends with the same epochs."""
    adapt_run, _ = interrupted_adapt_run
    stages = [{"kind": "finetune", "epochs": 2, "lr": 1.0e-4, "max_steps_per_epoch": 2}]
    config = write_config(cluster, "nodeloss", stages, train__init_checkpoint=adapt_run, ray__num_workers=1,
                          ray__max_failures=1)
    log = cluster.driver_dir / "nodeloss.log"
    before = {(w["node"], w["job_id"]) for w in train_worker_nodes(cluster)}
    driver = start_driver(cluster, config, log)
    try:
        snapshot = cluster.s3_wait_for(key_of(RUNS) + "/nodeloss-", "stage0-finetune/checkpoint_manager_snapshot.json",
                                       timeout=JOB_TIMEOUT)
        assert snapshot, log.read_text()[-4000:]
        alive = [w for w in train_worker_nodes(cluster) if w["state"] == "ALIVE"]
        assert [w["node"] for w in alive] in (["a"], ["b"]), alive
        lost = alive[0]["node"]
        cluster.kill_node(lost)
        driver.wait(timeout=JOB_TIMEOUT)
    finally:
        kill_process_group(driver)
    out = log.read_text()
    assert driver.returncode == 0, out[-6000:]
    assert "resumed at epoch 1" in out, out[-4000:]
    run = summary_uri_in(out)
    epochs = [r["epoch"] for r in metrics_rows(cluster, run) if r["stage"] == "stage0-finetune"]
    assert epochs == [1, 2]  # the same epoch count, each epoch once
    summary = json.loads(cluster.s3_read(key_of(run) + "/summary.json"))
    assert summary["stages"][0]["checkpoint"].startswith(run + "/")
    restarted = {(w["node"], w["job_id"]) for w in train_worker_nodes(cluster)} - before
    assert {node for node, _ in restarted} == {"a", "b"}, restarted  # first on the lost node, then on the other
