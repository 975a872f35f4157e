"""Autoscaling on Ray's own autoscaler (tests/autoscaler_fixture.py): scale up from zero and back,
a fast failure for a job no node type can hold, the pre-flight check against a live cluster.

One cluster for the module, its node types derived from cluster/aws.yaml (gpu_1x: 8 CPUs, one
FAKE_GPU standing for its GPU, accelerator_type:A10G; gpu_8x: 96 CPUs, 8 FAKE_GPU, A100), a head
with 0 CPUs, and no worker node until a job asks for one. Idle nodes go after IDLE_TIMEOUT_MIN.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from autoscaler_fixture import (
    BUCKET,
    FAKE_GPU,
    HEAD_TYPE,
    REPO,
    fake_node_types,
    kill_session,
    start_autoscaling_cluster,
    stop_autoscaling_cluster,
)

IDLE_TIMEOUT_MIN = 0.25  # the autoscaler removes a worker node idle this long
# Measured from the job's end to no worker node (see SCALE_DOWN in the docs): the idle timeout,
# plus the node's own idle time before the job's end counted in, plus the autoscaler's update
# (1 s) and the node's stop; on this 2-core machine 3-25 s went beyond the idle timeout.
SCALE_DOWN_MARGIN_S = 45
SCALE_DOWN_LIMIT_S = IDLE_TIMEOUT_MIN * 60 + SCALE_DOWN_MARGIN_S
JOB_TIMEOUT = 600
GPU_JOB = ["--set", "ray.accelerator_type=A10G", "--set", f"ray.resources_per_worker.{FAKE_GPU}=1"]

heavy = [pytest.mark.autoscaler, pytest.mark.timeout(1800)]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# --------------------------------------------------------------------------- no cluster needed


def test_fake_node_types_follow_the_cluster_file():
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    fake = fake_node_types(aws)
    workers = {n: t for n, t in aws["available_node_types"].items() if n != aws["head_node_type"]}
    assert set(fake) == set(workers)
    for name, spec in workers.items():
        assert (fake[name]["min_workers"], fake[name]["max_workers"]) == (spec["min_workers"], spec["max_workers"])
        res = fake[name]["resources"]
        assert res[FAKE_GPU] == spec["resources"]["GPU"] and "GPU" not in res
        assert res["CPU"] == spec["resources"]["CPU"]
        accelerators = [k for k in spec["resources"] if k.startswith("accelerator_type:")]
        assert accelerators and all(res[k] == 1 for k in accelerators), name


def test_torch_import_in_a_deleted_working_dir_dies_in_onemkl(tmp_path):
    """What killed the first job on a freshly scaled fake cluster (tests/fake_provider.py): a
    process whose working directory was removed and made again under it cannot import torch."""
    code = ("import os, shutil, sys; d = sys.argv[1]; os.makedirs(d); os.chdir(d); shutil.rmtree(d); os.makedirs(d); "
            "import torch")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wd")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Intel oneMKL FATAL ERROR: Cannot load" in done.stdout + done.stderr and "libtorch_cpu.so" in done.stdout + done.stderr


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster():
    import os

    if os.geteuid() != 0:
        pytest.skip("the autoscaling cluster needs root (a private network namespace: unshare, nsenter)")
    root = Path(tempfile.mkdtemp(prefix="pas_", dir="/tmp"))  # short: Ray's socket paths live under it
    t0 = time.monotonic()
    c = start_autoscaling_cluster(root, REPO / "cluster" / "aws.yaml", idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    print(f"autoscaling cluster up in {time.monotonic() - t0:.0f} s")
    try:
        yield c
    finally:
        stop_autoscaling_cluster(c)
        shutil.rmtree(root, ignore_errors=True)


_HOLDERS = """
import json, os
from ray.util.state import list_actors, list_placement_groups
a = os.environ["RAY_API_SERVER_ADDRESS"]
print(json.dumps({"actors": [(x.class_name, x.node_id[-5:]) for x in list_actors(address=a, filters=[("state", "=", "ALIVE")])],
                  "placement_groups": [p.placement_group_id for p in list_placement_groups(address=a, filters=[("state", "!=", "REMOVED")])]}))
