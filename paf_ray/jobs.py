"""`paf-ray submit`: send a job file to a Ray cluster through the Ray Jobs SDK.

A job file is a full paf_ray config whose ``job:`` section says how it travels:
``runtime_env`` (Ray runtime_env keys only), ``entrypoint_num_cpus`` and
``entrypoint_num_gpus``. The entrypoint runs ``python -m paf_ray <command> <file>`` in the
uploaded working directory, so the same file also runs with the stock CLI
(``ray job submit --working-dir . -- jobs/x.yaml``, through its shebang line).

Token authentication (Ray >= 2.59): when a token is found (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) it is sent as a bearer header, unless
``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from paf_ray import cluster as clusters
from paf_ray.config import Config, ConfigError, load_config
from paf_ray.runtime.auth import auth_headers, find_auth_token  # noqa: F401  (find_auth_token: the tests')

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir: environments, outputs, datasets, VCS metadata.
# Gitignore syntax: a leading "/" anchors at the working dir, so paf_ray/data/ still travels.
DEFAULT_EXCLUDES = ["/.venv", "/runs", "/data", "/.git", "/demo_out", "/bench_out", "__pycache__", "*.egg-info"]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HELP = (
    "the cluster has token authentication on. Set RAY_AUTH_MODE=token and give the cluster's token "
    "as RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file> or the file ~/.ray/auth_token "
    "(on the head: `ray get-auth-token`; KubeRay: the Secret named in authOptions). See docs/cluster.md."
)


@dataclass
class JobSpec:
    """What `submit_job` is called with, built from a job file."""

    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_cpus: Optional[float] = None
    entrypoint_num_gpus: Optional[float] = None
    metadata: dict[str, str] = field(default_factory=dict)


def known_runtime_env_keys() -> set[str]:
    from ray.runtime_env import RuntimeEnv

    return set(RuntimeEnv.known_fields)


def check_runtime_env(runtime_env: dict[str, Any], source: str) -> None:
    """Reject keys Ray would silently ignore, and env_vars values that are not strings."""
    known = known_runtime_env_keys()
    for key in runtime_env:
        if key not in known:
            public = ", ".join(sorted(k for k in known if not k.startswith("_")))
            raise ConfigError(
                f"{source}: job.runtime_env.{key}: not a Ray runtime_env key (Ray would ignore it silently); "
                f"known keys: {public}"
            )
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ConfigError(f"{source}: job.runtime_env.env_vars: expected a mapping of strings")
    for name, value in env_vars.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"{source}: job.runtime_env.env_vars.{name}: expected a string, got {type(value).__name__} "
                f"{value!r} (quote it in YAML)"
            )
    excludes = runtime_env.get("excludes")
    if excludes is not None and not (isinstance(excludes, list) and all(isinstance(e, str) for e in excludes)):
        raise ConfigError(f"{source}: job.runtime_env.excludes: expected a list of path patterns")


def load_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a job file as a config and check its ``job.runtime_env``."""
    cfg = load_config(path, overrides)
    check_runtime_env(cfg.job.runtime_env, os.fspath(path))
    return cfg


def default_working_dir() -> Path:
    """The repo root: the current dir if it holds the paf_ray package, else the package's parent."""
    cwd = Path.cwd()
    if (cwd / "paf_ray" / "__init__.py").is_file():
        return cwd
    package_parent = Path(__file__).resolve().parent.parent
    if (package_parent / "pyproject.toml").is_file():
        return package_parent
    return cwd


