"""The pre-flight check (paf_ray/cluster.py) over every job file x every cluster file, its one-line
verdicts per key, the new ray.* keys, and what the KubeRay RayJob sets. Offline: no Ray starts."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from paf_ray import cluster as clusters
from paf_ray.cli import main
from paf_ray.config import ConfigError, load_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CLUSTER_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "cluster", "*.yaml"))
                       + glob.glob(os.path.join(REPO, "cluster", "kuberay", "*.yaml")))
JOB_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "jobs", "*.yaml")))


@pytest.fixture(autouse=True)
def in_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # files are named as a user in the repo root names them


def job(rel: str, *overrides: str):
    return load_config(rel, list(overrides))


def cluster_file(rel: str) -> clusters.Cluster:
    return clusters.load_cluster_file(rel)


@pytest.mark.parametrize("cluster_rel", CLUSTER_FILES)
@pytest.mark.parametrize("job_rel", JOB_FILES)
def test_every_job_file_on_every_cluster_file(job_rel, cluster_rel):
    """The cluster jobs (storage and data in object storage) fit every cluster file with nothing to
    warn about; the single-machine jobs are refused only for their local run storage."""
    cfg = job(job_rel)
    found = clusters.check_job(cfg, cluster_file(cluster_rel))
    if clusters_ready(cfg):
        assert found == [], [str(f) for f in found]
    else:
        assert [(f.level, f.key) for f in found] == [("error", "ray.storage_path"), ("warning", "data.root")], found


def clusters_ready(cfg) -> bool:
    return bool(cfg.ray.storage_path and cfg.ray.storage_path.startswith("s3://"))


def test_the_cluster_files_are_read_as_their_node_types():
    aws = cluster_file("cluster/aws.yaml")
    assert [(t.name, t.head, t.max_workers) for t in aws.node_types] == [
        ("head", True, 1), ("gpu_8x", False, 2), ("gpu_1x", False, 16)]
    assert aws.node_types[2].resources == {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}
    assert aws.max_workers == 16
    kube = cluster_file("cluster/kuberay/raycluster.yaml")
    gpu1 = next(t for t in kube.node_types if t.name == "gpu-1x")
    assert gpu1.resources["CPU"] == 8 and gpu1.resources["GPU"] == 1 and gpu1.resources["accelerator_type:A10G"] == 1
    assert gpu1.resources["memory"] == pytest.approx(0.7 * 48 * 2**30) and gpu1.max_workers == 16
    assert next(t for t in kube.node_types if t.head).resources.get("CPU", 0) == 0


@pytest.mark.parametrize("overrides, key, says", [
    (["ray.cpus_per_worker=200"], "ray.cpus_per_worker",
     "ray.cpus_per_worker=200: a training worker needs CPU 200, more than any node type of cluster/aws.yaml offers "
     "(largest: gpu_8x with CPU 96"),
    (["ray.gpus_per_worker=16"], "ray.gpus_per_worker", "needs GPU 16, more than any node type of cluster/aws.yaml "
     "offers (largest: gpu_8x with GPU 8"),
    (["ray.accelerator_type=H100"], "ray.accelerator_type",
     "ray.accelerator_type=H100: no node type of cluster/aws.yaml has that accelerator (accelerator types there: A100, "
     "A10G; largest node type: gpu_8x"),
    (["ray.resources_per_worker.TPU=4"], "ray.resources_per_worker.TPU", "ray.resources_per_worker.TPU=4: a training "
     "worker needs TPU 4"),
    (["ray.cpus_per_worker=32", "ray.accelerator_type=A10G"], "ray.accelerator_type",
     "accelerator_type:A10G: 0.001} on one node (largest: gpu_8x"),
])
def test_a_worker_no_node_type_holds_is_one_line_naming_the_key_and_the_largest_type(overrides, key, says):
    cfg = job("jobs/adapt.yaml", *overrides)
    (found,) = [f for f in clusters.check_job(cfg, cluster_file("cluster/aws.yaml")) if f.level == "error"]
    assert found.key == key and says in found.message and "\n" not in found.message, found.message


def test_more_workers_than_max_workers_allow():
    cfg = job("jobs/adapt.yaml", "ray.num_workers=17")
    (found,) = clusters.check_job(cfg, cluster_file("cluster/kuberay/rayjob.yaml"))
    assert (found.level, found.key) == ("error", "ray.num_workers")
    assert "allow 16 (gpu-8x: 8 per node x 2)" in found.message
    # the launcher file's cluster-wide max_workers caps the node count across types
    aws = cluster_file("cluster/aws.yaml")
    aws.max_workers = 1
    (found,) = clusters.check_job(job("jobs/adapt.yaml", "ray.num_workers=9"), aws)
    assert "at most 1 worker nodes in all" in found.message


def test_data_cpus_beside_the_workers():
    # Pinned to the A10G nodes (8 CPUs each) with 8 CPUs per worker: nothing left to decode with.
    cfg = job("jobs/adapt.yaml", "ray.accelerator_type=A10G", "ray.cpus_per_worker=8")
    (found,) = clusters.check_job(cfg, cluster_file("cluster/aws.yaml"))
    assert (found.level, found.key) == ("error", "data.cpus") and "lower ray.cpus_per_worker" in found.message
    # Not pinned: other node types' CPUs can decode; fewer CPUs than data.cpus beside the workers is a warning.
    cfg = job("jobs/adapt.yaml", "ray.cpus_per_worker=11")
    (found,) = clusters.check_job(cfg, cluster_file("cluster/aws.yaml"))
    assert (found.level, found.key) == ("warning", "data.cpus") and "8 CPU(s) are left" in found.message


def test_a_sweep_whose_concurrent_trials_do_not_all_fit_is_warned_about():
    cfg = job("jobs/tune.yaml", "tune.max_concurrent_trials=40")
    found = clusters.check_job(cfg, cluster_file("cluster/kuberay/raycluster.yaml"))
    assert [(f.level, f.key) for f in found][:1] == [("warning", "tune.max_concurrent_trials")], found
    assert "only 32 trials' workers fit at once" in found[0].message  # 16 gpu-1x nodes x 1 + 2 gpu-8x x 8


def test_cluster_check_command(capsys):
    assert main(["cluster", "check", "cluster/aws.yaml", "jobs/paf.yaml"]) == 0
    assert "jobs/paf.yaml fits cluster/aws.yaml" in capsys.readouterr().out
    assert main(["cluster", "check", "cluster/gcp.yaml", "jobs/paf.yaml", "--set", "ray.accelerator_type=A10G"]) == 1
    out = capsys.readouterr().out
    assert "error: ray.accelerator_type: ray.accelerator_type=A10G: no node type of cluster/gcp.yaml" in out
    assert "accelerator types there: A100, L4" in out
    assert main(["cluster", "check", "jobs/paf.yaml", "jobs/paf.yaml"]) == 2  # not a cluster file
    assert "not a cluster file" in capsys.readouterr().err


def test_the_new_keys_make_the_bundle_the_trial_and_the_decode_tasks():
    from paf_ray.tune.search import trial_resources

    cfg = job("jobs/tune.yaml", "ray.accelerator_type=A100", "ray.resources_per_worker.memory=34359738368",
              "ray.placement_strategy=SPREAD")
    assert clusters.worker_resources(cfg.ray) == {"CPU": 4.0, "GPU": 1.0, "memory": 34359738368.0}
    assert clusters.worker_bundle(cfg.ray) == {"CPU": 4.0, "GPU": 1.0, "memory": 34359738368.0,
                                               "accelerator_type:A100": 0.001}
    assert trial_resources(cfg) == {"cpu": 0.01, "accelerator_type:A100": 0.001}
    assert clusters.pinned_resources(cfg.ray) == {"accelerator_type:A100": 0.001}
    assert cfg.ray.placement_strategy == "SPREAD"
    assert trial_resources(job("jobs/tune.yaml")) == {"cpu": 0.01}


@pytest.mark.parametrize("override, says", [
    ("ray.resources_per_worker.CPU=2", "ray.resources_per_worker.CPU: set ray.cpus_per_worker instead"),
    ("ray.resources_per_worker.GPU=2", "ray.resources_per_worker.GPU: set ray.gpus_per_worker instead"),
    ("ray.resources_per_worker.accelerator_type:A100=1", "set ray.accelerator_type: A100 instead"),
    ("ray.placement_strategy=STRICT", "ray.placement_strategy: expected 'PACK' | 'SPREAD'"),
])
def test_the_new_keys_are_checked(override, says):
    with pytest.raises(ConfigError, match=says.replace("|", r"\|")):
        job("jobs/adapt.yaml", override)


def test_the_autoscaler_config_is_read_from_its_log_line():
    lines = ["2026-12-07 17:49:16,079\tINFO autoscaler.py:361 -- StandardAutoscaler: {'cluster_name': 'x', "
             "'max_workers': 3, 'head_node_type': 'h', 'available_node_types': {'h': {'resources': {'CPU': 0}, "
             "'max_workers': 0}, 'w': {'resources': {'CPU': 4, 'GPU': 1}, 'max_workers': 3, 'min_workers': 0}}, "
             "'provider': {'type': 'aws', 'use_node_id_as_ip': True}}\n", "Resources\n"]
    config = clusters.autoscaler_config_from_log(lines)
    found = clusters.launcher_cluster(config, "live")
    assert [(t.name, t.resources, t.max_workers) for t in found.worker_types] == [("w", {"CPU": 4, "GPU": 1}, 3)]
    assert clusters.autoscaler_config_from_log(["no config here\n"]) is None


# --------------------------------------------------------------------------- the cluster files


@pytest.mark.parametrize("rel", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_gpu_node_types_name_their_accelerator(rel):
    cfg = yaml.safe_load(open(os.path.join(REPO, rel), encoding="utf-8"))
    for name, spec in cfg["available_node_types"].items():
        if spec["resources"].get("GPU"):
            accelerators = [k for k in spec["resources"] if k.startswith("accelerator_type:")]
            assert len(accelerators) == 1 and spec["resources"][accelerators[0]] == 1, name


def test_kuberay_groups_name_their_accelerator():
    for rel in ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"):
        for t in cluster_file(rel).worker_types:
            assert [k for k in t.resources if k.startswith("accelerator_type:")], (rel, t.name)


def test_rayjob_lifecycle_and_the_job_files_runtime_env():
    manifest = yaml.safe_load(open(os.path.join(REPO, "cluster/kuberay/rayjob.yaml"), encoding="utf-8"))
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["submitterConfig"]["backoffLimit"] >= 0
    paf = job(spec["entrypoint"].split("./")[-1].split()[0])  # the job file the entrypoint runs
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == paf.job.runtime_env
    assert spec["entrypointNumCpus"] == paf.job.entrypoint_num_cpus
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster_spec["authOptions"]["mode"] == "token"


def test_unknown_node_types_make_a_misfit_a_warning():
    """Only the alive nodes seen (an autoscaler whose node types are not readable, e.g. KubeRay's):
    the head alone holds no worker, but the autoscaler may add one, so nothing is refused."""
    head_only = clusters.Cluster("live", [clusters.NodeType("head", {"CPU": 0.0}, 1, head=True)],
                                 notes=["no autoscaler node types found"])
    found = clusters.check_job(job("jobs/paf.yaml"), head_only)
    assert [f.level for f in found] == ["warning", "warning"], found
