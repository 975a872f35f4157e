"""`paf-ray tune`: Ray Tune + Optuna over adapter, prompt and schedule settings and backbones.

Each trial is a function trainable that runs the config's stages with `run_pipeline` (one
TorchTrainer per stage). `TuneReportCallback` turns every per-epoch rank-0 report of either
stage into one Tune iteration, so ASHA compares trials on `score` epoch by epoch across the
adapt/finetune boundary. A sweep folder holds:

    <DIR>/<name>/        the Tune experiment: one folder per trial (progress.csv, result.json,
                         TensorBoard events), the searcher state `Tuner.restore` resumes from
    <DIR>/trials/<id>/   each trial's run folder (stage checkpoints, metrics.jsonl, tb/)
    <DIR>/optuna.db      the Optuna study (default storage; open it with optuna-dashboard)
    <DIR>/trials.csv, trials.md, best.yaml
    <DIR>/pareto.csv, pareto.md, pareto.png, best-<k>.yaml   a multi-objective sweep's front (tune/pareto.py)
    <DIR>/mlruns/        with tracking.mlflow: the MLflow store, one run per trial (train/tracking.py)

A multi-objective sweep (`tune.metric: [score, cost/trainable_params]`, `tune.mode: [max, min]`)
runs Optuna multi-objective (TPE or NSGA-II); ASHA can rank on one metric only, so its rungs
stop trials on the first metric (or, with `scheduler.kind: fifo`, every trial runs out).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import time
from typing import Any

import optuna
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from paf_ray.cluster import pinned_resources
from paf_ray.config import Config, ConfigError, dump_config, from_dict, to_dict
from paf_ray.config.pick import Pick, parse_pick
from paf_ray.eval.evaluator import headline_metrics
from paf_ray.eval.keys import COST_KEYS
from paf_ray.runtime import storage
from paf_ray.runtime.files import write_bytes, write_text
from paf_ray.runtime.ray import init_ray
from paf_ray.runtime.runs import SUMMARY_FILE, resolve_storage
from paf_ray.tasks import ordered
from paf_ray.train import tracking
from paf_ray.train.run import prepare_data, run_pipeline
from paf_ray.tune import pareto, space

TRIALS_DIR = "trials"
RUN_SHEBANG = "#!/usr/bin/env -S python -m paf_ray run"


# --------------------------------------------------------------------------- paths


def sweep_dir(cfg: Config, out: str | None) -> str:
    """Absolute path (or URI) of the sweep folder: --out, else <ray.storage_path or ~/paf_ray_runs>/<name>."""
    if out:
        return storage.normalize_root(os.path.expanduser(out))
    return storage.join(resolve_storage(cfg.ray.storage_path, None), cfg.name)


STUDY_FILE = "optuna.db"


def local_study_path(out_dir: str) -> str:
    """The default SQLite study: in the sweep folder, or for a sweep folder on object storage, a working
    copy on the driver's node that is uploaded to the sweep folder (and fetched again to continue)."""
    if not storage.is_remote(out_dir):
        return os.path.join(storage.local_path(out_dir), STUDY_FILE)
    key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    return os.path.join(storage.cache_dir(), "studies", key, STUDY_FILE)


def study_storage_url(cfg: Config, out_dir: str) -> str:
    if cfg.tune.storage_url:
        return cfg.tune.storage_url
    return "sqlite:///" + local_study_path(out_dir)


def fetch_study(cfg: Config, out_dir: str) -> None:
    """Before a sweep on object storage: the study kept in its folder becomes the working copy."""
    if cfg.tune.storage_url or not storage.is_remote(out_dir):
        return
    local = local_study_path(out_dir)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    kept = storage.join(out_dir, STUDY_FILE)
    if storage.exists(kept):
        write_bytes(local, storage.read_bytes(kept))
    elif os.path.exists(local):
        os.remove(local)


def keep_study(cfg: Config, out_dir: str) -> None:
    """After a sweep on object storage: its study goes to the sweep folder."""
    if not cfg.tune.storage_url and storage.is_remote(out_dir) and os.path.exists(local_study_path(out_dir)):
        storage.upload_file(local_study_path(out_dir), storage.join(out_dir, STUDY_FILE))


