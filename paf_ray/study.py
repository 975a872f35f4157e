"""`paf-ray study STUDY.yaml`: the paper's comparison grid as one Ray Tune run, and its table.

A study file is a config (the base of every cell) with a `study:` section naming the grid:
checkpoints x paradigms x adapter kinds x LV-Adapter off/on (x its context) x seeds (docs/study.md).
Each **cell** is one Tune trial of a grid search (basic variant generator, FIFO: no search, no early
stopping) whose trainable is the same one-pipeline-per-trial body as `paf-ray tune`'s.

The budget rule: **every multi-task cell trains `study.total_steps` optimizer steps, adapt steps
counted**, each step one batch of `data.batch_size` per worker. Stages are cut into epochs of
`study.steps_per_epoch` steps (one Tune iteration each):

    single_task         finetune, one model per task (model.tasks = [task]), no adapters: total_steps
                        (exposure equal_steps), or as many labelled samples of its task as a multi-task
                        cell sees (equal_labels: each epoch cut to share_t x steps_per_epoch steps)
    pretrain_finetune   finetune, total_steps, no adapters
    adapt_finetune      adapt round(adapt_fraction * total_steps) (whole epochs, >= 1), finetune the rest
    finetune_adapters   finetune, total_steps, with the adapters of adapt_finetune (the capacity control:
                        the same parameters, all training from step 0, no frozen phase)
    adapt_only          adapt, total_steps (the backbone never trains)

share_t is the fraction of the multi-task training frames that carry task t (frames are drawn from
the union of the tasks' frames). Stage settings (lr, schedule, warm-up, head lr) come from the base
config's two stages [adapt, finetune]. Cells that share work run once: a single-task baseline depends
only on checkpoint, task and seed (it serves every adapter kind and LV row), pretrain_finetune on
checkpoint, LV and seed. The results (`write_results`): Δ_MTL against the mean single-task model of
the same checkpoint, and paired differences between paradigms with t-intervals, from which the
sentences follow. A study folder holds:

    checkpoints/<name>.pth   checkpoints made here (study.checkpoints.<name>.pretrain) + .json
    plan.json                the label shares the single-task budgets were cut with (equal_labels)
    <name>/                  the Tune experiment (--resume restores it)
    cells/<cell>/            each cell's run folder (stage checkpoints, metrics.jsonl, summary.json)
    study.csv, study.json, study.md, study.png
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import matplotlib
import ray.tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from paf_ray.config import Config, ConfigError, from_dict, load_config, to_dict
from paf_ray.runtime import files, storage
from paf_ray.runtime.files import read_json, write_text
from paf_ray.runtime.ray import init_ray
from paf_ray.runtime.runs import SUMMARY_FILE
from paf_ray.tasks import TASKS, ordered
from paf_ray.train.pretrain import METHOD_FORMAT, pretrain_checkpoint
from paf_ray.train.run import prepare_data, steps_per_epoch
from paf_ray.tune.search import restore_or_refuse, run_in_trial, sweep_dir, trial_resources, warm_data_cache

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

CELLS_DIR = "cells"
CHECKPOINTS_DIR = "checkpoints"
PLAN_FILE = "plan.json"
MULTI_TASK = ("pretrain_finetune", "adapt_finetune", "finetune_adapters", "adapt_only")


def table_keys(tasks) -> list[str]:
    """The metric of each task the table shows and Δ_MTL uses: its headline."""
    return [TASKS[t].headline for t in tasks]


def key_task(key: str) -> str:
    return key.split("/", 1)[0]


PARADIGM_LABEL = {
    "single_task": "single-task",
    "pretrain_finetune": "pretrain→finetune",
    "adapt_finetune": "adapt→finetune",
    "finetune_adapters": "finetune+adapters",
    "adapt_only": "adapt only",
}
# the paired comparisons the study reports, (a, b): a - b per checkpoint, variant and seed
COMPARISONS = (
    ("adapt_finetune", "pretrain_finetune"),  # the paper's claim
    ("finetune_adapters", "pretrain_finetune"),  # what the adapters' extra capacity alone does
    ("adapt_finetune", "finetune_adapters"),  # what the frozen phase does, at equal capacity
)


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One trained model of the grid."""

    id: str
    checkpoint: str
    paradigm: str
    task: str | None  # single_task: the one task
    adapter: str  # adapter kind, "none" for single_task / pretrain_finetune
    lv: bool
    seed: int
    lv_context: str = ""  # LV-on cells: model.lv_adapter.context (per_task | shared)

    @property
    def row(self) -> tuple:
        """The table row this cell belongs to (seeds and single tasks are averaged / merged into it)."""
        return (self.checkpoint, self.paradigm, self.adapter, self.lv, self.lv_context)


