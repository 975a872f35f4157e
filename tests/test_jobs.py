"""Job files and `paf-ray submit`: what a job carries to a cluster, and a real Ray head with
token auth that runs jobs/smoke.yaml through both the stock `ray job submit` CLI and
`paf-ray submit --wait`.

The head is its own cluster (not the session `ray_local`): started with `ray start --head` in
subprocesses with a private HOME, temp dir and ports, and stopped by killing exactly the
processes under its temp dir (`ray stop` would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import psutil
import pytest

from paf_ray.config import ConfigError
from paf_ray.jobs import DEFAULT_EXCLUDES, auth_headers, build_job_spec, check_runtime_env, find_auth_token

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def write_job(folder: Path, text: str, name: str = "job.yaml") -> Path:
    path = folder / name
    # the default stages start with adapt: these jobs adapt a random backbone on purpose
    path.write_text("#!/usr/bin/env -S python -m paf_ray run\nmodel: {backbone: {random_init: true}}\n" + text,
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------- job spec


def test_unknown_runtime_env_key_is_rejected_naming_file_and_key(tmp_path):
    path = write_job(tmp_path, "job:\n  runtime_env:\n    working_dir: .\n    entrypoint: python x.py\n")
    with pytest.raises(ConfigError) as e:
        build_job_spec(path)
    assert str(path) in str(e.value) and "job.runtime_env.entrypoint" in str(e.value)
    assert "working_dir" in str(e.value)  # lists the keys Ray knows


def test_env_vars_must_be_strings(tmp_path):
    with pytest.raises(ConfigError, match=r"env_vars\.NCCL_DEBUG.*quote"):
        check_runtime_env({"env_vars": {"NCCL_DEBUG": 1}}, "jobs/x.yaml")


def test_job_spec_for_the_smoke_file(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = build_job_spec("jobs/smoke.yaml", ["ray.storage_path=/tmp/runs x", "train.stages.0.epochs=2"])
    assert spec.entrypoint == (
        "python -m paf_ray run jobs/smoke.yaml --set 'ray.storage_path=/tmp/runs x' --set train.stages.0.epochs=2"
    )
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert set(DEFAULT_EXCLUDES) <= set(spec.runtime_env["excludes"])
    assert spec.runtime_env["env_vars"]["TQDM_DISABLE"] == "1"  # the file's own runtime_env travels too
    assert spec.entrypoint_num_cpus == 0
    assert spec.metadata == {"paf_ray_config": "jobs/smoke.yaml", "paf_ray_name": "smoke"}


def test_tune_file_runs_the_tune_command(monkeypatch):
    monkeypatch.chdir(REPO)
    assert build_job_spec("jobs/tune.yaml").entrypoint == "python -m paf_ray tune jobs/tune.yaml"


def test_bad_override_is_a_config_error(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="ray.num_workerz"):
        build_job_spec("jobs/smoke.yaml", ["ray.num_workerz=2"])


def test_job_file_outside_the_working_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write_job(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match="outside the working dir"):
        build_job_spec(path)


def test_job_file_with_its_own_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    write_job(tmp_path / "jobs", "command: tune\njob:\n  runtime_env:\n    working_dir: .\n    excludes: [/big]\n", "t.yaml")
    spec = build_job_spec("jobs/t.yaml")
    assert spec.entrypoint == "python -m paf_ray tune jobs/t.yaml"
    assert spec.runtime_env["working_dir"] == str(tmp_path)
    assert spec.runtime_env["excludes"][0] == "/big" and "/.venv" in spec.runtime_env["excludes"]


def test_uploaded_working_dir_keeps_the_package_and_the_exec_bit(tmp_path, monkeypatch):
    """Ray's own packaging of the working dir, as `ray job submit --working-dir .` does it."""
    from ray._private.runtime_env.packaging import create_package

    monkeypatch.chdir(REPO)
    spec = build_job_spec("jobs/smoke.yaml")
    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=True, excludes=spec.runtime_env["excludes"])
    with zipfile.ZipFile(target) as z:
        infos = {i.filename: i for i in z.infolist()}
    on_disk = [str(p.relative_to(REPO)) for p in (REPO / "paf_ray").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = sorted({p for p in on_disk if p not in infos})
    assert not missing, f"these package files would not reach the cluster: {missing}"
    assert (infos["jobs/smoke.yaml"].external_attr >> 16) & 0o100, "jobs/smoke.yaml lost its exec bit"
    assert not any(name.startswith((".venv/", ".git/", "runs/")) for name in infos)


def test_auth_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert find_auth_token() is None and auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert find_auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}