def check_sweep_config(cfg: Config, source: str) -> list[space.Dimension]:
    """Everything that can be wrong before a trial starts: the space, and the trial config at its corners."""
    dims = space.parse_space(cfg.tune, source)
    if cfg.train.checkpoint_every_steps:
        raise ConfigError(
            f"{source}: train.checkpoint_every_steps must be null in a sweep: ASHA counts one report per "
            f"epoch, and mid-epoch reports would shift its rungs"
        )
    sch = cfg.tune.scheduler
    if sch.kind == "asha" and sch.grace_period > asha_max_t(cfg):
        raise ConfigError(
            f"{source}: tune.scheduler.grace_period={sch.grace_period} leaves ASHA no epoch to stop a trial at "
            f"(last rung: epoch {asha_max_t(cfg)} of {space.epoch_budget(cfg)}); lower it or use scheduler.kind: fifo"
        )
    for point in space.corner_points(dims):
        space.trial_config(cfg, dims, point, name="check", source=source)
    return dims


# --------------------------------------------------------------------------- the trial


def run_trial(params: dict, base: dict, runs_dir: str, source: str) -> None:
    """Tune function trainable: one pipeline run named after the trial id.

    A restarted trial (failure retry or `--resume`) has the same id, so its Train runs
    resume from their last checkpoints; on a fresh folder `resume=True` just starts.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    base_cfg = from_dict(base, source)
    dims = space.parse_space(base_cfg.tune, source)
    cfg = space.trial_config(base_cfg, dims, params, name=trial_id, source=source)
    run_in_trial(cfg, runs_dir)


def run_in_trial(cfg: Config, runs_dir: str) -> dict:
    """The body of a Tune trial (`paf-ray tune` and `paf-ray study`): one pipeline run of `cfg`,
    each per-epoch report of either stage one Tune iteration; resumes its Train runs when restarted."""
    # Tune does not count the Train workers of a trial, so a trial may wait for them while other
    # trials hold the CPUs/GPUs: up to ray.worker_start_timeout_s, as every stage does.
    return run_pipeline(cfg, out=runs_dir, resume=True, callbacks=[TuneReportCallback()])


def make_trainable(cfg: Config, runs_dir: str, source: str):
    trainable = ray.tune.with_parameters(run_trial, base=to_dict(cfg), runs_dir=runs_dir, source=source)
    return ray.tune.with_resources(trainable, trial_resources(cfg))


def trial_resources(cfg: Config) -> dict[str, float]:
    """A trial's own resources: a sliver of a CPU, on a node of ray.accelerator_type when one is set."""
    return {"cpu": cfg.tune.trial_cpus, **pinned_resources(cfg.ray)}


def multi_objective(cfg: Config) -> bool:
    return len(cfg.tune.metrics) > 1


def make_searcher(cfg: Config, dims: list[space.Dimension], storage_url: str):
    """OptunaSearch with the seeded sampler; a study with one direction per metric when
    `tune.metric` lists several (TPE and NSGA-II then optimise them jointly)."""
    t = cfg.tune
    if t.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.startup_trials)
    elif t.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=t.seed, population_size=t.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=t.seed)
    return OptunaSearch(
        space=space.optuna_distributions(dims),
        metric=t.metrics if multi_objective(cfg) else t.metrics[0],
        mode=t.modes if multi_objective(cfg) else t.modes[0],
        sampler=sampler,
        study_name=cfg.tune.study_name or cfg.name,
        storage=optuna.storages.RDBStorage(storage_url),
    )


def asha_max_t(cfg: Config) -> int:
    """The last epoch with an ASHA rung: by default one before the budget ends, because a stop
    decided on a trial's final report would throw away a run that has already finished."""
    return cfg.tune.scheduler.max_t or max(1, space.epoch_budget(cfg) - 1)


def adapt_epoch_range(cfg: Config, dims: list[space.Dimension]) -> tuple[int, int]:
    """The fewest and the most epochs a trial of this space spends in its frozen adapt phase
    (the stages before its first finetune), over the corners of the space."""
    counts = []
    for point in space.corner_points(dims):
        trial = space.trial_config(cfg, dims, point, name="check", source="<scheduler>")
        adapt = 0
        for stage in trial.train.stages:
            if stage.kind != "adapt":
                break
            adapt += stage.epochs
        counts.append(adapt)
    return min(counts), max(counts)