def plan_cells(cfg: Config) -> list[Cell]:
    """Every distinct cell of the grid, in a stable order (shared cells once)."""
    st = cfg.study
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> None:
        cells.setdefault(cell.id, cell)

    # seed-major: a study cut short still holds every checkpoint and paradigm for the first seeds
    for seed in st.seeds:
        for ck, ck_cfg in st.checkpoints.items():
            for paradigm in st.paradigms:
                if paradigm == "single_task":
                    for task in cfg.model.tasks:
                        add(Cell(f"{ck}-single_{task}-s{seed}", ck, paradigm, task, "none", False, seed))
                    continue
                for lv in ck_cfg.lv_adapter if ck_cfg.lv_adapter is not None else st.lv_adapter:
                    for context in st.lv_context if lv else [""]:
                        lv_tag = "" if not lv else "-lv" if context == "per_task" else f"-lv{context}"
                        if paradigm == "pretrain_finetune":
                            add(Cell(f"{ck}-{paradigm}{lv_tag}-s{seed}", ck, paradigm, None, "none", lv, seed, context))
                            continue
                        for kind in st.adapter_kinds:
                            add(Cell(f"{ck}-{paradigm}-{kind}{lv_tag}-s{seed}", ck, paradigm, None, kind, lv, seed,
                                     context))
    return list(cells.values())


def stage_steps(cfg: Config, paradigm: str) -> list[tuple[str, int]]:
    """[(stage kind, optimizer steps)] of a multi-task paradigm under the budget rule (module docstring);
    single_task at equal steps (`cell_stages` cuts it to its labels under equal_labels)."""
    st = cfg.study
    epochs = st.total_steps // st.steps_per_epoch
    if paradigm in ("single_task", "pretrain_finetune", "finetune_adapters"):
        return [("finetune", st.total_steps)]
    if paradigm == "adapt_only":
        return [("adapt", st.total_steps)]
    adapt = min(epochs - 1, max(1, int(math.floor(st.adapt_fraction * epochs + 0.5))))
    return [("adapt", adapt * st.steps_per_epoch), ("finetune", (epochs - adapt) * st.steps_per_epoch)]


def label_shares(train: list[dict], tasks) -> dict[str, float]:
    """{task: the fraction of the multi-task training records that carry its labels}."""
    return {t: sum(t in r["labels"] for r in train) / len(train) for t in tasks}


def epoch_steps(cfg: Config, cell: Cell, shares: dict[str, float] | None) -> int:
    """Optimizer steps per epoch of a cell: study.steps_per_epoch, except a single-task cell under
    `exposure: equal_labels`, cut to its task's share of the multi-task frames (at least one step)."""
    spe = cfg.study.steps_per_epoch
    if cell.paradigm != "single_task" or cfg.study.exposure != "equal_labels" or shares is None:
        return spe
    return max(1, int(math.floor(shares[cell.task] * spe + 0.5)))


