"""A real multi-node Ray cluster with a real S3 endpoint on this machine, for tests.

`scripts/local_cluster.sh` does the work (one recipe for people and tests): a head and worker
nodes started with `ray start`, token auth on, all inside a private network namespace that has
only a loopback interface, each worker node in its own mount namespace with its own HOME, TMPDIR
and Ray temp dir, the head's, the driver's and the other nodes' folders hidden from it; plus
moto_server (S3) in the same network. Every client (job submission, drivers, S3 checks) runs
inside that network namespace through `LocalCluster.run`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_cluster.sh"
VENV_BIN = Path(sys.executable).parent
BUCKET = "paf"

# Helpers that run inside the cluster's network (the S3 endpoint is reachable only there).
_S3_LIST = """
import json, sys, boto3
bucket, prefix = sys.argv[1], sys.argv[2]
keys = {}
for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
print(json.dumps(keys))
"""
_S3_READ = """
import sys, boto3
sys.stdout.write(boto3.client("s3").get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read().decode())
"""
_S3_UPLOAD = """
import os, sys, boto3
local, bucket, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3")
if os.path.isfile(local):
    s3.upload_file(local, bucket, prefix)
else:
    for folder, _, files in os.walk(local):
        for f in files:
            path = os.path.join(folder, f)
            s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, local))
"""
# Waits (inside the cluster's network) until a key under a prefix ends with a suffix; prints it.
_S3_WAIT = """
import sys, time, boto3
bucket, prefix, suffix, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s3, deadline = boto3.client("s3"), time.monotonic() + timeout
while time.monotonic() < deadline:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        hits = [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        if hits:
            print(hits[0])
            sys.exit(0)
    time.sleep(0.5)
sys.exit(1)
"""


@dataclass
class LocalCluster:
    dir: Path
    env: dict[str, str]  # every client's environment: the cluster's settings, token included

    @property
    def gcs(self) -> str:
        return self.env["LOCAL_CLUSTER_GCS"]

    @property
    def dashboard(self) -> str:
        return self.env["RAY_API_SERVER_ADDRESS"]

    @property
    def driver_dir(self) -> Path:
        """A working folder on the 'head machine' that no worker node sees."""
        return self.dir / "driver"

    def command(self, args: list[str]) -> list[str]:
        return [str(SCRIPT), "exec", str(self.dir), *args]

    def client_env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
            env["HOME"] = str(home)
        env.update(extra)
        return env

    def run(self, args: list[str], timeout: float, cwd: Path | None = None, home: Path | None = None,
            **extra: str) -> subprocess.CompletedProcess:
        """Run a client command inside the cluster's network; output captured, bounded by `timeout`."""
        return subprocess.run(
            self.command(args), cwd=cwd or REPO, env=self.client_env(home, **extra), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def popen(self, args: list[str], log: Path, cwd: Path | None = None, home: Path | None = None,
              **extra: str) -> subprocess.Popen:
        """Start a client in its own process group (so that it can be killed with its children)."""
        with open(log, "wb") as f:
            return subprocess.Popen(
                self.command(args), cwd=cwd or REPO, env=self.client_env(home, **extra), stdout=f,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def python(self, code: str, *args: str, timeout: float = 120) -> str:
        done = self.run([sys.executable, "-c", code, *args], timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    # ------------------------------------------------------------------ S3

    def s3_keys(self, prefix: str) -> dict[str, int]:
        """{key: size} of the objects under `prefix` in the bucket."""
        return json.loads(self.python(_S3_LIST, BUCKET, prefix))

    def s3_read(self, key: str) -> str:
        return self.python(_S3_READ, BUCKET, key)

    def s3_upload(self, local: Path, key: str) -> str:
        """Upload a file or a folder (recursively) to s3://BUCKET/key; returns the URI."""
        self.python(_S3_UPLOAD, str(local), BUCKET, key, timeout=300)
        return f"s3://{BUCKET}/{key}"

    def s3_wait_for(self, prefix: str, suffix: str, timeout: float) -> str | None:
        """The first key under `prefix` ending with `suffix`, waiting up to `timeout` s; None if none came."""
        done = self.run([sys.executable, "-c", _S3_WAIT, BUCKET, prefix, suffix, str(timeout)], timeout=timeout + 60)
        return done.stdout.strip() if done.returncode == 0 else None

    # ------------------------------------------------------------------ nodes

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node (raylet, its workers, agents): a node loss."""
        done = subprocess.run([str(SCRIPT), "kill-node", str(self.dir), name], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def add_node(self, name: str) -> None:
        done = subprocess.run([str(SCRIPT), "add-node", str(self.dir), name], env=self.env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    def sessions(self) -> dict[str, int]:
        """{node or service name: id of the session all its processes run in}."""
        return {p.stem: int(p.read_text()) for p in self.dir.glob("*.sid")}

    def pids(self) -> list[int]:
        return session_pids(set(self.sessions().values()))

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def start_cluster(root: Path, hide: list[str] = ()) -> LocalCluster:
    """Start the head, worker nodes a and b and moto_server in `root` (keep it short: socket paths)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO),  # the nodes import paf_ray from this checkout, as from an installed package
        RAY_DISABLE_USAGE_STATS="1",
        RAY_USAGE_STATS_ENABLED="0",
        TQDM_DISABLE="1",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
        LOCAL_CLUSTER_HIDE=" ".join(hide),
    )
    done = subprocess.run([str(SCRIPT), "start", str(root)], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        stop_cluster(root, env)
        raise RuntimeError(f"local cluster did not start:\n{done.stdout}\n{done.stderr}")
    for line in (root / "cluster.env").read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = value
    return LocalCluster(root, env)


def session_pids(sessions: set[int]) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) in sessions:
                pids.append(pid)
        except OSError:
            continue
    return pids


def stop_cluster(root: Path, env: dict[str, str] | None = None) -> None:
    """Stop what `start_cluster` started, by session id; then make sure no process of it is left."""
    subprocess.run([str(SCRIPT), "stop", str(root)], env=env or dict(os.environ), capture_output=True, timeout=120)
    left = {int(f.read_text()) for f in root.glob("*.sid")}  # only when the script itself failed
    for pid in session_pids(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_until(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(interval)
