"""MLflow tracking (`tracking.mlflow: true`): every `paf-ray run` and every Tune trial as one MLflow run.

Where: `tracking.uri` (an MLflow server, a database URI, or a local folder), else the folder
``mlruns/`` in the run storage (a run's ``--out`` or ``ray.storage_path``; a sweep's folder). A
local folder holds MLflow's SQLite store ``mlflow.db`` and the runs' files under ``artifacts/``
(MLflow's plain-file store is in maintenance mode and refuses new runs). A run storage on object
storage has no local folder: name ``tracking.uri`` there.

- `paf-ray run`: the driver opens the MLflow run (params: every config key, dotted) when the run
  starts; each per-epoch report of rank 0 is logged as it arrives (a Ray Train callback, run by
  the Train controller on the driver's node; Train's local mode, ``ray.num_workers: 0``, has no
  callbacks, so there the rows of ``metrics.jsonl`` are logged when the run ends); at the end
  summary.json, curves.png and config.yaml, and the status (FINISHED / FAILED). ``--resume``
  continues the same MLflow run (found by its run folder).
- `paf-ray tune`: a Tune callback in the sweep's driver logs each trial: its sampled values as
  params, every per-epoch report, and when the trial ends its summary.json, curves.png and
  config.yaml. A restarted trial (``--resume``, a retry) continues its MLflow run.

MLflow is an optional extra (``pip install 'paf_ray[mlflow]'``); it is imported only here, when
tracking is on. A failure to log is printed and never stops training.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.tune
import yaml

from paf_ray.config import Config, ConfigError, TrackingConfig, to_dict
from paf_ray.eval.evaluator import headline_metrics
from paf_ray.eval.keys import SCORE
from paf_ray.runtime import storage
from paf_ray.runtime.runs import SUMMARY_FILE, read_metrics_rows
from paf_ray.tasks import ordered
from paf_ray.train.report import plot_curves

STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
RUN_DIR_TAG = "paf_ray_run_dir"  # tags that find a run again: its run folder
TRIAL_TAG = "paf_ray_trial"  # and, for a sweep's trial, its trial id
_MAX_BATCH = 100  # params per MLflow log_batch call
_MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class MlflowStore:
    """Where runs are logged. Picklable (the Train controller and Tune get copies); the MLflow
    client is made where it is used."""

    uri: str
    artifact_root: str | None  # a local folder store's artifacts (None: the server decides)
    experiment: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, client) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = os.path.join(self.artifact_root, self.experiment) if self.artifact_root else None
        return client.create_experiment(self.experiment, artifact_location=location)

    def open_run(self, client, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
        """(run id, reopened): the run with these tags if the store has one (set running again), else a new one."""
        experiment_id = self.experiment_id(client)
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id, False


def store_for(tracking: TrackingConfig, storage_root: str, experiment: str) -> MlflowStore | None:
    """The MLflow store of a run or sweep whose folder is under `storage_root`; None when tracking is off."""
    if not tracking.mlflow:
        return None
    experiment = tracking.experiment or experiment
    uri = tracking.uri
    if uri and ":" in uri and not os.path.isabs(uri):  # an MLflow URI: a server, a database
        return MlflowStore(uri, None, experiment)
    if uri:
        folder = os.path.abspath(os.path.expanduser(uri))
    elif storage.is_remote(storage_root):
        raise ConfigError(f"tracking.uri: the run storage {storage_root} is object storage, where MLflow's "
                          f"default store (a local folder {STORE_DIR}/) cannot live: set tracking.uri to an "
                          f"MLflow server or a local folder")
    else:
        folder = os.path.join(storage.local_path(storage_root), STORE_DIR)
    os.makedirs(folder, exist_ok=True)
    return MlflowStore("sqlite:///" + os.path.join(folder, DB_FILE), os.path.join(folder, ARTIFACTS_DIR), experiment)


# --------------------------------------------------------------------------- what is logged


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def report_metrics(row: dict) -> dict[str, float]:
    """The metrics of a report row (or a Tune result): `score` and the `<area>/<name>` keys."""
    return {k: float(v) for k, v in row.items() if (k == SCORE or "/" in k) and _finite(v)}


def flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    """A config as MLflow params: dotted keys, lists and empty mappings as JSON text."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flat_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = json.dumps(data) if isinstance(data, (list, dict)) else ("null" if data is None else str(data))
    return {prefix: text[:_MAX_PARAM_CHARS]}


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _MAX_BATCH):
        client.log_batch(run_id, params=items[i:i + _MAX_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step)) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def log_run_files(client, run_id: str, run_dir: str) -> None:
    """summary.json, config.yaml and curves.png of a run folder (curves drawn from metrics.jsonl when
    the run stopped before drawing them)."""
    with tempfile.TemporaryDirectory(prefix="paf_ray_mlflow_") as tmp:
        for name in (SUMMARY_FILE, "config.yaml", "curves.png"):
            path = storage.join(run_dir, name)
            if storage.exists(path):
                local = os.path.join(tmp, name)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
                client.log_artifact(run_id, local)
        if not storage.exists(storage.join(run_dir, "curves.png")) and storage.exists(storage.join(run_dir, "config.yaml")):
            tasks = (yaml.safe_load(storage.read_bytes(storage.join(run_dir, "config.yaml"))) or {})["model"]["tasks"]
            png = plot_curves(read_metrics_rows(run_dir), headline_metrics(ordered(tasks)))
            if png is not None:
                local = os.path.join(tmp, "curves.png")
                with open(local, "wb") as f:
                    f.write(png)
                client.log_artifact(run_id, local)


