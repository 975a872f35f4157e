"""Object storage that stalls, refuses connections, answers 503 SlowDown or cuts responses short.

A real S3 API (moto_server, the `s3_endpoint` fixture) sits behind tests/fault_proxy.py, a TCP/HTTP
proxy on loopback that a test switches faults on and off in. The first tests call paf_ray's storage
functions through it; the `faults`-marked ones run `paf-ray run` on jobs/smoke.yaml as a user would
(its own local Ray, data and run storage in S3 through the proxy) and check how each fault ends:
the same epochs, or one line naming the URI and the operation, then `--resume`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pyarrow.fs as pafs
import pytest

from fault_proxy import FaultProxy

from paf_ray.runtime import storage

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(REPO, "jobs", "smoke.yaml")
STALL_S = 60  # the stall: longer than the SDK's default retries (3 attempts, ~10 s), within ours
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    """A FaultProxy in front of the session's moto_server; faults are cleared after every test."""
    upstream_port = int(s3_endpoint[0].rsplit(":", 1)[1])
    p = FaultProxy(upstream_port).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def _no_faults_left(request):
    yield
    if "proxy" in request.fixturenames:
        request.getfixturevalue("proxy").clear()


@pytest.fixture
def via_proxy(proxy, monkeypatch):
    """This process's storage calls go through the proxy, with small bounds so that tests are quick:
    1 s S3 timeouts, 2 SDK attempts, 8 s of our own retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "STORAGE_RETRY_S", 8.0)
    monkeypatch.setattr(storage, "RETRY_FIRST_WAIT_S", 0.5)
    storage._filesystem_for.cache_clear()
    yield proxy
    storage._filesystem_for.cache_clear()


def prefix_of(s3_endpoint) -> str:
    return f"s3://{s3_endpoint[1]}/faults-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- storage calls


def test_storage_calls_ride_out_a_stall_and_say_so(via_proxy, s3_endpoint, capfd):
    """A stall longer than the SDK's attempts: the operation is retried whole, one line per retry
    naming the URI and the operation, and succeeds once the stall ends."""
    proxy = via_proxy
    uri = prefix_of(s3_endpoint) + "/a/x.json"
    storage.write_bytes(uri, b'{"a": 1}')

    stall = proxy.stall(5, method="GET")
    t0 = time.monotonic()
    assert storage.read_bytes(uri) == b'{"a": 1}'
    took = time.monotonic() - t0
    assert stall.count >= 2 and 5 <= took < 20, (stall.count, took)
    err = capfd.readouterr().err
    retries = [line for line in err.splitlines() if line.startswith("[paf-ray] storage: read ")]
    assert retries, err
    assert all(uri in line and "retry " in line for line in retries), retries
    assert "during GetObject operation" in retries[0] or "during HeadObject operation" in retries[0], retries[0]



def test_storage_calls_absorb_503_slowdown(via_proxy, s3_endpoint, monkeypatch, capfd):
    """503 SlowDown on 30% of the requests, with the SDK's attempts as shipped: all absorbed."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 10)
    storage._filesystem_for.cache_clear()
    folder = prefix_of(s3_endpoint) + "/slow"
    slow = via_proxy.slow_down(0.3, seed=3)
    for i in range(6):
        storage.write_bytes(f"{folder}/{i}.json", b"x" * i)
        assert storage.read_bytes(f"{folder}/{i}.json") == b"x" * i
    assert storage.list_files(folder) == [f"{i}.json" for i in range(6)]
    assert slow.count >= 5, slow.count  # 503s were answered, and absorbed


def test_a_response_cut_short_is_read_again(via_proxy, s3_endpoint):
    uri = prefix_of(s3_endpoint) + "/cut/blob.bin"
    data = os.urandom(300_000)
    storage.write_bytes(uri, data)
    cut = via_proxy.cut(method="GET", times=2)
    assert storage.read_bytes(uri) == data
    assert cut.count == 2