def first_rung(cfg: Config, dims: list[space.Dimension]) -> int | None:
    """ASHA's grace period: `scheduler.grace_period`, moved past the longest adapt phase when trials
    leave adapt at different epochs (a searched `adapt_fraction` or adapt-stage length); otherwise a
    rung would rank a trial still in its frozen adapt phase against trials already finetuning, and cull
    the method under test. None when no rung fits before `max_t` (the sweep then runs FIFO)."""
    grace = cfg.tune.scheduler.grace_period
    shortest, longest = adapt_epoch_range(cfg, dims)
    if shortest != longest:
        grace = max(grace, longest + 1)  # every trial has finished adapt and reported a finetune epoch
    return grace if grace <= asha_max_t(cfg) else None


def make_scheduler(cfg: Config, dims: list[space.Dimension]):
    sch = cfg.tune.scheduler
    metrics = cfg.tune.metrics
    if multi_objective(cfg):
        if sch.kind == "fifo":
            print(f"[paf-ray] tune: {len(metrics)} objectives ({', '.join(metrics)}): scheduler fifo, every trial "
                  f"runs out and the whole sweep can reach the Pareto front", flush=True)
        else:
            print(f"[paf-ray] tune: {len(metrics)} objectives ({', '.join(metrics)}): ASHA ranks on one metric, so "
                  f"its rungs stop trials on {metrics[0]} alone; trials it stops are left off the Pareto front (their "
                  f"metrics are an earlier epoch's). tune.scheduler.kind: fifo runs every trial out", flush=True)
    if sch.kind == "fifo":
        return FIFOScheduler()
    grace = first_rung(cfg, dims)
    if grace is None:
        print(f"[paf-ray] tune.scheduler: trials leave the adapt stage at different epochs and no ASHA rung fits "
              f"after the longest adapt phase (last rung: epoch {asha_max_t(cfg)}); every trial runs out (FIFO)",
              flush=True)
        return FIFOScheduler()
    if grace != sch.grace_period:
        print(f"[paf-ray] tune.scheduler: first ASHA rung at epoch {grace}, after the longest adapt phase "
              f"(grace_period {sch.grace_period} would compare adapting trials with finetuning ones)", flush=True)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=asha_max_t(cfg),
        grace_period=grace,
        reduction_factor=sch.reduction_factor,
        stop_last_trials=False,  # a trial ends with its pipeline, never killed at max_t
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def restore_or_refuse(experiment: str, trainable, resume: bool):
    """--resume: the Tune experiment restored (unfinished and errored trials run again); a fresh
    start: None, or an error when the folder already holds an experiment."""
    if resume:
        if not ray.tune.Tuner.can_restore(experiment):
            raise ConfigError(f"--resume: {experiment} holds no Tune experiment to continue")
        return ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    if storage.exists(experiment):
        raise ConfigError(
            f"{experiment} already holds a Tune experiment: pass --resume to continue it, or choose another --out"
        )
    return None


def build_tuner(cfg: Config, out_dir: str, dims: list[space.Dimension], source: str, resume: bool):
    runs_dir = storage.join(out_dir, TRIALS_DIR)
    trainable = make_trainable(cfg, runs_dir, source)
    experiment = storage.join(out_dir, cfg.name)
    restored = restore_or_refuse(experiment, trainable, resume)  # callbacks come back with the experiment
    if restored is not None:
        return restored
    mlflow_store = tracking.store_for(cfg.tracking, out_dir, experiment=cfg.name)
    if mlflow_store is not None:
        print(f"[paf-ray] MLflow: each trial a run in experiment {mlflow_store.experiment!r} at {mlflow_store.uri}",
              flush=True)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            # the scheduler's and the result grid's metric: the first (OptunaSearch has them all)
            metric=cfg.tune.metrics[0],
            mode=cfg.tune.modes[0],
            search_alg=make_searcher(cfg, dims, study_storage_url(cfg, out_dir)),
            scheduler=make_scheduler(cfg, dims),
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name,
            storage_path=out_dir,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.max_failures),
            callbacks=[tracking.TrialLogger(mlflow_store, runs_dir, out_dir)] if mlflow_store else None,
        ),
    )


# --------------------------------------------------------------------------- results


def trial_status(error: Any, run_dir: str) -> str:
    """completed (the pipeline wrote its summary), stopped (early, by the scheduler) or error."""
    if error is not None:
        return "error"
    return "completed" if storage.exists(storage.join(run_dir, SUMMARY_FILE)) else "stopped"


