"""`paf-ray run` and `paf-ray eval`: the stages of a config on Ray Train, one TorchTrainer per stage.

The trainer only wires resources: datasets, scaling, storage, checkpoint retention and
failure handling. The work is `paf_ray.train.loop.train_loop`. A run leaves, in
``<storage>/<name>/`` (a local folder or a URI): one Ray Train run folder per stage (its
checkpoints), and ``metrics.jsonl``, ``tb/`` (TensorBoard), ``summary.json`` and ``curves.png``.
Rank 0 writes the logs there from whichever node it runs on; the driver reads them back from
there, so nothing depends on the driver and rank 0 sharing a disk.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import Any, Sequence

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from paf_ray.cluster import check_workers_can_start, pinned_resources, worker_resources
from paf_ray.config import Config, ConfigError, dump_config, to_dict
from paf_ray.data.pipeline import build_dataset, iter_train_batches, load_records, resolve_root
from paf_ray.eval.evaluator import headline_metrics
from paf_ray.eval.keys import COST_KEYS, SCORE
from paf_ray.models.multitask import build_model
from paf_ray.runtime import storage
from paf_ray.runtime.files import read_json, write_bytes, write_json, write_text
from paf_ray.runtime.ray import RAY_LOG_LEVEL, init_ray
from paf_ray.runtime.runs import SUMMARY_FILE, RunExistsError, read_metrics_rows, resolve_storage, run_name_for
from paf_ray.tasks import ordered
from paf_ray.train.failures import StorageRestartLog, resolve_max_failures, stage_failure
from paf_ray.train import tracking
from paf_ray.train.checkpoint import checkpoint_location, load_model, load_model_state, resolve_checkpoint_dir
from paf_ray.train.loop import evaluate, gather_metrics, train_loop
from paf_ray.train.report import plot_curves
from paf_ray.train.step import train_process_env

STAGE_DONE_FILE = "paf_stage_done.json"


class WorkersDidNotStartError(RuntimeError):
    pass


# A stage waits ray.worker_start_timeout_s for its workers in all, over this many start attempts
# (an attempt can also fail fast, e.g. when a node dies while the workers start).
WORKER_START_ATTEMPTS = 4
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def stage_run_name(index: int, kind: str) -> str:
    return f"stage{index}-{kind}"


# --------------------------------------------------------------------------- data


def check_inputs(cfg: Config) -> None:
    """Before Ray starts (`run`, `eval`, `tune`): data.root is a folder and train.init_checkpoint a
    checkpoint, local or on object storage; else a ConfigError naming the key."""
    root = cfg.data.root
    if root and not storage.is_dir(storage.normalize_root(root)):
        raise ConfigError(f"data.root: {root}: no such folder (the dataset root, holding images/ and labels/)")
    if cfg.train.init_checkpoint:
        try:
            checkpoint_location(cfg.train.init_checkpoint)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"train.init_checkpoint: {e}") from None



def prepare_data(cfg: Config, stats: dict | None = None) -> tuple[Config, list[dict], list[dict]]:
    """Resolve the dataset root (generating the synthetic default once) and read both splits.

    Only samples that carry at least one of the model's tasks are kept (a single-task run
    on `sem` reads the 10k set only). Returns the config with `data.root` set to the
    resolved root, so checkpoints carry where their data came from. Index counts
    (dropped overlaps, skipped bad labels) land in `stats` per split.
    """
    root = resolve_root(cfg.data, storage.cache_dir())
    cfg = replace(cfg, data=replace(cfg.data, root=root))
    tasks = ordered(cfg.model.tasks)
    train, val = (load_records(cfg.data, root, split, tasks, stats=stats)
                  for split in (cfg.data.train_split, cfg.data.val_split))
    return cfg, train, val


def training_world_size(cfg: Config) -> int:
    return max(1, cfg.ray.num_workers)


def make_datasets(cfg: Config, train: list[dict], val: list[dict], stage_index: int) -> dict:
    """{"train": the stage's whole stream, split across workers by Ray; "val_<rank>": one exact
    share per worker}. The train stream holds every epoch of the stage (each epoch
    ``stage_steps_per_epoch`` full batches per worker), so epochs follow each other without a
    new pipeline start."""
    world = training_world_size(cfg)
    tasks = ordered(cfg.model.tasks)
    stage = cfg.train.stages[stage_index]
    rows_per_epoch = stage_steps_per_epoch(len(train), cfg, stage_index) * cfg.data.batch_size * world
    pinned = pinned_resources(cfg.ray)  # decoding on the ray.accelerator_type nodes, beside the workers
    datasets = {"train": build_dataset(train, cfg.data, tasks, train=True, epochs=stage.epochs,
                                       rows_per_epoch=rows_per_epoch, seed=cfg.train.seed + 1000 * stage_index,
                                       task_resources=pinned)}
    for rank in range(world):
        datasets[f"val_{rank}"] = build_dataset(val[rank::world], cfg.data, tasks, train=False, task_resources=pinned)
    return datasets


def steps_per_epoch(n_train: int, cfg: Config) -> int:
    """Batches per worker in one pass over the training records (the last one filled up)."""
    world = training_world_size(cfg)
    per_worker = n_train // world if world > 1 else n_train
    return max(1, math.ceil(per_worker / cfg.data.batch_size))


def stage_steps_per_epoch(n_train: int, cfg: Config, stage_index: int) -> int:
    """Steps per epoch of a stage: a pass over the records, or `max_steps_per_epoch` if fewer."""
    n = steps_per_epoch(n_train, cfg)
    return min(n, cfg.train.stages[stage_index].max_steps_per_epoch or n)


# --------------------------------------------------------------------------- stages


def run_stage(
    cfg: Config,
    index: int,
    run_dir: str,
    datasets: dict,
    n_train: int,
    init_checkpoint: Any,
    step_offset: int,
    callbacks: Sequence[Any] = (),
):
    """Fit one stage with a TorchTrainer; returns the ray.train.Result."""
    stage = cfg.train.stages[index]
    name = stage_run_name(index, stage.kind)
    max_failures = resolve_max_failures(cfg.ray.max_failures, run_dir)
    # Ray Train writes through our filesystem (its timeouts and retries); it wants the path without the scheme then.
    storage_path, storage_filesystem = storage.ray_storage(run_dir)
    # Train reads the start timeout from this process's environment when fit() starts its controller.
    os.environ[WORKER_START_TIMEOUT_ENV] = str(cfg.ray.worker_start_timeout_s / WORKER_START_ATTEMPTS)
    resources = worker_resources(cfg.ray)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "stage_index": index,
            "stage_name": stage_run_name(index, stage.kind),
            "init_checkpoint": init_checkpoint,
            "steps_per_epoch": stage_steps_per_epoch(n_train, cfg, index),
            "step_offset": step_offset,
            "log_dir": run_dir,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources,
            accelerator_type=cfg.ray.accelerator_type, placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.ray.keep_checkpoints,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=WORKER_START_ATTEMPTS - 1
            ),
            callbacks=[*callbacks, StorageRestartLog(name, run_dir, max_failures)],
            logging_config=ray.train.LoggingConfig(log_level=RAY_LOG_LEVEL),
            worker_runtime_env={"env_vars": train_process_env()},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.ControllerError as e:
        if type(getattr(e, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            raise WorkersDidNotStartError(
                f"{name}: {cfg.ray.num_workers} training worker(s) with {resources} each "
                f"did not start within ray.worker_start_timeout_s={cfg.ray.worker_start_timeout_s:g} s: the cluster "
                "lacks those resources (raise the timeout if an autoscaler is still adding nodes)"
            ) from e
        raise stage_failure(name, run_dir, e, max_failures) from e
    except ray.train.TrainingFailedError as e:
        raise stage_failure(name, run_dir, e, max_failures) from e
    if result.error is not None:
        raise stage_failure(name, run_dir, result.error, max_failures) from result.error
    return result


def run_pipeline(
    cfg: Config,
    out: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    evaluate_initial: bool = False,
) -> dict:
    """Run every stage of `cfg` in order, handing each stage's final checkpoint to the next.

    Returns the summary (also written to `<storage>/<name>/summary.json`).
    """
    storage_root = resolve_storage(cfg.ray.storage_path, out)
    run_dir = storage.join(storage_root, cfg.name)
    if not resume and storage.exists(run_dir) and storage.list_files(run_dir) + storage.list_dirs(run_dir):
        raise RunExistsError(
            f"{run_dir} already exists: pass --resume to continue that run, or choose another name "
            f"(--set name=...) or --out"
        )
    init_ray(cfg.ray.address, object_store_mb=cfg.ray.object_store_mb, data_cpus=cfg.data.cpus,
             connect_timeout_s=cfg.ray.connect_timeout_s)
    t0 = time.perf_counter()
    index_stats: dict = {}
    cfg, train_records, val_records = prepare_data(cfg, index_stats)
    print(f"[paf-ray] data: {cfg.data.root} ({len(train_records)} train / {len(val_records)} val samples)", flush=True)
    if not storage.is_uri(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    write_text(storage.join(run_dir, "config.yaml"), dump_config(cfg))

    summary: dict[str, Any] = {"name": cfg.name, "run_dir": run_dir, "stages": [], "config": to_dict(cfg)}
    if evaluate_initial:
        summary["metrics_before"] = evaluate_initial_model(cfg, run_dir, val_records)

    init_checkpoint = None
    if cfg.train.init_checkpoint:
        # a path or URI every worker reads itself (a URI from any node)
        init_checkpoint = checkpoint_at(checkpoint_location(cfg.train.init_checkpoint))
    step_offset = 0
    for index, stage in enumerate(cfg.train.stages):
        name = stage_run_name(index, stage.kind)
        done_path = storage.join(run_dir, name, STAGE_DONE_FILE)
        done = read_json(done_path) if resume else None
        epoch_steps = stage_steps_per_epoch(len(train_records), cfg, index)
        stage_steps = stage.epochs * epoch_steps
        if done is not None:
            print(f"[paf-ray] {name}: already done, checkpoint {done['checkpoint']}", flush=True)
            init_checkpoint = checkpoint_at(done["checkpoint"])
            summary["stages"].append(done)
            step_offset += stage_steps
            continue
        datasets = make_datasets(cfg, train_records, val_records, index)  # lazy: cheap
        print(f"[paf-ray] {name}: {stage.epochs} epoch(s) x {epoch_steps} steps, lr {stage.lr}", flush=True)
        t_stage = time.perf_counter()
        result = run_stage(cfg, index, run_dir, datasets, len(train_records), init_checkpoint, step_offset, callbacks)
        if result.checkpoint is None:
            raise RuntimeError(f"{name}: the stage finished without a checkpoint")
        # result.checkpoint.path drops the URI scheme on object storage: rebuild it from the run folder.
        checkpoint_path = storage.join(run_dir, name, os.path.basename(result.checkpoint.path.rstrip("/")))
        record = {
            "stage": name,
            "kind": stage.kind,
            "checkpoint": checkpoint_path,
            "metrics": _final_eval_metrics(result.metrics, ordered(cfg.model.tasks)),
            "cost": {k: v for k, v in (result.metrics or {}).items() if k in COST_KEYS},
            "wall_s": round(time.perf_counter() - t_stage, 1),
        }
        write_json(done_path, record)
        summary["stages"].append(record)
        init_checkpoint = result.checkpoint
        step_offset += stage_steps

    summary["checkpoint"] = summary["stages"][-1]["checkpoint"]
    summary["metrics"] = summary["stages"][-1]["metrics"]
    summary["metrics_per_stage"] = {s["stage"]: s["metrics"] for s in summary["stages"]}
    summary["cost"] = summary["stages"][-1].get("cost", {})  # the final stage's (eval/keys.py)
    summary["cost_per_stage"] = {s["stage"]: s.get("cost", {}) for s in summary["stages"]}
    summary["stage_wall_s"] = {s["stage"]: s["wall_s"] for s in summary["stages"]}
    summary["skipped_samples"] = _skipped_counts(run_dir)
    summary["skipped_samples"]["index"] = {split: st.get("skipped", 0) for split, st in index_stats.items()}
    summary["skipped_samples"]["total"] += sum(summary["skipped_samples"]["index"].values())
    summary["index"] = {split: {k: v for k, v in st.items() if k != "problems"} for split, st in index_stats.items()}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    finish_run_folder(run_dir, summary)
    return summary


def checkpoint_at(path: str) -> ray.train.Checkpoint:
    """A ray.train.Checkpoint of a local path or URI, read through our filesystem (its retries)."""
    inner, fs = storage.ray_storage(path)
    return ray.train.Checkpoint(inner, filesystem=fs)


def _final_eval_metrics(metrics: dict | None, tasks) -> dict:
    """The evaluation metrics of a stage's last report (not its training losses or timings)."""
    keep = tuple(f"{t.name}/" for t in tasks) + (SCORE,)
    return {k: v for k, v in (metrics or {}).items() if k.startswith(keep)}