def build_job_spec(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Job file (+ --set overrides) -> entrypoint, runtime_env and entrypoint resources."""
    path = os.fspath(path)
    cfg = load_job(path, overrides)
    runtime_env = dict(cfg.job.runtime_env)
    if "working_dir" in runtime_env:
        working_dir = runtime_env["working_dir"]
        if "://" in str(working_dir):
            # A remote package (s3://..., gs://...): the file must be inside it at the same relative path.
            local_root = Path.cwd()
        else:
            local_root = Path(working_dir).resolve()
            runtime_env["working_dir"] = str(local_root)
    else:
        local_root = default_working_dir()
        runtime_env["working_dir"] = str(local_root)
    if "://" not in str(runtime_env["working_dir"]):
        excludes = list(runtime_env.get("excludes") or [])
        runtime_env["excludes"] = excludes + [e for e in DEFAULT_EXCLUDES if e not in excludes]
        if not local_root.is_dir():
            raise ConfigError(f"{path}: job.runtime_env.working_dir: no such folder {str(local_root)!r}")

    file_abs = Path(path).resolve()
    try:
        relative = file_abs.relative_to(local_root)
    except ValueError:
        raise ConfigError(
            f"{path}: the job file is outside the working dir {str(local_root)!r}, so the cluster would not "
            "have it; run from the repo root or set job.runtime_env.working_dir"
        ) from None

    if cfg.command == "demo":
        argv = ["python", "-m", "paf_ray", "demo", "--config", relative.as_posix()]
    else:
        argv = ["python", "-m", "paf_ray", cfg.command, relative.as_posix()]
    for text in overrides:
        argv += ["--set", text]
    return JobSpec(
        entrypoint=shlex.join(argv),
        runtime_env=runtime_env,
        entrypoint_num_cpus=cfg.job.entrypoint_num_cpus,
        entrypoint_num_gpus=cfg.job.entrypoint_num_gpus,
        metadata={"paf_ray_config": relative.as_posix(), "paf_ray_name": cfg.name},
    )


def make_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return JobSubmissionClient(address, headers=auth_headers())


def _is_auth_error(error: Exception) -> bool:
    from ray.exceptions import AuthenticationError

    text = str(error)
    return isinstance(error, AuthenticationError) or "status code 401" in text or "status code 403" in text


def wait_for_job(client, submission_id: str, out=None, max_poll_s: float = 5.0) -> str:
    """Stream the job's logs until it ends; return its final status name.

    Follows the log websocket (`tail_job_logs`); if that breaks (a proxy without websockets),
    polls the logs from where the stream stopped. The job status decides the end.
    """
    out = out or sys.stdout
    written = [0]
    streaming = True
    try:
        asyncio.run(_follow_logs(client, submission_id, out, written))
    except Exception as e:
        if _is_auth_error(e):
            raise
        print(f"paf-ray submit: log stream broke ({e}); polling the logs instead", file=sys.stderr)
        streaming = False
    poll_s = 0.5
    while True:
        status = str(client.get_job_status(submission_id).value)
        if not streaming:
            logs = client.get_job_logs(submission_id)
            if len(logs) > written[0]:
                out.write(logs[written[0]:])
                out.flush()
                written[0] = len(logs)
        if status in TERMINAL_STATES:
            return status
        time.sleep(poll_s)
        poll_s = min(poll_s * 2, max_poll_s)


async def _follow_logs(client, submission_id: str, out, written: list[int]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()
        written[0] += len(chunk)


def preflight(args) -> bool:
    """`paf-ray submit`'s check before it submits: does the job fit the cluster (paf_ray/cluster.py)?
    Against `--cluster FILE` when given, else against the live cluster at the address."""
    cfg = load_job(args.config, args.overrides)
    if args.cluster:
        target = clusters.load_cluster_file(args.cluster)
    else:
        address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        try:
            target = clusters.live_cluster(address if "://" in address else f"http://{address}", auth_headers())
        except Exception as e:
            if _is_auth_error(e) or getattr(e, "code", None) in (401, 403):  # urllib's HTTPError has the status
                print(f"paf-ray submit: authentication failed: {AUTH_HELP}\n  ({e})", file=sys.stderr)
            else:
                print(f"paf-ray submit: cannot read the cluster at {address} to check the job: {e} "
                      "(--no-check submits without checking)", file=sys.stderr)
            return False
    return clusters.print_findings(clusters.check_job(cfg, target), target, args.config, out=sys.stderr)


def submit(args) -> int:
    """`paf-ray submit`: send the job file; with --wait, stream its logs and return its outcome."""
    spec = build_job_spec(args.config, args.overrides)
    if args.check or not args.no_check:
        fits = preflight(args)
        if not fits and not args.check:
            print("paf-ray submit: nothing submitted (--no-check submits without checking)", file=sys.stderr)
        if args.check or not fits:
            return 0 if fits else 1
    try:
        client = make_client(args.address)
        submission_id = client.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            submission_id=args.submission_id,
            metadata=spec.metadata,
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
            entrypoint_num_gpus=spec.entrypoint_num_gpus,
        )
    except Exception as e:  # the SDK raises RuntimeError/ConnectionError/AuthenticationError/ValueError
        if _is_auth_error(e):
            print(f"paf-ray submit: authentication failed: {AUTH_HELP}\n  ({e})", file=sys.stderr)
        else:
            print(f"paf-ray submit: {args.config}: submission failed: {e}", file=sys.stderr)
        return 1
    print(submission_id, flush=True)
    if not args.wait:
        print(
            f"paf-ray submit: submitted; follow it with `ray job logs --follow {submission_id}`",
            file=sys.stderr,
        )
        return 0
    try:
        status = wait_for_job(client, submission_id)
    except KeyboardInterrupt:
        print(
            f"\npaf-ray submit: stopped waiting; the job keeps running (`ray job stop {submission_id}` ends it)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if _is_auth_error(e):
            print(f"paf-ray submit: authentication failed: {AUTH_HELP}\n  ({e})", file=sys.stderr)
        else:
            print(f"paf-ray submit: lost the job {submission_id}: {e}", file=sys.stderr)
        return 1
    print(f"paf-ray submit: job {submission_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