"""


def workers_alive(cluster) -> list[dict]:
    return [n for n in cluster.nodes() if n["state"] == "ALIVE" and not n["head"]]


def wait_for_no_workers(cluster, since: float, limit_s: float) -> float:
    """Seconds from `since` (time.monotonic) until no worker node is alive; fails naming what the
    cluster still holds."""
    while True:
        alive = workers_alive(cluster)
        if not alive:
            return time.monotonic() - since
        if time.monotonic() - since > limit_s:
            held = cluster.python(_HOLDERS).strip().splitlines()[-1]
            pytest.fail(f"{len(alive)} worker node(s) still alive {limit_s:.0f} s after the job ended "
                        f"(idle timeout {IDLE_TIMEOUT_MIN * 60:.0f} s): {[cluster.type_of(n) for n in alive]}; alive actors and "
                        f"placement groups: {held}\n{cluster.status()}\n{cluster.log_tail('monitor.log', 30)}")
        time.sleep(1)


class NodeWatch:
    """The alive worker nodes once a second (a poller in the cluster's network) while the block
    runs: the most there were at once, their types, and when the last of them was gone."""

    def __init__(self, cluster, log: Path):
        self.cluster, self.log = cluster, log
        self.most, self.types, self.zero_at = 0, set(), None

    def __enter__(self):
        self.proc = self.cluster.watch_nodes(self.log)
        return self

    def __exit__(self, *exc):
        kill_session(self.proc.pid)
        self.proc.wait(timeout=30)
        for line in self.log.read_text().splitlines():
            if not line.startswith("{"):
                continue
            sample = json.loads(line)
            alive = [n for n in sample["nodes"] if n["state"] == "ALIVE" and not n["head"]]
            self.most = max(self.most, len(alive))
            self.types |= {self.cluster.type_of(n) for n in alive}
            if alive:
                self.zero_at = None
            elif self.zero_at is None and self.most:
                self.zero_at = sample["time"]

    def down_after(self, ended_at: float, waited: float) -> float:
        """Seconds from a job's end (time.time) to no worker node: negative when the nodes went
        before the job ended, else what the wait after it measured."""
        return self.zero_at - ended_at if self.zero_at is not None and self.zero_at < ended_at else waited


_AUTOSCALER_EVENTS = """
import json, os
from ray.util.state import list_cluster_events
events = list_cluster_events(address=os.environ["RAY_API_SERVER_ADDRESS"], limit=10000, raise_on_missing_output=False)
print(json.dumps([(e.time, e.message) for e in events if e.source_type == "AUTOSCALER" and "node" in e.message]))
"""


# The placement groups (strategy, bundles) of the cluster and the resources the job's decode tasks asked for.
_JOB_PLACEMENT = """
import json, os, sys, ray
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_tasks
ray.init(address=sys.argv[2], logging_level="error")
a = os.environ["RAY_API_SERVER_ADDRESS"]
job = JobSubmissionClient(a).get_job_info(sys.argv[1]).job_id
pgs = ray.util.placement_group_table().values()
tasks = list_tasks(address=a, filters=[("job_id", "=", job)], detail=True, limit=10000, raise_on_missing_output=False)
print(json.dumps({"placement_groups": [{"strategy": p["strategy"], "bundles": list(p["bundles"].values())} for p in pgs],
                  "decode_tasks": [t.required_resources for t in tasks if "LoadRows" in t.name]}))
"""


@pytest.mark.autoscaler
@pytest.mark.timeout(1800)
def test_two_concurrent_trials_bring_up_two_nodes_and_back(cluster, tmp_path):
    """A 2-trial sweep (`max_concurrent_trials: 2`), each trial's worker on a stand-in GPU: two gpu_1x
    nodes come up, each holding one trial's worker; after the sweep both go. The first job of the
    cluster: Ray Data's cluster-wide actors, which would hold the node of the first trial that runs
    a dataset for good, are on the head (ray_setup.pin_data_actors_here)."""
    assert workers_alive(cluster) == []
    t0 = time.monotonic()
    with NodeWatch(cluster, tmp_path / "nodes.log") as watch:
        done = cluster.run(
            [sys.executable, "-m", "paf_ray", "submit", "jobs/tune_smoke.yaml", "--address", cluster.dashboard, "--wait",
             "--submission-id", "sweep", *GPU_JOB,
             *sets(["tune.num_samples=2", "tune.max_concurrent_trials=2", f"ray.storage_path=s3://{BUCKET}/sweeps"])],
            timeout=JOB_TIMEOUT)
        ended, ended_at = time.monotonic(), time.time()
        waited = wait_for_no_workers(cluster, ended, SCALE_DOWN_LIMIT_S) if done.returncode == 0 else 0
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert f"fits the cluster at {cluster.dashboard}" in out  # the pre-flight check ran and passed
    print(f"sweep: {ended - t0:.0f} s, at most {watch.most} worker nodes at once; no worker node "
          f"{watch.down_after(ended_at, waited):+.0f} s after its end")
    print("sweep: the autoscaler's events:", cluster.python(_AUTOSCALER_EVENTS).strip().splitlines()[-1])
    # Two trials at once need two gpu_1x nodes (one FAKE_GPU each); the autoscaler may start one
    # more when a node went idle between a trial's stages and is replaced (seen under heavy load).
    assert watch.most >= 2 and watch.types == {"gpu_1x"}, (watch.most, watch.types)
    # Each trial, and every decode task, asked for the A10G: nothing ran on (or started) another type.
    placed = json.loads(cluster.python(_JOB_PLACEMENT, "sweep", cluster.gcs).strip().splitlines()[-1])
    trials = [pg for pg in placed["placement_groups"] if pg["bundles"] == [{"CPU": 0.01, "accelerator_type:A10G": 0.001}]]
    assert len(trials) == 2, placed
    assert placed["decode_tasks"] and all(t.get("accelerator_type:A10G") == 0.001 for t in placed["decode_tasks"]), placed
    held = json.loads(cluster.python(_HOLDERS).strip().splitlines()[-1])
    head = next(n["id"] for n in cluster.nodes() if n["head"])
    data_actors = [(name, node) for name, node in held["actors"] if name in ("_StatsActor", "_AutoscalingCoordinatorActor")]
    assert len(data_actors) == 2 and all(node == head[-5:] for _, node in data_actors), (data_actors, head)


@pytest.mark.autoscaler
@pytest.mark.timeout(1800)
def test_smoke_job_scales_up_from_zero_and_back(cluster, tmp_path):
    """`ray job submit` of jobs/smoke.yaml on a stand-in GPU of an A100 node with the new keys: the
    job's first stage starts on a freshly added node (the oneMKL failure's case), a gpu_8x and only
    that (no gpu_1x for the decode tasks or anything else of the job); it succeeds, its workers and
    decode tasks ask for what the keys say, and the node goes when idle."""
    assert workers_alive(cluster) == [], "the cluster starts with no worker node"
    t0 = time.monotonic()
    with NodeWatch(cluster, tmp_path / "nodes.log") as watch:
        done = cluster.run(["ray", "job", "submit", "--working-dir", ".", "--submission-id", "smoke", "--",
                            "jobs/smoke.yaml", *sets(["ray.accelerator_type=A100", f"ray.resources_per_worker.{FAKE_GPU}=1",
                                                      "ray.placement_strategy=SPREAD"])], timeout=JOB_TIMEOUT)
        ended, ended_at = time.monotonic(), time.time()
        waited = wait_for_no_workers(cluster, ended, SCALE_DOWN_LIMIT_S) if done.returncode == 0 else 0
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "oneMKL" not in out and "[paf-ray] summary:" in out
    print(f"smoke job: {ended - t0:.0f} s; no worker node {watch.down_after(ended_at, waited):+.0f} s after its end")
    assert watch.types == {"gpu_8x"}, watch.types  # the only node type with an A100

    placed = json.loads(cluster.python(_JOB_PLACEMENT, "smoke", cluster.gcs).strip().splitlines()[-1])
    worker_groups = [pg for pg in placed["placement_groups"] if "accelerator_type:A100" in pg["bundles"][0]]
    assert len(worker_groups) == 2, placed  # one per stage: ScalingConfig had the keys
    for pg in worker_groups:
        assert pg["strategy"] == "SPREAD", pg
        assert pg["bundles"] == [{"CPU": 1.0, FAKE_GPU: 1.0, "accelerator_type:A100": 0.001}], pg
    assert placed["decode_tasks"] and all(t.get("accelerator_type:A100") == 0.001 for t in placed["decode_tasks"]), placed

    # Every fake node unpacked the job's working_dir in a temp dir of its own (tests/fake_provider.py).
    package = "session_*/runtime_resources/working_dir_files/_ray_pkg_*/"
    assert list((cluster.dir / "ray").glob(package)) and list((cluster.dir / "nodes").glob("*/" + package))


@pytest.mark.autoscaler
@pytest.mark.timeout(900)
@pytest.mark.parametrize("change, key, largest", [
    ([f"ray.resources_per_worker.{FAKE_GPU}=16"], f"ray.resources_per_worker.{FAKE_GPU}=16", "largest: gpu_8x"),
    (["ray.accelerator_type=H100"], "ray.accelerator_type=H100", "largest node type: gpu_8x"),
])
def test_a_job_no_node_type_can_hold_fails_within_a_minute(cluster, change, key, largest):
    """Submitted without the pre-flight check, the job's driver fails in seconds (not after
    ray.worker_start_timeout_s) with one line naming the key and the largest node type, and no
    node is started for it. `--check` says the same before anything is submitted."""
    checked = cluster.run([sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", cluster.dashboard,
                           "--check", *sets(change)], timeout=120)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert key in checked.stderr and largest in checked.stderr, checked.stderr

    before = {n["id"] for n in cluster.nodes()}
    t0 = time.monotonic()
    done = cluster.run([sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", cluster.dashboard,
                        "--wait", "--no-check", *sets(change)], timeout=JOB_TIMEOUT)
    took = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-4000:]
    assert took < 60, f"the job took {took:.0f} s to fail:\n{out[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("paf-ray run: ")]
    assert len(lines) == 1 and key in lines[0] and largest in lines[0], out[-4000:]
    assert {n["id"] for n in cluster.nodes()} == before, "a node was started for a job that cannot run"
    print(f"infeasible job failed in {took:.0f} s: {lines[0]}")


@pytest.mark.autoscaler
@pytest.mark.timeout(600)
def test_preflight_reads_the_node_types_from_the_head(cluster):
    """With no worker node alive, `paf-ray submit --check` still knows gpu_1x and gpu_8x (from the
    autoscaler's config on the head): a GPU job fits no node type here (the stand-ins are FAKE_GPU),
    and local run storage on this multi-node cluster is an error."""
    done = cluster.run([sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", cluster.dashboard,
                        "--check", "--set", "ray.use_gpu=true"], timeout=120)
    assert done.returncode == 1
    assert re.search(r"ray\.gpus_per_worker=1: a training worker needs GPU 1, more than any node type .* "
                     r"\(largest: gpu_8x", done.stderr), done.stderr
    assert "error: ray.storage_path:" in done.stderr
    fits = cluster.run([sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", cluster.dashboard,
                        "--check", *GPU_JOB, "--set", f"ray.storage_path=s3://{BUCKET}/runs"], timeout=120)
    assert fits.returncode == 0, fits.stderr
    assert f"jobs/smoke.yaml fits the cluster at {cluster.dashboard}" in fits.stderr
    assert HEAD_TYPE not in fits.stderr
