"""Does a job fit a cluster? The pre-flight check, and the fast failure of a stage that never could.

A cluster is described by its node types, each with the resources one node offers and how many
such nodes the autoscaler may start. They come from a cluster file (the Ray cluster launcher's
YAML, or a KubeRay RayCluster/RayJob manifest) or from a live cluster: its alive nodes, read
through the dashboard, plus the node types its autoscaler works with, which the autoscaler writes
to its log on the head when it (re)loads its config (`StandardAutoscaler: {...}` in
`monitor.log`; Ray 2.60's autoscaler for `ray up` clusters).

`check_job` tells, before anything is submitted, whether:
- the training workers' bundle (`ray.cpus_per_worker`, `ray.gpus_per_worker`,
  `ray.resources_per_worker`, `ray.accelerator_type`) fits some node type;
- `ray.num_workers` of them fit the nodes the node types' `max_workers` allow (for a sweep:
  `tune.max_concurrent_trials` times that);
- the run storage is a URI every node reaches, when the cluster has more than one node;
- CPUs are left for Ray Data beside the training workers (`data.cpus`).

`check_workers_can_start` is what a driver runs before it asks Ray Train for workers: a bundle no
node type can hold fails at once, naming the key and the largest node type. The autoscaler itself
reports such a bundle ("No available node types can fulfill resource request", from Ray Train's
request_resources), but Ray Train waits `ray.worker_start_timeout_s` regardless.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import yaml

from paf_ray.config import Config, ConfigError, RayConfig, load_config
from paf_ray.runtime import storage
from paf_ray.runtime.auth import auth_headers

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource of a node with that accelerator (1 per node)
ACCELERATOR_AMOUNT = 0.001  # what Ray Train asks of it per worker (ScalingConfig.accelerator_type)
NODE_GROUP_LABEL = "ray.io/node-group"  # the node type a node was started as (autoscaler, KubeRay)
AUTOSCALER_CONFIG_LINE = "StandardAutoscaler: {"  # how the autoscaler logs the config it runs with
EPS = 1e-9


class WorkersCannotStartError(RuntimeError):
    """No node type of the cluster can hold one training worker: waiting would never end."""


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]  # what one node offers: CPU, GPU, memory (bytes), custom resources
    max_workers: int  # how many such nodes there may be (the head: 1)
    head: bool = False


@dataclass
class Cluster:
    source: str  # the file, or the live cluster's address
    node_types: list[NodeType]
    max_workers: Optional[int] = None  # the cluster-wide cap on worker nodes
    notes: list[str] = field(default_factory=list)  # what could not be read

    @property
    def worker_types(self) -> list[NodeType]:
        return [t for t in self.node_types if not t.head and t.max_workers > 0]

    @property
    def multi_node(self) -> bool:
        """More than one node, now or after scaling up: the nodes do not share a disk."""
        return sum(t.max_workers for t in self.node_types) > 1


@dataclass
class Finding:
    level: str  # "error": the job cannot run as configured; "warning": it runs, but not as one would expect
    key: str  # the config key to change
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


# --------------------------------------------------------------------------- what a job asks for


def worker_resources(ray_cfg: RayConfig) -> dict[str, float]:
    """ScalingConfig.resources_per_worker: CPUs, GPUs (with ray.use_gpu) and ray.resources_per_worker."""
    resources = {"CPU": float(ray_cfg.cpus_per_worker)}
    if ray_cfg.use_gpu:
        resources["GPU"] = float(ray_cfg.gpus_per_worker)
    resources.update({k: float(v) for k, v in ray_cfg.resources_per_worker.items()})
    return resources


def worker_bundle(ray_cfg: RayConfig) -> dict[str, float]:
    """The resources of one training worker as Ray Train asks for them (ScalingConfig adds a sliver
    of the accelerator type's resource)."""
    bundle = worker_resources(ray_cfg)
    if ray_cfg.accelerator_type:
        bundle[ACCELERATOR_PREFIX + ray_cfg.accelerator_type] = ACCELERATOR_AMOUNT
    return {k: v for k, v in bundle.items() if v > 0}


def pinned_resources(ray_cfg: RayConfig) -> dict[str, float]:
    """What the processes beside the training workers (a Tune trial, Ray Data's decode tasks)
    also ask for: a sliver of the accelerator type's resource, so that they run on, and scale up,
    nodes of that type only, never a node of another type for a trial or for decoding."""
    if not ray_cfg.accelerator_type:
        return {}
    return {ACCELERATOR_PREFIX + ray_cfg.accelerator_type: ACCELERATOR_AMOUNT}


def resource_key(resource: str) -> str:
    """The config key that asks for `resource` per worker."""
    if resource == "CPU":
        return "ray.cpus_per_worker"
    if resource == "GPU":
        return "ray.gpus_per_worker"
    if resource.startswith(ACCELERATOR_PREFIX):
        return "ray.accelerator_type"
    return f"ray.resources_per_worker.{resource}"


def format_resources(resources: dict[str, float]) -> str:
    def amount(k: str, v: float) -> str:
        if k in ("memory", "object_store_memory"):
            return f"{v / 2**30:.3g} GiB"
        return f"{v:g}"

    shown = {k: v for k, v in resources.items() if k != "object_store_memory" and not k.startswith("node:")}
    return "{" + ", ".join(f"{k}: {amount(k, v)}" for k, v in sorted(shown.items())) + "}"


def _key_value(ray_cfg: RayConfig, resource: str) -> str:
    key = resource_key(resource)
    if resource == "CPU":
        return f"{key}={ray_cfg.cpus_per_worker:g}"
    if resource == "GPU":
        return f"{key}={ray_cfg.gpus_per_worker:g}"
    if resource.startswith(ACCELERATOR_PREFIX):
        return f"{key}={ray_cfg.accelerator_type}"
    return f"{key}={ray_cfg.resources_per_worker.get(resource, 0):g}"


# --------------------------------------------------------------------------- fitting


def _known(offer: dict[str, float], bundle: dict[str, float]) -> dict[str, float]:
    """The bundle without `memory` when the node type does not say (launcher files usually leave
    it to the cloud provider's instance type)."""
    return {k: v for k, v in bundle.items() if k != "memory" or "memory" in offer}


def fits(offer: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(offer.get(k, 0.0) + EPS >= v for k, v in _known(offer, bundle).items())


def workers_per_node(offer: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles one node holds."""
    counts = [math.floor((offer.get(k, 0.0) + EPS) / v) for k, v in _known(offer, bundle).items() if v > 0]
    return max(0, min(counts)) if counts else 0


def largest(types: list[NodeType], resource: str | None = None) -> NodeType | None:
    """The node type with most of `resource` (default: most CPUs, then GPUs)."""
    if not types:
        return None
    if resource:
        return max(types, key=lambda t: (t.resources.get(resource, 0.0), t.resources.get("CPU", 0.0)))
    return max(types, key=lambda t: (t.resources.get("CPU", 0.0), t.resources.get("GPU", 0.0)))


def unfit_reason(ray_cfg: RayConfig, bundle: dict[str, float], cluster: Cluster) -> tuple[str, str]:
    """(the config key, one line) saying why no node type holds one worker, naming the largest node type."""
    types = [t for t in cluster.node_types if t.max_workers > 0]
    if not types:
        return "ray.num_workers", f"{cluster.source} has no node type"
    # A resource that no single node type has enough of names its key; else it is the combination.
    for resource, amount in sorted(bundle.items(), key=lambda kv: kv[0] != "CPU"):
        best = largest(types, resource)
        have = best.resources.get(resource, 0.0)
        if have + EPS >= amount or (resource == "memory" and "memory" not in best.resources):
            continue
        if resource.startswith(ACCELERATOR_PREFIX):
            offered = sorted({k[len(ACCELERATOR_PREFIX):] for t in types for k in t.resources
                              if k.startswith(ACCELERATOR_PREFIX)})
            return resource_key(resource), (
                f"{_key_value(ray_cfg, resource)}: no node type of {cluster.source} has that accelerator "
                f"(accelerator types there: {', '.join(offered) or 'none'}; largest node type: "
                f"{largest(types).name} {format_resources(largest(types).resources)})")
        return resource_key(resource), (
            f"{_key_value(ray_cfg, resource)}: a training worker needs {resource} {amount:g}, more than any node "
            f"type of {cluster.source} offers (largest: {best.name} with {resource} {have:g}, "
            f"{format_resources(best.resources)})")
    keys = " + ".join(_key_value(ray_cfg, r) for r in sorted(bundle))
    best = largest(types)
    narrowest = min(bundle, key=lambda r: (not r.startswith(ACCELERATOR_PREFIX), r in ("CPU", "GPU"), r == "CPU"))
    return resource_key(narrowest), (
        f"{keys}: no node type of {cluster.source} has all of {format_resources(bundle)} on one node "
        f"(largest: {best.name} {format_resources(best.resources)})")


def fitting_types(cluster: Cluster, bundle: dict[str, float]) -> list[NodeType]:
    return [t for t in cluster.node_types if t.max_workers > 0 and fits(t.resources, bundle)]


def placement(cluster: Cluster, bundle: dict[str, float], workers: int) -> list[tuple[NodeType, int, int]]:
    """Where `workers` bundles go, as (node type, nodes, workers on them): node types holding the
    most per node first, nodes capped by their max_workers and the cluster's. Fewer workers than
    asked when they do not all fit."""
    nodes_left = cluster.max_workers if cluster.max_workers is not None else sys.maxsize
    plan = []
    for t in sorted(fitting_types(cluster, bundle), key=lambda t: -workers_per_node(t.resources, bundle)):
        per_node = workers_per_node(t.resources, bundle)
        if workers <= 0 or nodes_left <= 0 or per_node <= 0:
            break
        nodes = min(t.max_workers, nodes_left, math.ceil(workers / per_node))
        placed = min(workers, nodes * per_node)
        plan.append((t, nodes, placed))
        workers -= placed
        nodes_left -= nodes
    return plan


def worker_capacity(cluster: Cluster, bundle: dict[str, float]) -> int:
    """The most training workers the cluster can hold at once."""
    return sum(placed for _, _, placed in placement(cluster, bundle, sys.maxsize))


def check_job(cfg: Config, cluster: Cluster) -> list[Finding]:
    """Everything that keeps `cfg` from running on `cluster` (errors), or from running as expected (warnings)."""
    found: list[Finding] = [Finding("warning", "cluster", note) for note in cluster.notes]
    # Node types unknown (only the alive nodes seen): an autoscaler may still add what is missing.
    unsure = "warning" if cluster.notes else "error"
    ray_cfg = cfg.ray
    sweep = cfg.command in ("tune", "study")
    concurrent = max(1, cfg.tune.max_concurrent_trials) if sweep else 1

    if ray_cfg.num_workers > 0:
        bundle = worker_bundle(ray_cfg)
        hosts = fitting_types(cluster, bundle)
        if not hosts:
            found.append(Finding(unsure, *unfit_reason(ray_cfg, bundle, cluster)))
        else:
            capacity = worker_capacity(cluster, bundle)
            caps = ", ".join(f"{t.name}: {workers_per_node(t.resources, bundle)} per node x {t.max_workers}"
                             for t in hosts)
            if cluster.max_workers is not None:
                caps += f"; at most {cluster.max_workers} worker nodes in all"
            if capacity < ray_cfg.num_workers:
                found.append(Finding(unsure, "ray.num_workers",
                                     f"{ray_cfg.num_workers} workers of {format_resources(bundle)}, but the node types' "
                                     f"max_workers allow {capacity} ({caps})"))
            else:
                fit_trials = min(concurrent, capacity // ray_cfg.num_workers)
                if fit_trials < concurrent:
                    found.append(Finding("warning", "tune.max_concurrent_trials",
                                         f"{concurrent} trials x {ray_cfg.num_workers} workers, but only {fit_trials} "
                                         f"trials' workers fit at once ({caps}); the others wait for them, each up to "
                                         f"ray.worker_start_timeout_s={ray_cfg.worker_start_timeout_s:g} s"))
                found += [Finding(unsure if f.level == "error" else f.level, f.key, f.message)
                          for f in _data_cpu_findings(cfg, cluster, bundle, fit_trials)]

    if cluster.multi_node:
        store = ray_cfg.storage_path
        if not store or not storage.is_remote(store):
            found.append(Finding("error", "ray.storage_path",
                                 f"{store or 'null (~/paf_ray_runs on the driver node)'} is not a URI: {cluster.source} "
                                 "has more than one node and each has its own disk; give object storage every node "
                                 "can write (s3://BUCKET/runs, gs://BUCKET/runs)"))
        root = cfg.data.root
        if not root or not storage.is_remote(root):
            what = f"{root} is a path" if root else "null generates the synthetic data set"
            found.append(Finding("warning", "data.root",
                                 f"{what} on the node that runs the driver; the training workers on other nodes read "
                                 "the frames from their own disks: give a URI (s3://..., gs://...) or the same path on every node"))
    return found


def _data_cpu_findings(cfg: Config, cluster: Cluster, bundle: dict[str, float], trials: int) -> list[Finding]:
    """CPUs for Ray Data beside the workers of `trials` runs: on the nodes that hold them, and,
    unless the decode tasks are pinned to an accelerator type, on nodes of the other types."""
    from paf_ray.data.pipeline import map_cpus

    workers = cfg.ray.num_workers * trials
    plan = placement(cluster, bundle, workers)
    used = {t.name for t, _, _ in plan}
    spare = sum(nodes * t.resources.get("CPU", 0.0) for t, nodes, _ in plan) - workers * bundle.get("CPU", 0.0)
    pinned = bool(cfg.ray.accelerator_type)
    elsewhere = 0.0 if pinned else sum(t.resources.get("CPU", 0.0) * t.max_workers for t in cluster.worker_types
                                       if t.name not in used)
    need = cfg.data.cpus * trials
    hosts = ", ".join(f"{nodes} x {t.name}" for t, nodes, _ in plan)
    if spare + elsewhere + EPS < map_cpus(cfg.data):
        return [Finding("error", "data.cpus",
                        f"no CPU is left for Ray Data beside {workers} training worker(s) of {format_resources(bundle)} "
                        f"on {hosts}" + (" (decoding runs on the ray.accelerator_type nodes only)" if pinned else "")
                        + ": lower ray.cpus_per_worker")]
    if spare + EPS < need:
        return [Finding("warning", "data.cpus",
                        f"data.cpus={cfg.data.cpus:g}{f' x {trials} trials' if trials > 1 else ''}, but {spare:g} "
                        f"CPU(s) are left beside the training workers on {hosts}"
                        + ("; the rest runs on other nodes, which the autoscaler may add for it" if elsewhere else ""))]
    return []


# --------------------------------------------------------------------------- cluster files


def _quantity(text: Any) -> float:
    """A Kubernetes quantity: 8, "500m", "16Gi", "1.5G"."""
    s = str(text).strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def launcher_cluster(cfg: dict, source: str) -> Cluster:
    """A Ray cluster launcher file (`ray up`), or the autoscaler config it becomes on the head."""
    head_name = cfg.get("head_node_type")
    types = []
    for name, spec in (cfg.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        head = name == head_name
        types.append(NodeType(name, resources, 1 if head else int(spec.get("max_workers", 0)), head=head))
    return Cluster(source, types, max_workers=cfg.get("max_workers"))


def _ray_start_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources: a JSON object in a string, often quoted once more ('"{\\"A\\": 1}"')."""
    text = params.get("resources")
    if not text:
        return {}
    value = json.loads(text) if isinstance(text, str) else text
    if isinstance(value, str):
        value = json.loads(value)
    return {k: float(v) for k, v in value.items()}


def _group_resources(group: dict) -> dict[str, float]:
    """What one pod of a KubeRay group offers to Ray: rayStartParams first, else the container limits."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    limits = {**(container.get("resources", {}).get("requests") or {}), **(container.get("resources", {}).get("limits") or {})}
    resources: dict[str, float] = {}
    if "num-cpus" in params:
        resources["CPU"] = float(params["num-cpus"])
    elif "cpu" in limits:
        resources["CPU"] = float(math.floor(_quantity(limits["cpu"]) + EPS))
    if "num-gpus" in params:
        resources["GPU"] = float(params["num-gpus"])
    elif "nvidia.com/gpu" in limits:
        resources["GPU"] = _quantity(limits["nvidia.com/gpu"])
    if "memory" in limits:  # Ray keeps 30% of a pod's memory for its object store by default
        resources["memory"] = 0.7 * _quantity(limits["memory"])
    resources.update(_ray_start_resources(params))
    return {k: v for k, v in resources.items() if v > 0}


def kuberay_cluster(manifest: dict, source: str) -> Cluster:
    """A KubeRay RayCluster, or the cluster a RayJob creates."""
    spec = manifest["spec"]["rayClusterSpec"] if manifest.get("kind") == "RayJob" else manifest["spec"]
    types = [NodeType("head", _group_resources(spec["headGroupSpec"]), 1, head=True)]
    for group in spec.get("workerGroupSpecs") or []:
        types.append(NodeType(group["groupName"], _group_resources(group), int(group.get("maxReplicas", 0))))
    return Cluster(source, types)


def load_cluster_file(path: str | os.PathLike) -> Cluster:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    source = os.fspath(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: not a cluster file (expected a mapping)")
    if doc.get("kind") in ("RayCluster", "RayJob"):
        return kuberay_cluster(doc, source)
    if "available_node_types" in doc:
        return launcher_cluster(doc, source)
    raise ConfigError(f"{source}: not a cluster file: no available_node_types (Ray cluster launcher) "
                      "and not a KubeRay RayCluster/RayJob")


# --------------------------------------------------------------------------- a live cluster


def _dashboard_get(url: str, headers: dict[str, str], timeout: float = 15.0):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _dashboard_json(url: str, headers: dict[str, str]) -> dict:
    with _dashboard_get(url, headers) as reply:
        return json.loads(reply.read().decode("utf-8"))


def autoscaler_config_from_log(lines: Iterable[str]) -> Optional[dict]:
    """The last config the autoscaler logged (`StandardAutoscaler: {...}`, a Python literal)."""
    found = None
    for line in lines:
        at = line.find(AUTOSCALER_CONFIG_LINE)
        if at >= 0:
            try:
                found = ast.literal_eval(line[at + len(AUTOSCALER_CONFIG_LINE) - 1:].strip())
            except (ValueError, SyntaxError):
                continue
    return found


def _head_autoscaler_config(dashboard: str, headers: dict[str, str], head_id: str) -> Optional[dict]:
    """From the head's monitor.log: its newest lines, else the line the autoscaler wrote at its start."""
    base = f"{dashboard}/api/v0/logs/file?node_id={head_id}&filename=monitor.log"

    def lines(count: int):
        with _dashboard_get(f"{base}&lines={count}", headers) as reply:
            for raw in reply:
                yield raw.decode("utf-8", errors="replace")

    try:
        config = autoscaler_config_from_log(lines(5000))
        if config is None:
            for line in lines(-1):  # the whole log, up to the config the autoscaler started with
                config = autoscaler_config_from_log([line])
                if config is not None:
                    break
        return config
    except OSError:
        return None


def live_cluster(dashboard: str, headers: dict[str, str] | None = None) -> Cluster:
    """The alive nodes of a running cluster and its autoscaler's node types, through its dashboard."""
    headers = headers or {}
    dashboard = dashboard.rstrip("/")
    if "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    reply = _dashboard_json(f"{dashboard}/api/v0/nodes?limit=10000&detail=1", headers)
    nodes = [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]
    head = next((n for n in nodes if n.get("is_head_node")), None)
    config = _head_autoscaler_config(dashboard, headers, head["node_id"]) if head else None
    if config and (config.get("provider") or {}).get("type") == "readonly":
        cluster = Cluster(f"the cluster at {dashboard}", [])  # no autoscaler: the alive nodes are all there is
    elif config:
        cluster = launcher_cluster(config, f"the cluster at {dashboard}")
    else:
        cluster = Cluster(f"the cluster at {dashboard}", [])
        cluster.notes.append(f"no autoscaler node types found on the head of {dashboard} (no `ray up` autoscaler log): "
                             "checked against the alive nodes only; pass --cluster FILE to check the node types")
    # Alive nodes that are not of a known node type (a cluster without an autoscaler, nodes joined by
    # hand) count as node types of their own: one per node group label, else per resource shape.
    known = {t.name for t in cluster.node_types}
    alive: dict[str, NodeType] = {}
    for n in nodes:
        resources = {k: float(v) for k, v in (n.get("resources_total") or {}).items() if not k.startswith("node:")}
        head = bool(n.get("is_head_node"))
        if (head and any(t.head for t in cluster.node_types)) or any(_is_of_type(t, resources) for t in cluster.node_types):
            continue
        group = (n.get("labels") or {}).get(NODE_GROUP_LABEL) or ("head" if head else format_resources(resources))
        if group in known:
            continue
        if group in alive:
            alive[group].max_workers += 1
        else:
            alive[group] = NodeType(group, resources, 1, head=head)
    cluster.node_types += list(alive.values())
    return cluster


def _is_of_type(node_type: NodeType, resources: dict[str, float]) -> bool:
    """A node offers what its type declares (memory aside: Ray measures it on the node)."""
    declared = {k: v for k, v in node_type.resources.items() if k not in ("memory", "object_store_memory")}
    return not node_type.head and bool(declared) and all(abs(resources.get(k, 0.0) - v) < EPS for k, v in declared.items())


# --------------------------------------------------------------------------- in a stage


def check_workers_can_start(cfg: Config) -> None:
    """Before a driver asks Ray Train for workers on a cluster it joins (ray.address or
    RAY_ADDRESS; a local Ray it starts itself is left alone): raise WorkersCannotStartError when
    no node type of the cluster (its autoscaler's, or on a cluster without one its alive nodes) can
    hold one worker, instead of waiting ray.worker_start_timeout_s. Where the node types cannot be
    read, nothing is raised and Ray Train's own wait decides."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if cfg.ray.num_workers <= 0 or not address or address == "local":
        return
    import ray

    from paf_ray.runtime.ray import init_ray

    init_ray(cfg.ray.address, object_store_mb=cfg.ray.object_store_mb, connect_timeout_s=cfg.ray.connect_timeout_s)
    dashboard = ray._private.worker.get_dashboard_url()
    if not dashboard:
        return
    try:
        cluster = live_cluster(dashboard, auth_headers())
    except (OSError, KeyError, ValueError):
        return
    if cluster.notes:
        return
    bundle = worker_bundle(cfg.ray)
    if not fitting_types(cluster, bundle):
        raise WorkersCannotStartError(unfit_reason(cfg.ray, bundle, cluster)[1])


# --------------------------------------------------------------------------- commands


def print_findings(findings: list[Finding], cluster: Cluster, job: str, out=None) -> bool:
    """Print the check's verdict; True if the job fits (no errors)."""
    out = out or sys.stdout
    errors = [f for f in findings if f.level == "error"]
    for f in findings:
        print(f"paf-ray check: {job}: {f}", file=out)
    verdict = "does not fit" if errors else "fits"
    print(f"paf-ray check: {job} {verdict} {cluster.source}", file=out)
    return not errors


def cluster_check_command(args) -> int:
    """`paf-ray cluster check CLUSTER.yaml JOB.yaml [--set k=v ...]`: exit 0 if the job fits, 1 if not."""
    cfg = load_config(args.job, args.overrides)
    cluster = load_cluster_file(args.cluster)
    return 0 if print_findings(check_job(cfg, cluster), cluster, args.job) else 1