def test_a_fault_that_outlasts_the_retries_is_one_line_naming_uri_and_operation(via_proxy, s3_endpoint, monkeypatch):
    monkeypatch.setattr(storage, "STORAGE_RETRY_S", 3.0)
    proxy = via_proxy
    uri = prefix_of(s3_endpoint) + "/b/summary.json"
    refusal = proxy.refuse(10)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(uri, b"{}")
    took = time.monotonic() - t0
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{uri}: write failed on object storage after ")
    assert "Could not connect to server" in message or "NETWORK_CONNECTION" in message, message
    # within our bound (3 s here) plus one attempt of the SDK's (2 attempts of <= 1 s + its backoff)
    assert took < 3 + 5, took
    assert refusal.wait_over(30)


def test_a_missing_object_is_not_retried(via_proxy, s3_endpoint, capfd):
    proxy = via_proxy
    uri = prefix_of(s3_endpoint) + "/c/none.json"
    before = len(proxy.requests)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(uri)
    assert time.monotonic() - t0 < 2
    assert len(proxy.requests) - before <= 2
    assert "[paf-ray] storage:" not in capfd.readouterr().err


def test_ray_trains_filesystem_keeps_its_retries_when_pickled(via_proxy, s3_endpoint, monkeypatch):
    """Ray Train gets the filesystem pickled (controller, workers): pyarrow's own pickling drops the
    retry strategy; ours keeps it. With 1 s timeouts, 8 SDK attempts ride out a 10 s stall that
    pyarrow's default 3 attempts do not."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 8)
    storage._filesystem_for.cache_clear()
    prefix = prefix_of(s3_endpoint)
    inner, fs = storage.ray_storage(prefix + "/runs")
    assert inner == prefix[len("s3://"):] + "/runs" and isinstance(fs, storage.TunedS3FileSystem)
    copy = pickle.loads(pickle.dumps(fs))
    assert type(copy) is storage.TunedS3FileSystem and copy.max_attempts == 8 and copy.options == fs.options
    with copy.open_output_stream(inner + "/marker") as f:
        f.write(b"1")

    plain = pickle.loads(pickle.dumps(pafs.S3FileSystem(**fs.options)))  # what pyarrow alone would ship
    proxy = via_proxy
    proxy.stall(10)
    with pytest.raises(OSError, match="curlCode: 28"):
        plain.get_file_info(inner + "/marker")
    proxy.clear()
    proxy.stall(10)
    assert copy.get_file_info(inner + "/marker").type == pafs.FileType.File


def test_max_failures_auto_restarts_only_on_object_storage(tmp_path):
    from paf_ray.config import Config, ConfigError, from_dict
    from paf_ray.train.failures import STORAGE_MAX_FAILURES, resolve_max_failures

    assert Config().ray.max_failures == "auto"
    assert resolve_max_failures("auto", "s3://bucket/runs/x") == STORAGE_MAX_FAILURES == 3
    assert resolve_max_failures("auto", str(tmp_path)) == 0
    assert resolve_max_failures("auto", f"file://{tmp_path}") == 0
    assert resolve_max_failures(1, "s3://bucket/runs/x") == 1
    model = {"backbone": {"random_init": True}}
    assert from_dict({"model": model, "ray": {"max_failures": -1}}).ray.max_failures == -1
    for bad, key in (({"max_failures": -2}, "ray.max_failures"), ({"max_failures": "often"}, "ray.max_failures"),
                     ({"connect_timeout_s": 0}, "ray.connect_timeout_s")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_dict({"model": model, "ray": bad})


# --------------------------------------------------------------------------- joining a cluster


def test_joining_a_cluster_that_is_not_there_fails_in_one_line_within_the_bound(tmp_path):
    from paf_ray.config import Config

    assert Config().ray.connect_timeout_s <= 60
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "paf_ray", "run", SMOKE, "--set", f"ray.address=127.0.0.1:{port}",
         "--set", "ray.connect_timeout_s=5", "--out", str(tmp_path / "runs")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO, "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=120,
    )
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"paf-ray run: ray.address=127.0.0.1:{port}: no Ray cluster answers there"), last
    assert "within 5 s (ray.connect_timeout_s" in last
    assert took < 5 + 25, took  # the bound, plus the CLI's imports and the synthetic data set


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def s3_data(proxy, s3_endpoint, synth_root):
    """The synthetic data set in the bucket (written past the proxy); returns (prefix, data root)."""
    prefix = prefix_of(s3_endpoint)
    fs, inner = storage.resolve(prefix + "/bdd100k")
    pafs.copy_files(synth_root, inner, destination_filesystem=fs)
    return prefix, prefix + "/bdd100k"


class Run:
    """`paf-ray run jobs/smoke.yaml` in its own process group, its own HOME and its own local Ray,
    talking to S3 through the proxy."""

    def __init__(self, proxy, data_root: str, runs: str, folder, extra_sets=(), env=None, args=()):
        self.log = folder / f"run-{uuid.uuid4().hex[:6]}.log"
        home = folder / "home"
        home.mkdir(exist_ok=True)
        self.ray_tmp = tempfile.mkdtemp(prefix="pf", dir="/tmp")  # short: Ray's socket paths
        sets = [f"data.root={data_root}", f"ray.storage_path={runs}", *extra_sets]
        environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        environ.update(AWS_ENDPOINT_URL=proxy.url, HOME=str(home), PYTHONPATH=REPO, RAY_TMPDIR=self.ray_tmp,
                       PYTHONUNBUFFERED="1", **(env or {}))
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "paf_ray", "run", SMOKE, *[a for s in sets for a in ("--set", s)], *args],
                cwd=folder, env=environ, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def name(self) -> str:
        return re.search(r"\[paf-ray\] run (\S+) in ", self.output()).group(1)


@pytest.fixture
def runs_started():
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def wait_for(predicate, run: Run, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert run.running(), f"the run ended before {what}:\n{run.output()[-5000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{run.output()[-5000:]}"
        time.sleep(0.2)


def metric_epochs(run_dir: str) -> list[tuple[str, int]]:
    rows = storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()
    return [(r["stage"], r["epoch"]) for r in (json.loads(line) for line in rows if line.strip())]


def summary_of(run: Run) -> dict:
    uri = re.findall(r"\[paf-ray\] summary: (s3://\S+)", run.output())
    assert uri, run.output()[-5000:]
    return json.loads(storage.read_bytes(uri[-1]))


# Where each phase's requests go (pyarrow writes start with POST ...?uploads, then PUT parts).
WRITE = "PUT|POST"
PHASES = [
    ("decode", dict(method="GET", path=r"/bdd100k/images/")),
    ("checkpoint upload", dict(method=WRITE, path=r"/stage\d-\w+/checkpoint_\d")),
    ("log upload", dict(method=WRITE, path=r"/metrics\.jsonl|/tb/")),
    ("summary", dict(method=WRITE, path=r"/summary\.json")),
]


@pytest.mark.faults
@pytest.mark.timeout(1500)
def test_503s_all_along_and_a_60s_stall_in_each_phase_of_a_smoke_run_end_with_the_same_epochs(
        proxy, s3_data, tmp_path, runs_started):
    """One smoke run (adapt 1 epoch, finetune 1 epoch, data and storage in S3) with 503 SlowDown on
    20% of all requests (seeded) from start to end, in which S3 also freezes for 60 s once per
    phase in turn: decoding, a checkpoint upload, a log upload, the summary. The run finishes with
    the same epochs."""
    prefix, data = s3_data
    runs = prefix + "/runs-stalls"
    first = len(proxy.requests)
    slow = proxy.slow_down(0.2, seed=0)
    run = Run(proxy, data, runs, tmp_path)
    runs_started.append(run)
    held = {}
    for phase, where in PHASES:
        stall = proxy.stall(STALL_S, **where)
        wait_for(stall.fired.is_set, run, RUN_TIMEOUT_S, f"{phase} request")
        assert stall.wait_over(STALL_S + 5)
        held[phase] = stall.count
        proxy.remove(stall)
    assert run.wait() == 0, run.output()[-6000:]
    assert all(n >= 1 for n in held.values()), held
    answered = len(proxy.requests) - first
    assert slow.count >= 0.1 * answered, (slow.count, answered)
    run_dir = f"{runs}/{run.name()}"
    assert metric_epochs(run_dir) == [("stage0-adapt", 1), ("stage1-finetune", 1)]
    summary = summary_of(run)
    assert [s["stage"] for s in summary["stages"]] == ["stage0-adapt", "stage1-finetune"]
    print(f"requests held per phase: {held}; 503 SlowDown on {slow.count} of {answered} requests")


@pytest.mark.faults
@pytest.mark.timeout(1500)
def test_a_stall_past_the_bounds_fails_in_one_line_and_resume_loses_at_most_one_epoch(
        proxy, s3_data, tmp_path, runs_started):
    """Short bounds (2 s S3 timeouts, 2 SDK attempts, 5 s of our retries) and ray.max_failures=1;
    finetune has 2 epochs. From the finetune's second checkpoint on, S3 holds every write of a
    checkpoint (the first checkpoint and the run snapshot stay readable): the restart is logged as
    caused by storage, the run fails with one line naming the URI and the operation. `--resume`
    (the shipped bounds) meets connections refused for 30 s at its stage's start, and continues from
    the first finetune checkpoint."""
    prefix, data = s3_data
    runs = prefix + "/runs-resume"
    sets = ["train.stages.1.epochs=2", "ray.max_failures=1"]
    short = {"PAF_RAY_S3_TIMEOUT_S": "2", "PAF_RAY_S3_ATTEMPTS": "2", "PAF_RAY_STORAGE_RETRY_S": "5"}
    run = Run(proxy, data, runs, tmp_path, sets, env=short)
    runs_started.append(run)

    def first_checkpoint() -> list[str]:
        ours = re.escape(runs.split("://", 1)[1])
        found = (re.search(ours + r"/[^/]+/stage1-finetune/(checkpoint_\d[^/?]*)", target)
                 for _, _, target, _ in list(proxy.requests))
        return sorted({m.group(1) for m in found if m})

    wait_for(first_checkpoint, run, RUN_TIMEOUT_S, "finetune's first checkpoint")
    (kept,) = first_checkpoint()
    stall = proxy.stall(RUN_TIMEOUT_S, method=WRITE, path=rf"/stage1-finetune/checkpoint_(?!{re.escape(kept[11:])})\d",
                        only_matching=True)
    assert run.wait() == 1, run.output()[-6000:]
    assert stall.fired.is_set()
    proxy.clear()
    out = run.output()
    last = out.strip().splitlines()[-1]
    assert re.match(r"paf-ray run: stage1-finetune: object storage failed \(ray\.max_failures=1\): s3://", last), last
    assert re.search(r"during \w+ operation", last) and f"--resume {run.name()}" in last, last
    assert re.search(r"\[paf-ray\] stage1-finetune: restart 1 of 1 \(ray\.max_failures\) after a storage error: s3://",
                     out), out[-6000:]

    # The resumed run's first write into the stage's folder is Ray Train's controller creating its
    # storage marker, when the stage starts: connections are refused for 30 s from there.
    refusal = proxy.refuse(30, method=WRITE, path=r"/stage1-finetune/")
    again = Run(proxy, data, runs, tmp_path, sets, args=["--resume", run.name()])
    runs_started.append(again)
    assert again.wait() == 0, again.output()[-6000:]
    assert refusal.fired.is_set()
    print("refused from:", [r[1:3] for r in proxy.requests if r[3] == "refuse"])
    out = again.output()
    assert "stage0-adapt: already done" in out
    assert "[stage1-finetune] resumed at epoch 1 step 0" in out, out[-6000:]
    run_dir = f"{runs}/{run.name()}"
    assert metric_epochs(run_dir) == [("stage0-adapt", 1), ("stage1-finetune", 1), ("stage1-finetune", 2)]
