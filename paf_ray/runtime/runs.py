"""Run folders in run storage: where runs and sweeps land, their names, what a finished run leaves.

A run of config `name` lands in ``<storage>/<name>-<UTC time>-<id>/`` (a local folder or a URI);
``--resume`` finds the newest one again. The files every consumer reads back (``summary.json``,
``metrics.jsonl``) are named here.
"""

from __future__ import annotations

import json
import os
import secrets
import time

from paf_ray.runtime import storage

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
# Runs land in ray.storage_path; without one, here: a persistent folder of the user running the
# driver, never the working directory (a Ray job's working directory is Ray's package cache, shared
# by every submission of the same files and removed with it).
DEFAULT_STORAGE = "~/paf_ray_runs"


class RunExistsError(RuntimeError):
    pass


def resolve_storage(storage_path: str | None, out: str | None) -> str:
    """Absolute local path or URI under which runs are written (Ray needs absolute): `out`, else
    `storage_path` (ray.storage_path), else DEFAULT_STORAGE."""
    path = out or storage_path or DEFAULT_STORAGE
    return storage.normalize_root(os.path.expanduser(path))


def new_run_name(name: str) -> str:
    """`<name>-<UTC timestamp>-<random>`: every submission of a job file gets its own run folder."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def latest_run_name(storage_root: str, name: str) -> str | None:
    """The newest run of config `name` under `storage_root` (its own folder or `<name>-<stamp>-<id>`)."""
    ours = [r for r in storage.list_dirs(storage_root)
            if r == name or (r.startswith(name + "-") and r[len(name) + 1:][:8].isdigit())]
    return max(ours, key=lambda r: r[len(name):]) if ours else None


def run_name_for(name: str, storage_root: str, resume: str | None) -> str:
    """The run folder's name: a new `<name>-<stamp>-<id>` for every run, or the run to resume
    (`--resume RUN`, or bare `--resume`: the newest run of this config's name)."""
    if resume is None:
        return new_run_name(name)
    if resume:
        if resume != os.path.basename(resume) or resume in (".", ".."):
            raise RunExistsError(f"--resume {resume!r}: give the run's folder name under {storage_root}, not a path")
        return resume
    latest = latest_run_name(storage_root, name)
    if latest is None:
        raise RunExistsError(f"--resume: no run of {name!r} under {storage_root} to continue")
    return latest


def read_metrics_rows(run_dir: str) -> list[dict]:
    """Rank 0's metrics.jsonl rows from the run folder (a local path or URI)."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    lines = [line for line in storage.read_bytes(path).decode("utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as e:
            if number == len(lines):  # a row cut short by a crash while it was appended: it was never written
                break
            raise ValueError(f"{path}: line {number}: not a JSON row ({type(e).__name__}: {str(e)[:80]})") from None
    return rows