def cell_stages(cfg: Config, cell: Cell, shares: dict[str, float] | None = None) -> list[tuple[str, int, int]]:
    """[(stage kind, epochs, steps per epoch)] of a cell."""
    spe = epoch_steps(cfg, cell, shares)
    return [(kind, steps // cfg.study.steps_per_epoch, spe) for kind, steps in stage_steps(cfg, cell.paradigm)]


def cell_steps(cfg: Config, cell: Cell, shares: dict[str, float] | None = None) -> int:
    return sum(epochs * spe for _, epochs, spe in cell_stages(cfg, cell, shares))


def labelled_samples(cfg: Config, cell: Cell, shares: dict[str, float] | None) -> dict[str, float | None]:
    """{task: the labelled samples of the task the cell's model is expected to see} (steps x batch x
    workers, x the task's share of the frames for a multi-task cell); None where shares are unknown."""
    batch = cfg.data.batch_size * max(1, cfg.ray.num_workers)
    steps = cell_steps(cfg, cell, shares)
    if cell.task is not None:
        return {cell.task: float(steps * batch)}
    return {t: (steps * batch * shares[t] if shares is not None else None) for t in cfg.model.tasks}


def capacity(cfg: Config, cell_or_row) -> str:
    """What trains, in words: the adapters a row has and whether a frozen phase precedes finetuning."""
    paradigm, adapter = cell_or_row["paradigm"], cell_or_row["adapter"]
    if adapter == "none":
        return "no adapters"
    if paradigm == "finetune_adapters":
        return f"{adapter} adapters, all train from step 0"
    if paradigm == "adapt_only":
        return f"{adapter} adapters, backbone frozen throughout"
    adapt = stage_steps(cfg, paradigm)[0][1]
    return f"{adapter} adapters, backbone frozen for the first {adapt} steps"


@dataclass(frozen=True)
class Weights:
    """Where a checkpoint's backbone weights are, resolved (a published file, or one made here)."""

    path: str
    format: str
    backbone: str
    trust_checkpoint: bool = False


def checkpoint_weights(cfg: Config, out_dir: str) -> dict[str, Weights]:
    out = {}
    for name, ck in cfg.study.checkpoints.items():
        backbone = ck.backbone or cfg.model.backbone.name
        if ck.pretrain is not None:
            path = storage.join(out_dir, CHECKPOINTS_DIR, f"{name}.pth")
            out[name] = Weights(path, METHOD_FORMAT[ck.pretrain.method], backbone)
        else:
            out[name] = Weights(ck.weights, ck.format, backbone, ck.trust_checkpoint)
    return out


def cell_config(base: Config, cell: Cell, weights: Weights, source: str = "<study>",
                shares: dict[str, float] | None = None) -> Config:
    """The `paf-ray run` config of one cell: the base with the cell's checkpoint, tasks, adapters,
    LV-Adapter, seed and budget-split stages (`shares`: the label shares of the exposure control)."""
    data = to_dict(base)
    data.pop("study", None)
    data.pop("tune", None)
    data["name"] = cell.id
    data["command"] = "run"
    bb = data["model"]["backbone"]
    bb.update({"name": weights.backbone, "weights": weights.path, "format": weights.format,
               "trust_checkpoint": weights.trust_checkpoint})
    if cell.task is not None:
        data["model"]["tasks"] = [cell.task]
    data["model"]["adapter"]["kind"] = cell.adapter
    data["model"]["lv_adapter"]["enabled"] = cell.lv
    if cell.lv:
        data["model"]["lv_adapter"]["context"] = cell.lv_context
    data["train"]["seed"] = cell.seed
    templates = {s["kind"]: s for s in data["train"]["stages"]}
    stages = []
    for kind, epochs, spe in cell_stages(base, cell, shares):
        stage = dict(templates[kind])
        stage["epochs"] = epochs
        stage["max_steps_per_epoch"] = spe
        stages.append(stage)
    data["train"]["stages"] = stages
    return from_dict(data, f"{source} (cell {cell.id})")


def load_study(path: str, overrides: list[str] | tuple[str, ...] = (), quick: bool = False) -> Config:
    """The study file, with its `study.quick` overrides applied first when `quick` (then --set)."""
    cfg = load_config(path, overrides)
    if cfg.command != "study":
        raise ConfigError(f"{path}: command: a study file has `command: study`, got {cfg.command!r}")
    if quick:
        if not cfg.study.quick:
            raise ConfigError(f"{path}: study.quick: --quick needs overrides here (dotted key -> value)")
        quick_sets = [f"{k}={json.dumps(v)}" for k, v in cfg.study.quick.items()]
        cfg = load_config(path, [*quick_sets, *overrides])
    return cfg


def check_study(cfg: Config, source: str) -> list[Cell]:
    """Everything that can be wrong before a cell starts: the config of every cell is built."""
    cells = plan_cells(cfg)
    weights = checkpoint_weights(cfg, "/<study>")
    for cell in cells:
        cell_config(cfg, cell, weights[cell.checkpoint], source)
    return cells


def check_epoch_length(cfg: Config, cells: list[Cell]) -> None:
    """Every cell's data must hold `study.steps_per_epoch` batches, or its epochs would be cut short
    and the paradigms would train for different step counts."""
    for tasks in sorted({(c.task,) if c.task else tuple(cfg.model.tasks) for c in cells}):
        sub = replace(cfg, model=replace(cfg.model, tasks=list(tasks)))
        sub, train, _ = prepare_data(sub)
        have = steps_per_epoch(len(train), sub)
        if have < cfg.study.steps_per_epoch:
            raise ConfigError(
                f"study.steps_per_epoch: {cfg.study.steps_per_epoch} steps, but the {'+'.join(tasks)} training data "
                f"holds {have} batches of {cfg.data.batch_size} ({len(train)} samples); lower it or add data"
            )


# --------------------------------------------------------------------------- checkpoints made here


def pretrain_records(cfg: Config, data_seed: int | None) -> list[dict]:
    """The training frames a checkpoint made here learns from: the base config's (`data_seed` None), or
    those of a synthetic set like data.synth but generated with `data_seed` (other frames, other labels)."""
    if data_seed is not None:
        cfg = replace(cfg, data=replace(cfg.data, synth=replace(cfg.data.synth, seed=data_seed)))
    return prepare_data(cfg)[1]


def make_checkpoints(cfg: Config, out_dir: str, weights: dict[str, Weights]) -> dict[str, dict]:
    """Pretrain every `study.checkpoints.<name>.pretrain` (once: a file whose settings match is reused)."""
    made: dict[str, dict] = {}
    records: dict[int | None, list[dict]] = {}
    for name, ck in cfg.study.checkpoints.items():
        if ck.pretrain is None:
            continue
        path = weights[name].path
        options = cfg.model.backbone.options.get(weights[name].backbone)  # its section (tiny: width), if any
        settings = {"pretrain": to_dict(ck.pretrain), "backbone": weights[name].backbone,
                    "backbone_options": None if options is None else asdict(options),
                    "data": to_dict(cfg.data.synth), "root": cfg.data.root}
        sidecar = path.removesuffix(".pth") + ".json"
        previous = read_json(sidecar)
        if previous is not None and previous.get("settings") == settings and storage.exists(path):
            print(f"[study] checkpoint {name}: reusing {path}", flush=True)
            made[name] = previous["summary"]
            continue
        seed = ck.pretrain.data_seed
        if seed not in records:
            records[seed] = pretrain_records(cfg, seed)
        where = "the study's training frames" if seed is None else f"a synthetic set of data seed {seed}"
        print(f"[study] checkpoint {name}: {ck.pretrain.method} pretraining, {ck.pretrain.steps} steps "
              f"on {len(records[seed])} frames of {where} -> {path}", flush=True)
        backbone = replace(cfg.model.backbone, name=weights[name].backbone)
        summary = pretrain_checkpoint(backbone, records[seed], ordered(cfg.model.tasks), path, ck.pretrain)
        summary["data_seed"] = seed
        print(f"[study] checkpoint {name}: {summary}", flush=True)
        write_text(sidecar, json.dumps({"settings": settings, "summary": summary}, indent=2))
        made[name] = summary
    return made


# --------------------------------------------------------------------------- running


def run_cell(params: dict, cells: dict[str, dict], runs_dir: str) -> None:
    """Tune function trainable: the cell named by the grid value `cell`."""
    cell_id = params["cell"]
    run_in_trial(from_dict(cells[cell_id], f"study cell {cell_id}"), runs_dir)


def cell_metrics(runs_dir: str, cell_id: str) -> dict | None:
    """The final metrics of a finished cell (its summary.json), else None."""
    summary = read_json(storage.join(runs_dir, cell_id, SUMMARY_FILE))
    if summary is None:
        return None
    return {**summary.get("metrics", {}), "wall_s": summary.get("wall_s")}


class StudyProgress(ray.tune.Callback):
    """One line per finished cell (cells done / total, elapsed time, ETA), and the results files
    rewritten from the cells finished so far (marked incomplete until the last one)."""

    def __init__(self, total: int, runs_dir: str, done_before: int, keys: list[str], report=None):
        self.total, self.runs_dir, self.done_before, self.report = total, runs_dir, done_before, report
        self.keys = keys
        self.t0 = time.perf_counter()
        self.finished = 0  # in this session

    def _line(self, trial, what: str) -> None:
        self.finished += 1
        done = self.done_before + self.finished
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.finished * max(0, self.total - done)
        cell_id = trial.config.get("cell")
        metrics = cell_metrics(self.runs_dir, cell_id) or {}
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in self.keys if _finite(metrics.get(k)))
        print(f"[study] {done}/{self.total} cells done: {cell_id} {what}{f' ({shown})' if shown else ''}; "
              f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
        if self.report is not None:
            try:
                self.report()
            except Exception as e:  # a table that cannot be drawn yet must not stop the cells
                print(f"[study] could not write the interim results: {type(e).__name__}: {e}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")


def build_tuner(cfg: Config, out_dir: str, cells: list[Cell], cell_cfgs: dict[str, dict], resume: bool, done_before: int):
    runs_dir = storage.join(out_dir, CELLS_DIR)
    trainable = ray.tune.with_parameters(run_cell, cells=cell_cfgs, runs_dir=runs_dir)
    trainable = ray.tune.with_resources(trainable, trial_resources(cfg))
    report = functools.partial(report_folder, cfg, out_dir)
    callbacks = [StudyProgress(len(cells), runs_dir, done_before, table_keys(cfg.model.tasks), report)]
    experiment = storage.join(out_dir, cfg.name)
    restored = restore_or_refuse(experiment, trainable, resume)
    if restored is not None:
        if getattr(restored, "_local_tuner", None) is not None:  # progress counts start from this session
            restored._local_tuner.get_run_config().callbacks = callbacks
        return restored
    return ray.tune.Tuner(
        trainable,
        param_space={"cell": ray.tune.grid_search([c.id for c in cells])},
        tune_config=ray.tune.TuneConfig(
            # the grid's own generator limits concurrency (Tune ignores max_concurrent_trials with it)
            search_alg=BasicVariantGenerator(max_concurrent=cfg.tune.max_concurrent_trials),
            scheduler=FIFOScheduler(),
            num_samples=1,
            trial_dirname_creator=lambda trial: f"cell_{trial.config['cell']}",
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name,
            storage_path=out_dir,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.max_failures),
            callbacks=callbacks,
        ),
    )


def run_study(cfg: Config, out: str | None = None, resume: bool = False, source: str = "<study>") -> dict:
    """Make the checkpoints, run every cell (or the unfinished ones, with `resume`), write the results."""
    t0 = time.perf_counter()
    cells = check_study(cfg, source)
    out_dir = sweep_dir(cfg, out)
    if not storage.is_uri(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    runs_dir = storage.join(out_dir, CELLS_DIR)
    init_ray(cfg.ray.address, object_store_mb=cfg.ray.object_store_mb, connect_timeout_s=cfg.ray.connect_timeout_s)
    warm_data_cache(cfg)
    check_epoch_length(cfg, cells)
    weights = checkpoint_weights(cfg, out_dir)
    make_checkpoints(cfg, out_dir, weights)  # written beside the study; the results read them back
    _, train, _ = prepare_data(cfg)
    shares = label_shares(train, cfg.model.tasks)
    write_text(storage.join(out_dir, PLAN_FILE), json.dumps({"exposure": cfg.study.exposure, "label_shares": shares,
                                                             "train_frames": len(train)}, indent=2))
    cell_cfgs = {c.id: to_dict(cell_config(cfg, c, weights[c.checkpoint], source, shares)) for c in cells}
    done_before = sum(cell_metrics(runs_dir, c.id) is not None for c in cells) if resume else 0
    split = {p: stage_steps(cfg, p) for p in cfg.study.paradigms if p != "single_task"}
    singles = {t: cell_steps(cfg, Cell("", "", "single_task", t, "none", False, 0), shares) for t in cfg.model.tasks}
    print(f"[study] {len(cells)} cells ({done_before} already done); multi-task cells {cfg.study.total_steps} steps: "
          + "; ".join(f"{p} " + " + ".join(f"{k} {n}" for k, n in s) for p, s in split.items())
          + f"; single-task ({cfg.study.exposure}): " + ", ".join(f"{t} {n}" for t, n in singles.items())
          + " (label shares " + ", ".join(f"{t} {v:.2f}" for t, v in shares.items()) + ")", flush=True)
    tuner = build_tuner(cfg, out_dir, cells, cell_cfgs, resume, done_before)
    tuner.fit()
    results = report_folder(cfg, out_dir, wall_s=round(time.perf_counter() - t0, 1))
    return {"out_dir": out_dir, **results}


def report_folder(cfg: Config, out_dir: str, wall_s: float | None = None) -> dict:
    """Write study.csv/.json/.md/.png from the cells finished in `out_dir` so far (`--report`)."""
    pretrained = {}
    for name, w in checkpoint_weights(cfg, out_dir).items():
        if cfg.study.checkpoints[name].pretrain is not None:
            pretrained[name] = (read_json(w.path.removesuffix(".pth") + ".json") or {}).get("summary")
    cells = plan_cells(cfg)
    shares = (read_json(storage.join(out_dir, PLAN_FILE)) or {}).get("label_shares")
    rows = cell_rows(cfg, cells, storage.join(out_dir, CELLS_DIR), shares)
    return write_results(cfg, rows, out_dir, wall_s, pretrained, shares)


# --------------------------------------------------------------------------- results


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def delta_mtl(metrics: dict, baselines: dict[str, float], tasks: list[str]) -> float | None:
    """Δ_MTL (Maninis et al. 2019), in %: (1/T) Σ_t (-1)^l_t (M_t - M_single,t) / M_single,t, with
    l_t = 0 for a higher-is-better headline, 1 otherwise. None when a value or baseline is missing or 0."""
    terms = []
    for t in tasks:
        m, b = metrics.get(TASKS[t].headline), baselines.get(t)
        if not _finite(m) or not _finite(b) or b == 0:
            return None
        terms.append((m - b) / b * (1 if TASKS[t].higher_is_better else -1))
    return 100.0 * sum(terms) / len(terms)


def cell_rows(cfg: Config, cells: list[Cell], runs_dir: str, shares: dict[str, float] | None = None) -> list[dict]:
    """One row per cell (so per seed): its metrics, its exposure (steps, labelled samples of each task), its
    capacity, and for a multi-task cell Δ_MTL against the single-task models of the same checkpoint: their
    mean over seeds (`delta_mtl`, what the table shows), and the one of the same seed (`delta_mtl_seed`; the
    seeds' mean where that seed has none). `shares`: the label shares the study ran with (plan.json)."""
    tasks = list(cfg.model.tasks)
    metrics = {c.id: cell_metrics(runs_dir, c.id) for c in cells}
    single: dict[tuple[str, str], dict[int, float]] = {}
    for c in cells:
        m = metrics[c.id]
        if c.paradigm == "single_task" and m is not None and _finite(m.get(TASKS[c.task].headline)):
            single.setdefault((c.checkpoint, c.task), {})[c.seed] = m[TASKS[c.task].headline]
    rows = []
    for c in cells:
        m = metrics[c.id] or {}
        row: dict[str, Any] = {"cell": c.id, "checkpoint": c.checkpoint, "paradigm": c.paradigm, "task": c.task or "",
                               "adapter": c.adapter, "lv_adapter": c.lv, "lv_context": c.lv_context, "seed": c.seed,
                               "status": "done" if metrics[c.id] is not None else "missing"}
        cell_tasks = [c.task] if c.task else tasks
        for key in table_keys(tasks):
            row[key] = float(m[key]) if key_task(key) in cell_tasks and _finite(m.get(key)) else None
        row["delta_mtl"] = row["delta_mtl_seed"] = None
        if c.paradigm != "single_task":
            seeds = {t: single[(c.checkpoint, t)] for t in tasks if single.get((c.checkpoint, t))}
            mean = {t: statistics.fmean(v.values()) for t, v in seeds.items()}
            row["delta_mtl"] = delta_mtl(m, mean, tasks)
            row["delta_mtl_seed"] = delta_mtl(m, {t: v.get(c.seed, mean[t]) for t, v in seeds.items()}, tasks)
        row["exposure"] = cfg.study.exposure
        row["steps"] = cell_steps(cfg, c, shares)
        seen = labelled_samples(cfg, c, shares)
        for t in tasks:
            row[f"labels_{t}"] = seen.get(t)
        row["capacity"] = capacity(cfg, row)
        row["wall_s"] = m.get("wall_s")
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int] | None:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _group(r: dict) -> tuple:
    return (r["checkpoint"], r["paradigm"], r["adapter"], r["lv_adapter"], r["lv_context"])


def table_rows(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows of the paper table: checkpoint x paradigm (x adapter kind, x LV and its context), each value
    (mean, std, n) over seeds; the single-task row of a checkpoint gathers its per-task models. `steps` and
    `labels` ({task: value}) give the row's exposure (a single-task row: its task models')."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    tasks = [key_task(k) for k in keys]
    out = []
    for (ck, paradigm, adapter, lv, context), members in groups.items():
        done = [m for m in members if m["status"] == "done"]
        if not done:  # a study still running (or cut short): rows appear as their cells finish
            continue
        entry: dict[str, Any] = {"checkpoint": ck, "paradigm": paradigm, "adapter": adapter, "lv_adapter": lv,
                                 "lv_context": context, "seeds": sorted({m["seed"] for m in done}),
                                 "capacity": members[0]["capacity"]}
        for key in keys:
            entry[key] = _mean_std([m[key] for m in done if m[key] is not None])
        entry["delta_mtl"] = (0.0, 0.0, len(entry["seeds"])) if paradigm == "single_task" else \
            _mean_std([m["delta_mtl"] for m in done if m["delta_mtl"] is not None])
        if paradigm == "single_task":
            entry["steps"] = {m["task"]: m["steps"] for m in members}
        else:
            entry["steps"] = {"all": members[0]["steps"]}
        entry["labels"] = {t: next((m[f"labels_{t}"] for m in members if m.get(f"labels_{t}") is not None), None)
                           for t in tasks}
        out.append(entry)
    order = {p: i for i, p in enumerate(PARADIGM_LABEL)}
    checkpoints = {ck: i for i, ck in enumerate(dict.fromkeys(r["checkpoint"] for r in rows))}  # as in the file
    return sorted(out, key=lambda e: (checkpoints[e["checkpoint"]], order[e["paradigm"]], e["lv_adapter"],
                                      e["lv_context"], e["adapter"]))


def variant_label(adapter: str, lv: bool, context: str) -> str:
    text = "no adapters" if adapter == "none" else f"{adapter} adapters"
    return text + (f", LV-Adapter ({context.replace('_', '-')} context)" if lv else "")


def row_label(entry: dict) -> str:
    label = PARADIGM_LABEL[entry["paradigm"]]
    if entry["adapter"] != "none":
        label += f" ({entry['adapter']})"
    if entry["lv_adapter"]:
        label += " + LV" + (" (shared context)" if entry["lv_context"] == "shared" else "")
    return label


def _fmt(v: tuple | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    mean, std, n = v
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{text} ± {std:.2f}" if n > 1 else text


# --------------------------------------------------------------------------- intervals

# Student's t, 0.975 quantile (two-sided 95 %) by degrees of freedom; between the rows the next lower
# row is used (a slightly wider interval). Printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_975(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (non-integer df, as Welch's, rounded
    down); inf below 1."""
    if not df >= 1:
        return math.inf
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(diffs: list[float]) -> dict | None:
    """Mean of paired differences with its two-sided 95 % Student t-interval (None bounds for n < 2)."""
    if not diffs:
        return None
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "lo": None, "hi": None}
    half = t_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def welch_interval(a: list[float], b: list[float]) -> dict | None:
    """mean(a) - mean(b) with its two-sided 95 % Welch interval (unpaired, unequal variances; None bounds
    unless both sides have at least 2 values)."""
    if not a or not b:
        return None
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"n": len(a), "n_b": len(b), "mean": mean, "lo": None, "hi": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    half = t_975(df) * math.sqrt(va + vb)
    return {"n": len(a), "n_b": len(b), "mean": mean, "lo": mean - half, "hi": mean + half}


def verdict(interval: dict, higher_is_better: bool = True) -> str:
    """"better" / "worse" when the 95 % interval excludes 0, else "not resolved at n=N seeds"."""
    lo, hi, n = interval["lo"], interval["hi"], interval["n"]
    if lo is not None and (lo > 0 or hi < 0):
        return "better" if (lo > 0) == higher_is_better else "worse"
    return f"not resolved at n={n} seed{'s' if n != 1 else ''}"


def _higher_is_better(key: str) -> bool:
    return key == "delta_mtl" or TASKS[key_task(key)].higher_is_better


def comparisons(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Every comparison the study reports, one entry per (checkpoint, arms, variant, metric):

    * paired (COMPARISONS): a - b per seed, same checkpoint, adapter kind and LV, with the 95 % t-interval of
      the mean difference; pretrain_finetune, which has no adapters, is the partner of every adapter kind;
    * against single-task (each multi-task arm, per task metric): the multi-task models' mean minus the
      single-task models' mean over seeds, with the 95 % Welch interval (the single-task model of a task
      serves every arm, so the difference is not paired by arm)."""
    rows = [r for r in rows if r["status"] == "done"]
    keys = table_keys(tasks)
    by = {(*_group(r), r["seed"]): r for r in rows}
    out = []
    for ck in dict.fromkeys(r["checkpoint"] for r in rows):
        for a, b in COMPARISONS:
            variants = sorted({_group(r)[2:] for r in rows if r["checkpoint"] == ck and r["paradigm"] == a})
            for adapter, lv, context in variants:
                partner_adapter = "none" if b == "pretrain_finetune" else adapter
                pairs = [(r, by[(ck, b, partner_adapter, lv, context, r["seed"])]) for r in rows
                         if _group(r) == (ck, a, adapter, lv, context)
                         and (ck, b, partner_adapter, lv, context, r["seed"]) in by]
                if not pairs:
                    continue
                for key in [*keys, "delta_mtl"]:
                    iv = paired_interval([x[key] - y[key] for x, y in pairs if _finite(x[key]) and _finite(y[key])])
                    if iv is not None:
                        out.append({"checkpoint": ck, "a": a, "b": b, "adapter": adapter, "lv_adapter": lv,
                                    "lv_context": context, "key": key, "kind": "paired", **iv,
                                    "verdict": verdict(iv, _higher_is_better(key))})
        singles = {key_task(k): [r[k] for r in rows if r["checkpoint"] == ck and r["paradigm"] == "single_task"
                                 and r["task"] == key_task(k) and _finite(r[k])] for k in keys}
        for group in dict.fromkeys(_group(r) for r in rows if r["checkpoint"] == ck and r["paradigm"] != "single_task"):
            members = [r for r in rows if _group(r) == group]
            for key in keys:
                iv = welch_interval([r[key] for r in members if _finite(r[key])], singles[key_task(key)])
                if iv is not None:
                    out.append({"checkpoint": ck, "a": group[1], "b": "single_task", "adapter": group[2],
                                "lv_adapter": group[3], "lv_context": group[4], "key": key, "kind": "welch", **iv,
                                "verdict": verdict(iv, _higher_is_better(key))})
    return out


def _key_label(key: str) -> str:
    return "Δ_MTL" if key == "delta_mtl" else key.replace("/", " ")


def _interval_text(c: dict) -> str:
    unit = " points" if c["key"] == "delta_mtl" else ""
    n = f"n={c['n']}" if c["kind"] == "paired" else f"n={c['n']}/{c['n_b']}"
    if c["lo"] is None:
        return f"{c['mean']:+.2f}{unit}, no interval at {n}"
    return f"{c['mean']:+.2f}{unit}, 95% CI [{c['lo']:+.2f}, {c['hi']:+.2f}], {n}"


def sentences(comps: list[dict]) -> list[str]:
    """One sentence per checkpoint, arms and variant, each verdict read off its interval."""
    groups: dict[tuple, list[dict]] = {}
    for c in comps:
        groups.setdefault((c["checkpoint"], c["kind"], c["a"], c["b"], c["adapter"], c["lv_adapter"], c["lv_context"]),
                          []).append(c)
    out = []
    for (ck, kind, a, b, adapter, lv, context), items in groups.items():
        parts = "; ".join(f"{_key_label(c['key'])}: {c['verdict']} ({_interval_text(c)})" for c in items)
        if kind == "paired":
            out.append(f"{ck} ({variant_label(adapter, lv, context)}): {PARADIGM_LABEL[a]} against "
                       f"{PARADIGM_LABEL[b]}, paired by seed: {parts}.")
        else:
            out.append(f"{ck}: {PARADIGM_LABEL[a]} ({variant_label(adapter, lv, context)}) against the single-task "
                       f"models (difference of means, Welch interval): {parts}.")
    return out


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def exposure_text(cfg: Config, shares: dict[str, float] | None) -> str:
    st = cfg.study
    share = "" if not shares else " (label shares of the multi-task frames: " + ", ".join(
        f"{t} {v:.2f}" for t, v in shares.items()) + ")"
    if st.exposure == "equal_labels":
        return (f"Exposure control: equal_labels: every multi-task cell trains {st.total_steps} optimizer steps of batch "
                f"{cfg.data.batch_size} (adapt steps counted); each single-task model trains on as many labelled "
                f"samples of its task as a multi-task cell sees{share}.")
    return (f"Exposure control: equal_steps: every cell trains {st.total_steps} optimizer steps of batch "
            f"{cfg.data.batch_size} (adapt steps counted), so a single-task model sees more labels of its task than a "
            f"multi-task model{share}.")


def _exposure_cells(e: dict) -> list[str]:
    steps = ", ".join(f"{t} {n}" if t != "all" else str(n) for t, n in e["steps"].items())
    labels = ", ".join(f"{t} {v:.0f}" for t, v in e["labels"].items() if v is not None) or "-"
    return [steps, labels]


def table_markdown(cfg: Config, table: list[dict], comps: list[dict], lines_after: list[str],
                   shares: dict[str, float] | None = None) -> str:
    keys = table_keys(cfg.model.tasks)
    header = ["checkpoint", "paradigm", "capacity", "seeds", "steps", "labelled samples",
              *(k.replace("/", " ") for k in keys), "Δ_MTL (%)"]
    lines = [f"# Study {cfg.name}", "", exposure_text(cfg, shares),
             "Values are % on the val split, mean ± std over seeds. Δ_MTL (Maninis et al. 2019; all metrics "
             "higher-is-better) is against the single-task models of the same checkpoint, averaged over seeds "
             "(study.csv: `delta_mtl_seed` against the same seed's).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in table:
        cells = [e["checkpoint"], row_label(e), e["capacity"], str(len(e["seeds"])), *_exposure_cells(e)]
        cells += [_fmt(e[k]) for k in keys]
        cells.append("0 (reference)" if e["paradigm"] == "single_task" else _fmt(e["delta_mtl"], signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(e["delta_mtl"] is None for e in table):
        lines += ["Δ_MTL `-`: a single-task baseline of that checkpoint is missing or 0 (the relative change "
                  "is undefined).", ""]
    paired = [c for c in comps if c["kind"] == "paired"]
    if paired:
        head = ["checkpoint", "a − b", "variant", "metric", "n", "mean a − b", "95% t-interval", "verdict"]
        lines += ["Paired differences (a − b per seed; the verdict is read off the interval):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in paired:
            ci = "-" if c["lo"] is None else f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"
            lines.append(f"| {c['checkpoint']} | {PARADIGM_LABEL[c['a']]} − {PARADIGM_LABEL[c['b']]} | "
                         f"{variant_label(c['adapter'], c['lv_adapter'], c['lv_context'])} | {_key_label(c['key'])} | "
                         f"{c['n']} | {c['mean']:+.2f} | {ci} | {c['verdict']} |")
        lines.append("")
    lines += [f"- {s}" for s in lines_after]
    return "\n".join(lines) + "\n"


def plot_table(table: list[dict], tasks: list[str], path: str) -> str:
    """study.png: one panel per task metric and Δ_MTL, bars grouped by checkpoint, error bars = std over seeds."""
    panels = [(k, k.replace("/", " ")) for k in table_keys(tasks)]
    panels.append(("delta_mtl", "Δ_MTL (%)"))
    checkpoints = list(dict.fromkeys(e["checkpoint"] for e in table))
    variants = list(dict.fromkeys(row_label(e) for e in table))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    width = 0.8 / max(1, len(variants))
    colors = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes, panels):
        for j, variant in enumerate(variants):
            xs, ys, errs = [], [], []
            for i, ck in enumerate(checkpoints):
                e = next((e for e in table if e["checkpoint"] == ck and row_label(e) == variant), None)
                if e is None or e[key] is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(e[key][0])
                errs.append(e[key][1])
            if xs:
                ax.bar(xs, ys, width, yerr=errs, capsize=3, color=colors(j % 10), label=variant)
        ax.set_xticks(range(len(checkpoints)))
        ax.set_xticklabels(checkpoints)
        ax.set_title(title)
        if key == "delta_mtl":
            ax.axhline(0.0, color="black", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    files.write_bytes(path, buf.getvalue())
    return path


def write_results(cfg: Config, rows: list[dict], out_dir: str, wall_s: float, pretrained: dict | None = None,
                  shares: dict[str, float] | None = None) -> dict:
    """study.csv, study.json, study.md, study.png in the study folder."""
    tasks = list(cfg.model.tasks)
    table = table_rows(rows, table_keys(tasks))
    comps = comparisons(rows, tasks)
    said = sentences(comps)
    missing = [r["cell"] for r in rows if r["status"] != "done"]
    notes = said + ([f"INCOMPLETE: {len(missing)} of {len(rows)} cells have no result: {', '.join(missing)}"]
                    if missing else [])
    markdown = table_markdown(cfg, table, comps, notes, shares)
    write_text(storage.join(out_dir, "study.csv"), rows_csv(rows))
    write_text(storage.join(out_dir, "study.md"), markdown)
    plot_table(table, tasks, storage.join(out_dir, "study.png"))
    singles = {t: cell_steps(cfg, Cell("", "", "single_task", t, "none", False, 0), shares) for t in tasks}
    budget = {"rule": "equal optimizer steps per multi-task cell, adapt steps counted", "exposure": cfg.study.exposure,
              "label_shares": shares, "total_steps": cfg.study.total_steps,
              "steps_per_epoch": cfg.study.steps_per_epoch, "batch_size": cfg.data.batch_size,
              "stages": {p: stage_steps(cfg, p) for p in cfg.study.paradigms if p != "single_task"},
              "single_task_steps": singles if "single_task" in cfg.study.paradigms else {}}
    doc = {"name": cfg.name, "out_dir": out_dir, "budget": budget, "cells": rows, "table": table,
           "comparisons": comps, "sentences": said, "complete": not missing, "cells_done": len(rows) - len(missing),
           "wall_s": wall_s, "checkpoints_made": pretrained or {}}
    write_text(storage.join(out_dir, "study.json"), json.dumps(doc, indent=2, default=float))
    return {"rows": rows, "table": table, "comparisons": comps, "sentences": said, "markdown": markdown,
            "complete": not missing, "wall_s": wall_s}