# --------------------------------------------------------------------------- a real head


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def isolated_env(home: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """No RAY_* from this process (RAY_ADDRESS of the session Ray, auth mode...), private HOME/TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        TMPDIR=str(tmp),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DISABLE_USAGE_STATS="1",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def stop_head(temp_dir: str) -> None:
    """Kill the processes of this head only: those whose command line names its temp dir, and their children."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = set(roots)
    for proc in roots:
        try:
            procs.update(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check_smoke_summary(run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    assert summary_path.is_file(), f"no {summary_path}"
    summary = json.loads(summary_path.read_text())
    assert summary["name"] == run_dir.name and run_dir.name.startswith("smoke-")
    assert [s["kind"] for s in summary["stages"]] == ["adapt", "finetune"]
    assert "score" in summary["metrics"]
    assert os.path.isdir(summary["checkpoint"]), summary["checkpoint"]
    return summary


@pytest.mark.timeout(1200)
def test_smoke_job_runs_on_a_token_auth_head_both_ways(tmp_path):
    from ray.job_submission import JobSubmissionClient

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    # Ray's sockets live under the temp dir: keep its path short (unix socket paths max ~107 chars).
    temp_dir = tempfile.mkdtemp(prefix="pr_head_", dir="/tmp")
    gcs, dashboard, client, agent_http, agent_grpc, env_agent, metrics = free_ports(7)
    address = f"http://127.0.0.1:{dashboard}"
    env = isolated_env(home, tmp_path, RAY_AUTH_MODE="token")
    try:
        start = run(
            [
                str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
                f"--metrics-export-port={metrics}", "--num-cpus=2", "--num-gpus=0",
                f"--object-store-memory={300 * 2**20}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ],
            env,
            timeout=120,
        )
        assert start.returncode == 0, start.stdout + start.stderr

        # A client without the token is refused, and told what to set.
        no_token = run(
            [sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", address],
            isolated_env(tmp_path / "empty_home", tmp_path),
            timeout=120,
        )
        assert no_token.returncode == 1
        assert "authentication failed" in no_token.stderr and "RAY_AUTH_MODE=token" in no_token.stderr

        jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})

        # 1. The stock Ray CLI runs the job file itself (its shebang line runs paf-ray on it). Without
        # ray.storage_path the run lands in ~/paf_ray_runs of the head (HOME=home), not in Ray's
        # cached copy of the working directory.
        default_storage = home / "paf_ray_runs"
        cli = run(
            [
                str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                "--submission-id", "smoke-cli", "--", "jobs/smoke.yaml",
            ],
            env,
            timeout=480,
        )
        assert cli.returncode == 0, cli.stdout[-4000:] + cli.stderr[-4000:]
        assert str(jobs.get_job_status("smoke-cli").value) == "SUCCEEDED"
        first = sorted(default_storage.glob("smoke-*"))
        assert len(first) == 1, first
        check_smoke_summary(first[0])

        # 2. paf-ray submit: the Jobs SDK with the file's runtime_env; prints the id, streams the logs.
        # The same job file a second time on the same head: a new run with its own folder.
        sdk = run(
            [
                sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", address, "--wait",
                "--submission-id", "smoke-sdk",
            ],
            env,
            timeout=480,
        )
        assert sdk.returncode == 0, sdk.stdout[-4000:] + sdk.stderr[-4000:]
        assert sdk.stdout.splitlines()[0] == "smoke-sdk"
        assert "summary.json" in sdk.stdout  # the job's own log lines came through
        assert str(jobs.get_job_status("smoke-sdk").value) == "SUCCEEDED"
        assert jobs.get_job_info("smoke-sdk").runtime_env["env_vars"]["TQDM_DISABLE"] == "1"
        runs = sorted(default_storage.glob("smoke-*"))
        assert len(runs) == 2 and first[0] in runs, runs
        check_smoke_summary(next(r for r in runs if r != first[0]))

        # 3. A job that fails on the cluster makes `paf-ray submit --wait` exit non-zero.
        failed = run(
            [
                sys.executable, "-m", "paf_ray", "submit", "jobs/smoke.yaml", "--address", address, "--wait",
                "--submission-id", "smoke-fail", "--set", f"data.root={tmp_path / 'no_such_dataset'}",
            ],
            env,
            timeout=240,
        )
        assert failed.returncode == 1, failed.stdout[-4000:] + failed.stderr[-4000:]
        assert "smoke-fail FAILED" in failed.stderr
        assert str(jobs.get_job_status("smoke-fail").value) == "FAILED"
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