def _skipped_counts(run_dir: str) -> dict:
    """Skipped bad samples per stage, from rank 0's metrics.jsonl (last row per stage/epoch)."""
    rows = read_metrics_rows(run_dir)
    per_epoch: dict[tuple, int] = {}
    for row in rows:
        if "data/skipped" in row:
            per_epoch[(row["stage"], row["epoch"])] = int(row["data/skipped"])
    out: dict[str, int] = {}
    for (stage, _), n in per_epoch.items():
        out[stage] = out.get(stage, 0) + n
    out["total"] = sum(v for k, v in out.items())
    return out


def finish_run_folder(run_dir: str, summary: dict) -> None:
    """curves.png (from the metrics.jsonl in run storage) and summary.json into the run folder."""
    tasks = ordered(summary["config"]["model"]["tasks"])
    png = plot_curves(read_metrics_rows(run_dir), headline_metrics(tasks))
    if png is not None:
        write_bytes(storage.join(run_dir, "curves.png"), png)
    write_json(storage.join(run_dir, SUMMARY_FILE), summary)


# --------------------------------------------------------------------------- evaluation


def evaluate_records(model, cfg: Config, val_records: list[dict]) -> dict:
    """Evaluate a model in this process over `val_records` through the Ray Data val pipeline."""
    tasks = ordered(cfg.model.tasks)
    ds = build_dataset(val_records, cfg.data, tasks, train=False)
    state = evaluate(model, iter_train_batches(ds, tasks, cfg.data.batch_size), cfg, torch.device("cpu"), amp=False)
    return gather_metrics(state, list(cfg.model.tasks))


