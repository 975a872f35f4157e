"""The cluster files: Ray's own launcher schema + config preparation, the KubeRay CRD schemas,
and our rules (CPU-only head, GPU groups from 0, object-storage runs, no Ray port on the
internet, token auth on). All offline: the launcher schema ships in the ray wheel,
the KubeRay CRDs in tests/data/kuberay-crds."""

from __future__ import annotations

import copy
import json
import os
import re
import stat

import jsonschema
import pytest
import yaml

from paf_ray.config import load_config
from paf_ray.jobs import known_runtime_env_keys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CRD_DIR = os.path.join(REPO, "tests", "data", "kuberay-crds")
LAUNCHER_FILES = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY_FILES = {"cluster/kuberay/raycluster.yaml": "ray.io_rayclusters.yaml", "cluster/kuberay/rayjob.yaml": "ray.io_rayjobs.yaml"}
RAY_PORTS = (8265, 6379, 10001)  # dashboard / Jobs API, GCS, Ray client
OPEN_WORLD = ("0.0.0.0/0", "::/0")
URI = re.compile(r"^(s3|gs|gcs|abfss?|hdfs)://[^/\s]+")


def read_yaml(rel: str):
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------- launcher


def launcher_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"), encoding="utf-8") as f:
        return json.load(f)