def _number(value: Any) -> float | int | None:
    """A finite number as reported (counts stay integers), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def result_rows(results, dims: list[space.Dimension], runs_dir: str, metric: str, mode: str,
                shown: tuple[str, ...] = ()) -> list[dict]:
    """One row per trial (params as written in the config, final metrics, status), best first."""
    rows = []
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or os.path.basename(r.path.rstrip("/")).removeprefix("trial_")
        row: dict[str, Any] = {"trial": trial_id, "status": trial_status(r.error, storage.join(runs_dir, trial_id))}
        for d in dims:
            if d.kind != "fixed":
                row[d.key] = space.decode_choice((r.config or {}).get(d.key), d)
        for key in dict.fromkeys((metric,) + tuple(shown)):
            row[key] = _number(metrics.get(key))
        row["epochs"] = metrics.get("training_iteration", 0)
        row["wall_s"] = round(float(metrics.get("time_total_s", 0.0)), 1)
        row["error"] = "" if r.error is None else str(r.error).strip().splitlines()[-1][:200]
        rows.append(row)
    return sort_rows(rows, metric, mode)


def sort_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Best first by `metric`; trials without a value (errors) last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.get(metric) is None, sign * (r.get(metric) or 0.0)))


def best_row(rows: list[dict], pick: Pick | None = None) -> dict | None:
    """The best completed trial; if none completed, the best one with a score (rows are sorted by the
    first metric). With a `tune.pick` rule: the same among the trials that meet its conditions, by its key."""
    scored = [r for r in rows if r["status"] != "error"]
    if pick is not None:
        scored = sort_rows([r for r in scored if pick.admits(r) and _number(r.get(pick.metric)) is not None],
                           pick.metric, pick.mode)
    completed = [r for r in scored if r["status"] == "completed"]
    return (completed or scored or [None])[0]


def shown_metrics(cfg: Config) -> tuple[str, ...]:
    """The metric columns of the tables: the objectives, the pick rule's keys, the tasks' headline
    metrics and the costs."""
    pick_keys = parse_pick(cfg.tune.pick).keys() if cfg.tune.pick else []
    return tuple(dict.fromkeys([*cfg.tune.metrics, *pick_keys, *headline_metrics(ordered(cfg.model.tasks)), *COST_KEYS]))


def rows_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: space.display_value(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                         for k, v in row.items()})
    return buf.getvalue()


def rows_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", ""]
    if not rows:
        return "\n".join(lines + ["No trials.", ""])
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [space.display_value(row[c]).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _objectives(row: dict, metrics: str | list[str]) -> str:
    return ", ".join(f"{m} {space.display_value(row.get(m))}" for m in ([metrics] if isinstance(metrics, str) else metrics))


def best_config_text(base: Config, dims: list[space.Dimension], row: dict, out_dir: str, metrics: str | list[str],
                     title: str | None = None, name: str | None = None) -> str:
    """A complete `paf-ray run` job file for a trial's settings (by default: the best trial by `metrics`),
    its header naming the trial and its values of `metrics`."""
    params = {d.key: space.encode_choice(row[d.key]) for d in dims if d.kind != "fixed"}
    cfg = space.trial_config(base, dims, params, name=name or f"{base.name}-best", source="best trial")
    shown = ", ".join(f"{k}={space.display_value(v)}" for k, v in params.items())
    title = title or f"Best trial of the sweep in {out_dir}"
    header = [
        RUN_SHEBANG,
        f"# {title}: trial {row['trial']} ({row['status']}), {_objectives(row, metrics)}",
        f"# Sampled: {shown}",
        "# Run it:  paf-ray run THIS_FILE --out DIR",
    ]
    return "\n".join(header) + "\n" + dump_config(cfg)


def write_front(base: Config, dims: list[space.Dimension], rows: list[dict], out_dir: str) -> list[dict]:
    """pareto.csv, pareto.md, pareto.png and best-<k>.yaml (k = 1.. along the front, best first by the
    first metric) in the sweep folder; returns the front's rows."""
    t = base.tune
    front = pareto.pareto_front(rows, t.metrics, t.modes)
    params = space.param_columns(dims)
    others = [k for k in shown_metrics(base) if k not in t.metrics]
    table = pareto.front_rows(front, t.metrics, params, others)
    goal = " vs ".join(f"{m} ({'max' if mode == 'max' else 'min'})" for m, mode in zip(t.metrics, t.modes))
    write_text(storage.join(out_dir, "pareto.csv"), rows_csv(table))
    md = rows_markdown(table, f"Sweep {base.name}: Pareto front of {goal}")
    pool = len(pareto.candidates(rows, t.metrics))
    md += (f"\n{len(front)} of {pool} trials with final values of every objective are on the front "
           f"({len(rows)} trials in all; trials.md lists them). Each `best-<k>.yaml` runs as is: "
           f"`paf-ray run {storage.join(out_dir, 'best-1.yaml')} --out DIR`.\n\n![Pareto front](pareto.png)\n")
    write_text(storage.join(out_dir, "pareto.md"), md)
    write_bytes(storage.join(out_dir, "pareto.png"),
                pareto.plot_front(rows, front, t.metrics, t.modes, params, f"Sweep {base.name}: {goal}"))
    for k, row in enumerate(front, start=1):
        title = f"Pareto front trial {k} of {len(front)} of the sweep in {out_dir}"
        text = best_config_text(base, dims, row, out_dir, t.metrics, title=title, name=f"{base.name}-best-{k}")
        write_text(storage.join(out_dir, f"best-{k}.yaml"), text)
    for name in storage.list_files(out_dir):  # a front that shrank (--resume): drop the old files past it
        m = re.fullmatch(r"best-(\d+)\.yaml", name)
        if m and int(m.group(1)) > len(front):
            fs, inner = storage.resolve(storage.join(out_dir, name))
            fs.delete_file(inner)
    return front