def _warn(what: str, error: Exception) -> None:
    print(f"[paf-ray] MLflow: {what} not logged: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)


# --------------------------------------------------------------------------- `paf-ray run`


class ReportLogger(ray.train.UserCallback):
    """Rank 0's per-epoch reports into the MLflow run of a `paf-ray run`, as they arrive (run by the
    Train controller, on the driver's node)."""

    def __init__(self, store: MlflowStore, run_id: str):
        self.store = store
        self.run_id = run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        row = metrics[0] if metrics else {}  # worker 0 = rank 0: the report that is kept
        try:
            log_metrics(self.store.client(), self.run_id, report_metrics(row), row.get("global_step", 0))
        except Exception as e:  # tracking never stops training
            _warn("a report", e)


def open_run(store: MlflowStore, cfg: Config, run_dir: str) -> str:
    """The MLflow run of a `paf-ray run` (the run folder's, again on --resume); params: the config."""
    client = store.client()
    run_id, reopened = store.open_run(client, cfg.name, {RUN_DIR_TAG: run_dir})
    if not reopened:
        log_params(client, run_id, flat_params(to_dict(cfg)))
    print(f"[paf-ray] MLflow: run {run_id} in experiment {store.experiment!r} at {store.uri}", flush=True)
    return run_id


def close_run(store: MlflowStore, run_id: str, run_dir: str, status: str) -> None:
    """The end of a `paf-ray run`: its files and status (and, where no Train callback logged them,
    rank 0's rows of metrics.jsonl)."""
    try:
        client = store.client()
        if not client.get_run(run_id).data.metrics:
            for row in read_metrics_rows(run_dir):
                log_metrics(client, run_id, report_metrics(row), row.get("global_step", row.get("step", 0)))
        log_run_files(client, run_id, run_dir)
        client.set_terminated(run_id, status)
    except Exception as e:
        _warn(f"the end of run {run_id}", e)


# --------------------------------------------------------------------------- `paf-ray tune`


class TrialLogger(ray.tune.Callback):
    """Each Tune trial of a sweep as an MLflow run (in the sweep's driver)."""

    def __init__(self, store: MlflowStore, runs_dir: str, sweep_dir: str):
        self.store = store
        self.runs_dir = runs_dir
        self.sweep_dir = sweep_dir
        self.run_ids: dict[str, str] = {}

    def run_id(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            client = self.store.client()
            run_id, reopened = self.store.open_run(
                client, trial.trial_id, {RUN_DIR_TAG: storage.join(self.runs_dir, trial.trial_id), TRIAL_TAG: trial.trial_id})
            if not reopened:
                log_params(client, run_id, {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                                             for k, v in (trial.config or {}).items()})
                client.set_tag(run_id, "paf_ray_sweep", self.sweep_dir)
            self.run_ids[trial.trial_id] = run_id
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        try:
            self.run_id(trial)
        except Exception as e:
            _warn(f"trial {trial.trial_id}", e)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        try:
            log_metrics(self.store.client(), self.run_id(trial), report_metrics(result),
                        result.get("training_iteration", 0))
        except Exception as e:
            _warn(f"a result of trial {trial.trial_id}", e)

    def end(self, trial, status: str) -> None:
        try:
            client = self.store.client()
            run_id = self.run_id(trial)
            run_dir = storage.join(self.runs_dir, trial.trial_id)
            log_run_files(client, run_id, run_dir)
            client.set_tag(run_id, "paf_ray_status", "completed" if storage.exists(storage.join(run_dir, SUMMARY_FILE))
                           else ("error" if status == "FAILED" else "stopped"))
            client.set_terminated(run_id, status)
        except Exception as e:
            _warn(f"the end of trial {trial.trial_id}", e)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.end(trial, "FAILED")