def validate_launcher(cfg: dict) -> dict:
    """Ray's own checks, offline: the schema, then the defaults merge + validation `ray up` runs."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, launcher_schema())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_file_passes_rays_validation(rel):
    prepared = validate_launcher(read_yaml(rel))
    # Our explicit setup replaces Ray's default (a nightly wheel install) on every node.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "paf_ray" in c for c in prepared[key]), key
        assert not any("ray-wheels" in c for c in prepared[key]), key


def test_launcher_validation_catches_mistakes():
    cfg = read_yaml("cluster/aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(bad)
    bad = copy.deepcopy(cfg)
    bad["idle_timeout"] = 5  # not a launcher key
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(bad)


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_file_follows_our_rules(rel):
    cfg = read_yaml(rel)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, "the head runs no training"

    gpu_types = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpus_per_node = sorted(t["resources"]["GPU"] for t in gpu_types.values())
    assert 1 in gpus_per_node and 8 in gpus_per_node, gpus_per_node
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{rel}: {name} must scale from 0"
        assert t["max_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0

    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-gpu", cfg["docker"]["image"])
    assert any("pip install" in c and "paf_ray" in c for c in cfg["setup_commands"])
    # The repo synced to the nodes keeps every package folder (paf_ray/data too).
    assert "/home/ray/paf_ray" in cfg["file_mounts"]
    assert all(e.startswith(("/", ".", "**")) for e in cfg["rsync_exclude"]), cfg["rsync_exclude"]
    assert "data" not in cfg["rsync_exclude"] and not cfg.get("rsync_filter")

    # Token auth on every node, the dashboard only on the head's loopback (reached by `ray dashboard`).
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert any(target.endswith(".ray/auth_token") for target in cfg["file_mounts"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))


def test_aws_security_group_opens_no_ray_port_to_the_internet():
    rules = read_yaml("cluster/aws.yaml")["provider"]["security_group"]["IpPermissions"]
    assert rules, "the security group must be explicit"
    for rule in rules:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if any(c in OPEN_WORLD for c in cidrs):
            for port in RAY_PORTS:
                assert not _covers(rule, port), f"port {port} open to the internet: {rule}"


def test_no_cluster_file_opens_ray_ports_to_the_internet():
    for root, _, files in os.walk(os.path.join(REPO, "cluster")):
        for name in files:
            text = open(os.path.join(root, name), encoding="utf-8").read()
            rel = os.path.relpath(os.path.join(root, name), REPO)
            assert "LoadBalancer" not in text and "NodePort" not in text, rel
            for line in text.splitlines():
                if any(w in line for w in OPEN_WORLD) and not line.lstrip().startswith("#"):
                    assert not any(str(p) in line for p in RAY_PORTS), f"{rel}: {line}"


# --------------------------------------------------------------------------- KubeRay


def crd_schema(crd_file: str) -> dict:
    with open(os.path.join(CRD_DIR, crd_file), encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_keys(value, schema: dict, where: str = "") -> list[str]:
    """Keys the API server would prune silently: absent from a closed object's `properties`."""
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key, sub in value.items():
                if key in props:
                    found += unknown_keys(sub, props[key], f"{where}.{key}")
                elif isinstance(extra, dict):
                    found += unknown_keys(sub, extra, f"{where}.{key}")
                elif extra is not True:
                    found.append(f"{where}.{key}")
        elif isinstance(extra, dict):
            for key, sub in value.items():
                found += unknown_keys(sub, extra, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_keys(item, schema["items"], f"{where}[{i}]")
    return found


def schema_problems(manifest: dict, crd_file: str) -> list[str]:
    schema = crd_schema(crd_file)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    return errors + [f"unknown key {k}" for k in unknown_keys(manifest, schema)]


@pytest.mark.parametrize("rel", sorted(KUBERAY_FILES))
def test_kuberay_manifest_matches_the_crd(rel):
    assert schema_problems(read_yaml(rel), KUBERAY_FILES[rel]) == []


def test_kuberay_validation_catches_mistakes():
    manifest = read_yaml("cluster/kuberay/raycluster.yaml")
    bad = copy.deepcopy(manifest)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 0  # typo: pruned silently by the API server
    del bad["spec"]["workerGroupSpecs"][1]["groupName"]
    problems = "\n".join(schema_problems(bad, "ray.io_rayclusters.yaml"))
    assert "num-cpus" in problems and "minReplica" in problems and "groupName" in problems


def cluster_spec(rel: str) -> dict:
    manifest = read_yaml(rel)
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


@pytest.mark.parametrize("rel", sorted(KUBERAY_FILES))
def test_kuberay_cluster_follows_our_rules(rel):
    spec = cluster_spec(rel)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    for container in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container["resources"].get(part, {}), "the head has no GPUs"
        assert container["resources"]["requests"] and container["resources"]["limits"]

    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0, group["groupName"]
        pod = group["template"]["spec"]
        shm_volumes = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            res = container["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/dev/shm") in shm_volumes, "shared memory must be a memory-backed volume"


def test_rayjob_runs_the_paf_job_file_with_object_storage():
    manifest = read_yaml("cluster/kuberay/rayjob.yaml")
    entrypoint = manifest["spec"]["entrypoint"]
    assert "jobs/paf.yaml" in entrypoint
    storage = re.search(r"ray\.storage_path=(\S+)", entrypoint)
    assert storage and URI.match(storage.group(1)), entrypoint
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= known_runtime_env_keys()
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True


# --------------------------------------------------------------------------- job files


JOB_FILES = sorted(f"jobs/{n}" for n in os.listdir(os.path.join(REPO, "jobs")) if n.endswith(".yaml"))
CLUSTER_JOBS = [f for f in JOB_FILES
                if os.path.basename(f) in ("paf.yaml", "paf_lane.yaml", "adapt.yaml", "finetune.yaml", "tune.yaml")]


@pytest.mark.parametrize("rel", JOB_FILES)
def test_job_file_is_an_executable_config(rel):
    path = os.path.join(REPO, rel)
    cfg = load_config(path)
    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\n")
    command = cfg.command if cfg.command in ("tune", "study") else "run"
    if cfg.command != "demo":
        assert first == f"#!/usr/bin/env -S python -m paf_ray {command}", first
        assert os.stat(path).st_mode & stat.S_IXUSR, f"{rel} must be executable (chmod +x)"
    assert set(cfg.job.runtime_env) <= known_runtime_env_keys(), rel


@pytest.mark.parametrize("rel", CLUSTER_JOBS)
def test_cluster_job_files_store_runs_in_object_storage(rel):
    cfg = load_config(os.path.join(REPO, rel))
    assert cfg.ray.storage_path and URI.match(cfg.ray.storage_path), f"{rel}: ray.storage_path={cfg.ray.storage_path!r}"


def test_the_expected_job_files_exist():
    names = {os.path.basename(f) for f in JOB_FILES}
    assert {"smoke.yaml", "paf.yaml", "tune.yaml"} <= names


@pytest.mark.parametrize("rel", [f for f in JOB_FILES if load_config(os.path.join(REPO, f)).command == "tune"])
def test_tune_job_files_have_a_valid_search_space(rel):
    from paf_ray.tune.space import parse_space

    assert parse_space(load_config(os.path.join(REPO, rel)).tune)
