"""Ray's own autoscaler on this machine, for tests: the fake multi-node node provider.

Ray ships a node provider for testing autoscaling on one machine
(`ray/autoscaler/_private/fake_multi_node/node_provider.py`): the autoscaler (the monitor
process on the head) "launches" a worker node by starting a raylet on this machine with the
node type's resources, and "terminates" it by stopping that raylet. Everything else is the
autoscaler a cluster launched with `ray up` runs (v1, Ray 2.60's default for the launcher):
demand-based scale-up, idle scale-down, min/max workers per node type, infeasible requests.

The node types are derived from a cluster file (`cluster/aws.yaml`): the same type names,
min/max workers, CPUs and accelerator labels. This machine has no GPU, so each GPU of a node
type becomes the custom resource `FAKE_GPU`; a job asks for it with
`ray.resources_per_worker: {FAKE_GPU: 1}` where a real job says `ray.use_gpu: true`.

Isolation: the head, its fake worker nodes and an S3 endpoint (moto_server) run in a private
network namespace that has only a loopback interface (so Ray's default ports are free and
nothing is reachable from outside), with a private HOME and Ray temp dir, token auth on. Every
process started is in one session, stopped by its id. Needs root (unshare, nsenter).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
FAKE_GPU = "FAKE_GPU"
BUCKET = "paf"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
S3_PORT = 9000
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's type
# A fake worker node's object store: small, like everything here (the default is 30% of the RAM).
NODE_OBJECT_STORE_BYTES = 150 * 2**20


def fake_node_types(cluster_file: dict) -> dict:
    """The worker node types of a launcher cluster file, for the fake provider: same names,
    min/max workers, CPUs and custom resources; GPUs become FAKE_GPU."""
    types = {}
    for name, spec in cluster_file["available_node_types"].items():
        if name == cluster_file["head_node_type"]:
            continue
        resources = {k: v for k, v in spec["resources"].items() if k != "GPU"}
        if spec["resources"].get("GPU"):
            resources[FAKE_GPU] = spec["resources"]["GPU"]
        resources["object_store_memory"] = NODE_OBJECT_STORE_BYTES
        node_type = {"resources": resources, "node_config": {}, "min_workers": spec.get("min_workers", 0),
                     "max_workers": spec["max_workers"]}
        if spec.get("labels"):
            node_type["labels"] = dict(spec["labels"])
        types[name] = node_type
    return types


def fake_autoscaler_config(cluster_file: dict, idle_timeout_minutes: float, nodes_dir: Path) -> dict:
    """A full autoscaler config for the fake provider, from a launcher cluster file."""
    types = fake_node_types(cluster_file)
    types[HEAD_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": cluster_file["cluster_name"],
        "max_workers": cluster_file["max_workers"],
        "upscaling_speed": cluster_file.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            # Ray's fake_multinode provider, each worker node with a temp dir of its own (fake_provider.py)
            "type": "external",
            "module": "fake_provider.SeparateTempDirFakeProvider",
            "nodes_dir": str(nodes_dir),
            "gcs_address": f"127.0.0.1:{GCS_PORT}",
            # the autoscaler knows its fake nodes by node id (they all have this machine's IP)
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# Every node the GCS knows (alive and dead), through the dashboard; with `--watch S`, once every S
# seconds until killed, one JSON line each time.
_NODES = """
import json, os, sys, time, urllib.request
url = os.environ["RAY_API_SERVER_ADDRESS"] + "/api/v0/nodes?limit=10000&detail=1"
headers = {"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]}
while True:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
        nodes = json.loads(reply.read())["data"]["result"]["result"]
    print(json.dumps({"time": time.time(), "nodes": [{"id": n["node_id"], "state": n["state"], "head": n["is_head_node"],
                                                      "resources": n["resources_total"]} for n in nodes]}), flush=True)
    if len(sys.argv) < 3:
        break
    time.sleep(float(sys.argv[2]))
"""


@dataclass
class AutoscalingCluster:
    dir: Path
    env: dict[str, str]  # every client's environment: the addresses, the token, the S3 settings
    config: dict  # the autoscaler config the head runs
    sessions: dict[str, int] = field(default_factory=dict)  # name -> session id of its processes

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{DASHBOARD_PORT}"

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside the cluster's network namespace."""
        return ["nsenter", f"--net=/proc/{self.sessions['net']}/ns/net", *args]

    def run(self, args: list[str], timeout: float, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
        """A client command in the cluster's network; output captured, bounded by `timeout`."""
        return subprocess.run(self.command(args), cwd=cwd or REPO, env={**self.env, **extra}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, args: list[str], log: Path, cwd: Path | None = None, **extra: str) -> subprocess.Popen:
        """A client in its own session (killed with its children by `kill_session`)."""
        with open(log, "wb") as f:
            return subprocess.Popen(self.command(args), cwd=cwd or REPO, env={**self.env, **extra}, stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def python(self, code: str, *args: str, timeout: float = 120) -> str:
        done = self.run([sys.executable, "-c", code, *args], timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (alive and dead): id, state, head, resources."""
        return json.loads(self.python(_NODES).strip().splitlines()[-1])["nodes"]

    def watch_nodes(self, log: Path, every_s: float = 1.0) -> subprocess.Popen:
        """A poller writing {time, nodes} to `log` every `every_s` seconds (one JSON line each) until killed."""
        return self.popen([sys.executable, "-c", _NODES, "--watch", str(every_s)], log)

    def type_of(self, node: dict) -> str:
        """The node type a worker node was started as: the one whose resources it has (the fake
        provider's nodes carry no node-group label)."""
        for name, spec in self.config["available_node_types"].items():
            declared = {k: v for k, v in spec["resources"].items() if k != "object_store_memory"}
            if name != HEAD_TYPE and all(node["resources"].get(k) == v for k, v in declared.items()):
                return name
        return "?"

    def status(self) -> str:
        """`ray status` (the autoscaler's view), for failure messages."""
        done = self.run(["ray", "status", "--address", self.gcs], timeout=60)
        return done.stdout + done.stderr

    def log_tail(self, name: str = "monitor.log", n: int = 40) -> str:
        path = self.dir / "ray" / "session_latest" / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies, dead but not yet reaped, left out)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_session(sid: int, sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    """Signal every process of session `sid`; SIGKILL what is left after `wait_s`."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def start_autoscaling_cluster(root: Path, cluster_file: Path, idle_timeout_minutes: float,
                              update_interval_s: int = 1, head_env: dict | None = None) -> AutoscalingCluster:
    """Head (0 CPUs) + Ray's autoscaler with the fake provider + moto_server, in `root` (keep it short:
    Ray's socket paths live under it). Stop it with `stop_autoscaling_cluster`."""
    if os.geteuid() != 0:
        raise PermissionError("the autoscaling cluster needs root: unshare and nsenter (a private network namespace)")
    config = fake_autoscaler_config(yaml.safe_load(cluster_file.read_text()), idle_timeout_minutes, root / "nodes")
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        HOME=str(root / "home"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # every node imports paf_ray from this checkout, as from an installed package; the
        # autoscaler imports its node provider from tests/
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{DASHBOARD_PORT}",
        # every node's memory monitor sees the whole machine (all nodes, everything else running here)
        RAY_memory_monitor_refresh_ms="0",
        RAY_agent_register_timeout_ms="120000",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        AWS_DEFAULT_REGION="us-east-1",
    )
    cluster = AutoscalingCluster(root, env, config)

    def start(name: str, args: list[str], extra: dict | None = None) -> subprocess.Popen:
        log = open(root / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env={**env, **(extra or {})}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
        cluster.sessions[name] = proc.pid
        return proc

    try:
        start("net", ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"])
        _wait(lambda: subprocess.run(["nsenter", f"--net=/proc/{cluster.sessions['net']}/ns/net", "ip", "-o", "link",
                                      "show", "lo"], capture_output=True, text=True).stdout.count("UP"),
              10, "the network namespace")
        start("s3", cluster.command([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)]))
        head = start("head", cluster.command([
            "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={GCS_PORT}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
            "--num-cpus=0", "--num-gpus=0", f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
            f"--temp-dir={root / 'ray'}", f"--autoscaling-config={root / 'config.json'}", "--disable-usage-stats",
        ]), {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": str(update_interval_s), **(head_env or {})})
        if head.wait(timeout=300) != 0:
            raise RuntimeError(f"ray start --head failed:\n{(root / 'head.log').read_text()[-3000:]}")
        cluster.python(_MAKE_BUCKET, BUCKET, timeout=120)
        return cluster
    except BaseException:
        stop_autoscaling_cluster(cluster)
        raise


_MAKE_BUCKET = """
import sys, time, boto3
deadline = time.monotonic() + 60
while True:
    try:
        boto3.client("s3").create_bucket(Bucket=sys.argv[1])
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
"""


def stop_autoscaling_cluster(cluster: AutoscalingCluster, grace_s: float = 5) -> None:
    """Every process of the cluster, by session: the head (with the autoscaler and the fake worker
    nodes it started, which run in the head's session), moto_server and the network namespace:
    SIGTERM to all, SIGKILL to what is left after `grace_s`."""
    sessions = list(cluster.sessions.values())
    for sid in sessions:
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    while any(session_pids(sid) for sid in sessions) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sid in sessions:
        kill_session(sid, signal.SIGKILL, wait_s=10)
    cluster.sessions.clear()