def evaluate_initial_model(cfg: Config, run_dir: str, val_records: list[dict]) -> dict:
    """Metrics of the model the first stage starts from (pretrained backbone, fresh heads)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, input_size=cfg.data.input_size, load_weights=not cfg.train.init_checkpoint)
    if cfg.train.init_checkpoint:
        load_model_state(model, resolve_checkpoint_dir(cfg.train.init_checkpoint))
    metrics = evaluate_records(model.eval(), cfg, val_records)
    print(f"[paf-ray] before training: {format_metrics_line(metrics, ordered(cfg.model.tasks))}", flush=True)
    return metrics


def format_metrics_line(metrics: dict, tasks) -> str:
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in headline_metrics(tasks) if isinstance(metrics.get(k), (int, float)))


def metrics_table(columns: dict[str, dict], tasks) -> str:
    """A markdown table: one row per headline metric of `tasks`, one column per named metrics dict."""
    keys = headline_metrics(tasks)
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        if not any(isinstance(c.get(k), (int, float)) for c in columns.values()):
            continue
        cells = [f"{c[k]:.2f}" if isinstance(c.get(k), (int, float)) else "-" for c in columns.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def run_config(cfg: Config, out: str | None, resume: str | None) -> dict:
    """`paf-ray run`: the config's stages in a new run folder (or the one `resume` names)."""
    check_inputs(cfg)
    check_workers_can_start(cfg)  # on a cluster it joins: fail now if no node type can hold a worker
    storage_root = resolve_storage(cfg.ray.storage_path, out)
    mlflow_store = tracking.store_for(cfg.tracking, storage_root, experiment=cfg.name)
    cfg = replace(cfg, name=run_name_for(cfg.name, storage_root, resume))
    print(f"[paf-ray] run {cfg.name} in {storage_root}" + (" (resumed)" if resume is not None else ""), flush=True)
    if mlflow_store is None:
        summary = run_pipeline(cfg, out=storage_root, resume=resume is not None)
    else:
        run_dir = storage.join(storage_root, cfg.name)
        mlflow_run = tracking.open_run(mlflow_store, cfg, run_dir)
        try:
            summary = run_pipeline(cfg, out=storage_root, resume=resume is not None,
                                   callbacks=[tracking.ReportLogger(mlflow_store, mlflow_run)])
        except BaseException:
            tracking.close_run(mlflow_store, mlflow_run, run_dir, "FAILED")
            raise
        tracking.close_run(mlflow_store, mlflow_run, run_dir, "FINISHED")
    print(metrics_table({s["stage"]: s["metrics"] for s in summary["stages"]}, ordered(cfg.model.tasks)))
    print(f"[paf-ray] summary: {storage.join(summary['run_dir'], SUMMARY_FILE)}")
    print(f"[paf-ray] final checkpoint: {summary['checkpoint']}")
    return summary


def eval_checkpoint(checkpoint: str, overrides=(), as_json: bool = False) -> dict:
    """`paf-ray eval`: a checkpoint's metrics on the val split of its config's data."""
    model, cfg, meta = load_model(checkpoint, overrides=overrides)
    check_inputs(cfg)
    init_ray(cfg.ray.address, object_store_mb=cfg.ray.object_store_mb, data_cpus=cfg.data.cpus,
             connect_timeout_s=cfg.ray.connect_timeout_s)
    cfg, _, val_records = prepare_data(cfg)
    metrics = evaluate_records(model, cfg, val_records)
    if as_json:
        print(json.dumps(metrics, indent=2, default=float))
    else:
        print(f"checkpoint {meta['path']} (stage {meta.get('stage')}, epoch {meta.get('epoch')})")
        print(metrics_table({"val": metrics}, ordered(cfg.model.tasks)))
    return metrics
