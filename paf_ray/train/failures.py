"""How a stage survives and reports failures: ray.max_failures, the restart log line, the one-line error.

Ray Train's own storage calls (the checkpoint upload and its storage marker in the workers, the run
snapshot in the controller) are retried by the AWS SDK only (paf_ray.runtime.storage: the filesystem
Ray Train gets). When they give up, the worker fails; with restarts left (``ray.max_failures``),
Ray Train restarts the workers from the last checkpoint, and ``StorageRestartLog`` says so in the
log. A stage that fails for good raises ``StageFailedError``: one line naming what failed (for
object storage: the URI and the operation) and how to continue the run.
"""

from __future__ import annotations

import re

import ray.train

from paf_ray.runtime import storage

# ray.max_failures "auto": restarts of a stage's workers when the run folder is on object storage.
# A restart after a storage error costs at most one checkpoint interval (the workers resume from the
# last checkpoint) and rides out an outage longer than the SDK's retries; 3 bounds how often a
# deterministic error (a bug, a bad sample) is repeated before the run fails.
STORAGE_MAX_FAILURES = 3


class StageFailedError(RuntimeError):
    """A stage that failed for good; the message is one line."""


def resolve_max_failures(setting: int | str, run_dir: str) -> int:
    """ray.max_failures: an int as given; "auto": STORAGE_MAX_FAILURES on object storage, else 0 (a
    failure of a local disk or of the code is no passing fault: restarting would only repeat it)."""
    if setting != "auto":
        return int(setting)
    return STORAGE_MAX_FAILURES if storage.is_remote(run_dir) else 0


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__


def storage_cause(error: BaseException) -> BaseException | None:
    """The object-storage error behind `error` (a worker's or the controller's), or None."""
    for e in _causes(error):
        if isinstance(e, storage.StorageError) or storage.is_transient(e):
            return e
    return None


def describe_storage_error(error: BaseException, fallback_uri: str) -> str:
    """'<URI>: <operation and reason>' on one line. pyarrow names the bucket and key; our own
    StorageError names the URI already."""
    if isinstance(error, storage.StorageError):
        return storage.short_error(error)
    found = re.search(r"key '([^']*)' in bucket '([^']*)'", str(error))
    scheme = fallback_uri.split("://", 1)[0] if "://" in fallback_uri else "s3"
    uri = f"{scheme}://{found.group(2)}/{found.group(1)}" if found else fallback_uri
    return f"{uri}: {storage.short_error(error)}"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def worker_errors(error: BaseException) -> list[BaseException]:
    """The errors inside a Ray Train failure: the workers' (by rank), else the controller's, else itself."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        return [failures[rank] for rank in sorted(failures)]
    controller = getattr(error, "controller_failure", None)
    return [controller] if controller is not None else [error]


def stage_failure(stage: str, run_dir: str, error: BaseException, max_failures: int) -> StageFailedError:
    """The one-line error of a stage that failed for good."""
    resume = f"continue it with: paf-ray run CONFIG --resume {run_dir.rstrip('/').rsplit('/', 1)[-1]}"
    restarts = f"ray.max_failures={max_failures}"
    for e in worker_errors(error):
        cause = storage_cause(e)
        if cause is not None:
            return StageFailedError(
                f"{stage}: object storage failed ({restarts}): {describe_storage_error(cause, run_dir)}; {resume}")
    first = worker_errors(error)[0]
    return StageFailedError(f"{stage}: training failed ({restarts}): {type(first).__name__}: {_first_line(first)}; "
                            f"{resume}")


class StorageRestartLog(ray.train.UserCallback):
    """Runs in Ray Train's controller: a line in the log when the workers are restarted after one
    of them failed on object storage."""

    def __init__(self, stage: str, run_dir: str, max_failures: int):
        self.stage, self.run_dir, self.max_failures = stage, run_dir, max_failures
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        causes = [c for c in map(storage_cause, worker_exceptions.values()) if c is not None]
        if not causes:
            return
        what = describe_storage_error(causes[0], self.run_dir)
        if self.max_failures == -1 or self.failures <= self.max_failures:
            limit = "unlimited" if self.max_failures == -1 else f"of {self.max_failures}"
            print(f"[paf-ray] {self.stage}: restart {self.failures} {limit} (ray.max_failures) after a storage error: "
                  f"{what}; the workers resume from the last checkpoint", flush=True)
        else:
            print(f"[paf-ray] {self.stage}: storage error with no restart left (ray.max_failures={self.max_failures}): "
                  f"{what}", flush=True)