def write_results(base: Config, dims: list[space.Dimension], rows: list[dict], out_dir: str) -> dict | None:
    """trials.csv, trials.md and best.yaml in the sweep folder, and for a multi-objective sweep its
    Pareto front (write_front); returns the best row (None: no trial, or none meets tune.pick)."""
    t = base.tune
    write_text(storage.join(out_dir, "trials.csv"), rows_csv(rows))
    write_text(storage.join(out_dir, "trials.md"), rows_markdown(rows, f"Sweep {base.name}: trials by {t.metrics[0]}"))
    pick = parse_pick(t.pick) if t.pick else None
    best = best_row(rows, pick)
    if best is not None:
        title = f"Best trial of the sweep in {out_dir} by tune.pick '{pick.text()}'" if pick else None
        write_text(storage.join(out_dir, "best.yaml"),
                   best_config_text(base, dims, best, out_dir, pick.keys() if pick else t.metrics[0], title=title))
    if multi_objective(base):
        write_front(base, dims, rows, out_dir)
    return best


# --------------------------------------------------------------------------- the sweep


def warm_data_cache(cfg: Config) -> None:
    """Generate the synthetic dataset once here, so concurrent trials never race to write it."""
    if cfg.data.root is None:
        prepare_data(cfg)


def run_sweep(cfg: Config, out: str | None = None, resume: bool = False, source: str = "<config>") -> dict:
    """Run (or continue) the sweep; returns {out_dir, rows, best, front, wall_s} (front: [] for one metric)."""
    t0 = time.perf_counter()
    dims = check_sweep_config(cfg, source)
    out_dir = sweep_dir(cfg, out)
    if not storage.is_uri(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    init_ray(cfg.ray.address, object_store_mb=cfg.ray.object_store_mb, connect_timeout_s=cfg.ray.connect_timeout_s)
    warm_data_cache(cfg)
    fetch_study(cfg, out_dir)
    tuner = build_tuner(cfg, out_dir, dims, source, resume)
    try:
        results = tuner.fit()
    finally:
        keep_study(cfg, out_dir)
    rows = result_rows(results, dims, storage.join(out_dir, TRIALS_DIR), cfg.tune.metrics[0], cfg.tune.modes[0],
                       shown_metrics(cfg))
    best = write_results(cfg, dims, rows, out_dir)
    front = pareto.pareto_front(rows, cfg.tune.metrics, cfg.tune.modes) if multi_objective(cfg) else []
    return {"out_dir": out_dir, "rows": rows, "best": best, "front": front,
            "wall_s": round(time.perf_counter() - t0, 1)}
