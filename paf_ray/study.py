"""`paf-ray study STUDY.yaml`: the paper's comparison grid as one Ray Tune run, and its table.

A study file is a config (the base of every cell) with a `study:` section naming the grid:
checkpoints x paradigms x adapter kinds x LV-Adapter off/on x seeds (docs/study.md). Each
**cell** is one Tune trial of a grid search (basic variant generator, FIFO: no search, no early
stopping) whose trainable is the same one-pipeline-per-trial body as `paf-ray tune`'s.

The budget rule: **every cell trains `study.total_steps` optimizer steps, adapt steps counted**,
each step one batch of `data.batch_size` per worker. Stages are cut into epochs of
`study.steps_per_epoch` steps (one Tune iteration each):

    single_task         finetune, total_steps, one model per task (model.tasks = [task])
    pretrain_finetune   finetune, total_steps, no adapters
    adapt_finetune      adapt round(adapt_fraction * total_steps) (whole epochs, >= 1), finetune the rest
    adapt_only          adapt, total_steps (the backbone never trains)

Stage settings (lr, schedule, warm-up, head lr) come from the base config's two stages
[adapt, finetune]. Cells that share work run once: a single-task baseline depends only on
checkpoint, task and seed (it serves every adapter kind and LV row), pretrain_finetune on
checkpoint, LV and seed. A study folder holds:

    checkpoints/<name>.pth   checkpoints made here (study.checkpoints.<name>.pretrain) + .json
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


def table_keys(tasks) -> list[str]:
    """The metric of each task the table shows and Δ_MTL uses: its headline."""
    return [TASKS[t].headline for t in tasks]


def key_task(key: str) -> str:
    return key.split("/", 1)[0]


PARADIGM_LABEL = {
    "single_task": "single-task",
    "pretrain_finetune": "pretrain→finetune",
    "adapt_finetune": "adapt→finetune",
    "adapt_only": "adapt only",
}


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

    @property
    def row(self) -> tuple:
        """The table row this cell belongs to (seeds and single tasks are averaged / merged into it)."""
        return (self.checkpoint, self.paradigm, self.adapter, self.lv)


def plan_cells(cfg: Config) -> list[Cell]:
    """Every distinct cell of the grid, in a stable order (shared cells once)."""
    st = cfg.study
    cells: dict[str, Cell] = {}
    # seed-major: a study cut short still holds every checkpoint and paradigm for the first seeds
    for seed in st.seeds:
        for ck, ck_cfg in st.checkpoints.items():
            for paradigm in st.paradigms:
                if paradigm == "single_task":
                    for task in cfg.model.tasks:
                        cell = Cell(f"{ck}-single_{task}-s{seed}", ck, paradigm, task, "none", False, seed)
                        cells.setdefault(cell.id, cell)
                    continue
                for lv in ck_cfg.lv_adapter if ck_cfg.lv_adapter is not None else st.lv_adapter:
                    lv_tag = "-lv" if lv else ""
                    if paradigm == "pretrain_finetune":
                        cell = Cell(f"{ck}-{paradigm}{lv_tag}-s{seed}", ck, paradigm, None, "none", lv, seed)
                        cells.setdefault(cell.id, cell)
                        continue
                    for kind in st.adapter_kinds:
                        cell = Cell(f"{ck}-{paradigm}-{kind}{lv_tag}-s{seed}", ck, paradigm, None, kind, lv, seed)
                        cells.setdefault(cell.id, cell)
    return list(cells.values())


def stage_steps(cfg: Config, paradigm: str) -> list[tuple[str, int]]:
    """[(stage kind, optimizer steps)] of a paradigm under the budget rule (module docstring)."""
    st = cfg.study
    epochs = st.total_steps // st.steps_per_epoch
    if paradigm in ("single_task", "pretrain_finetune"):
        return [("finetune", st.total_steps)]
    if paradigm == "adapt_only":
        return [("adapt", st.total_steps)]
    adapt = min(epochs - 1, max(1, int(math.floor(st.adapt_fraction * epochs + 0.5))))
    return [("adapt", adapt * st.steps_per_epoch), ("finetune", (epochs - adapt) * st.steps_per_epoch)]


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


def cell_config(base: Config, cell: Cell, weights: Weights, source: str = "<study>") -> Config:
    """The `paf-ray run` config of one cell: the base with the cell's checkpoint, tasks, adapters,
    LV-Adapter, seed and budget-split stages."""
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
    data["train"]["seed"] = cell.seed
    templates = {s["kind"]: s for s in data["train"]["stages"]}
    stages = []
    for kind, steps in stage_steps(base, cell.paradigm):
        stage = dict(templates[kind])
        stage["epochs"] = steps // base.study.steps_per_epoch
        stage["max_steps_per_epoch"] = base.study.steps_per_epoch
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


def make_checkpoints(cfg: Config, out_dir: str, weights: dict[str, Weights]) -> dict[str, dict]:
    """Pretrain every `study.checkpoints.<name>.pretrain` (once: a file whose settings match is reused)."""
    made: dict[str, dict] = {}
    records = None
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
        if records is None:
            _, records, _ = prepare_data(cfg)
        print(f"[study] checkpoint {name}: {ck.pretrain.method} pretraining, {ck.pretrain.steps} steps "
              f"on {len(records)} frames -> {path}", flush=True)
        backbone = replace(cfg.model.backbone, name=weights[name].backbone)
        summary = pretrain_checkpoint(backbone, records, ordered(cfg.model.tasks), path, ck.pretrain)
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
    cell_cfgs = {c.id: to_dict(cell_config(cfg, c, weights[c.checkpoint], source)) for c in cells}
    done_before = sum(cell_metrics(runs_dir, c.id) is not None for c in cells) if resume else 0
    split = {p: stage_steps(cfg, p) for p in cfg.study.paradigms}
    print(f"[study] {len(cells)} cells ({done_before} already done), each {cfg.study.total_steps} steps: "
          + "; ".join(f"{p} " + " + ".join(f"{k} {n}" for k, n in s) for p, s in split.items()), flush=True)
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
    return write_results(cfg, cell_rows(cfg, cells, storage.join(out_dir, CELLS_DIR)), out_dir, wall_s, pretrained)


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


def cell_rows(cfg: Config, cells: list[Cell], runs_dir: str) -> list[dict]:
    """One row per cell (and so per seed): its metrics and, for multi-task cells, Δ_MTL against the
    single-task cells of the same checkpoint and seed (the seeds' mean where that seed has none)."""
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
                               "adapter": c.adapter, "lv_adapter": c.lv, "seed": c.seed,
                               "status": "done" if metrics[c.id] is not None else "missing"}
        cell_tasks = [c.task] if c.task else tasks
        for key in table_keys(tasks):
            row[key] = float(m[key]) if key_task(key) in cell_tasks and _finite(m.get(key)) else None
        row["delta_mtl"] = None
        if c.paradigm != "single_task":
            baselines = {}
            for t in tasks:
                seeds = single.get((c.checkpoint, t), {})
                if seeds:
                    baselines[t] = seeds.get(c.seed, statistics.fmean(seeds.values()))
            row["delta_mtl"] = delta_mtl(m, baselines, tasks)
        row["steps"] = cfg.study.total_steps
        row["wall_s"] = m.get("wall_s")
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int] | None:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def table_rows(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows of the paper table: checkpoint x paradigm (x adapter kind, x LV), each value (mean, std, n)
    over seeds; the single-task row of a checkpoint gathers its per-task models."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["paradigm"], r["adapter"], r["lv_adapter"]), []).append(r)
    out = []
    for (ck, paradigm, adapter, lv), members in groups.items():
        members = [m for m in members if m["status"] == "done"]
        if not members:  # a study still running (or cut short): rows appear as their cells finish
            continue
        entry: dict[str, Any] = {"checkpoint": ck, "paradigm": paradigm, "adapter": adapter, "lv_adapter": lv,
                                 "seeds": sorted({m["seed"] for m in members})}
        for key in keys:
            entry[key] = _mean_std([m[key] for m in members if m[key] is not None])
        entry["delta_mtl"] = (0.0, 0.0, len(entry["seeds"])) if paradigm == "single_task" else \
            _mean_std([m["delta_mtl"] for m in members if m["delta_mtl"] is not None])
        out.append(entry)
    order = {p: i for i, p in enumerate(PARADIGM_LABEL)}
    checkpoints = {ck: i for i, ck in enumerate(dict.fromkeys(r["checkpoint"] for r in rows))}  # as in the file
    return sorted(out, key=lambda e: (checkpoints[e["checkpoint"]], order[e["paradigm"]], e["lv_adapter"], e["adapter"]))


def row_label(entry: dict) -> str:
    label = PARADIGM_LABEL[entry["paradigm"]]
    if entry["adapter"] != "none":
        label += f" ({entry['adapter']})"
    if entry["lv_adapter"]:
        label += " + LV"
    return label


def _fmt(v: tuple | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    mean, std, n = v
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{text} ± {std:.2f}" if n > 1 else text


def sentences(rows: list[dict], tasks: list[str]) -> list[str]:
    """Per checkpoint (and adapter kind / LV): did adapt→finetune beat pretrain→finetune, per task
    and on Δ_MTL, in how many seeds (paired by seed)? Computed from the cell rows."""
    rows = [r for r in rows if r["status"] == "done"]
    by = {(r["checkpoint"], r["paradigm"], r["adapter"], r["lv_adapter"], r["seed"]): r for r in rows}
    out = []
    for ck in dict.fromkeys(r["checkpoint"] for r in rows):
        variants = sorted({(r["adapter"], r["lv_adapter"]) for r in rows
                           if r["checkpoint"] == ck and r["paradigm"] == "adapt_finetune"})
        if not variants:
            continue
        for adapter, lv in variants:
            pairs = []
            for r in rows:
                if (r["checkpoint"], r["paradigm"], r["adapter"], r["lv_adapter"]) == (ck, "adapt_finetune", adapter, lv):
                    base = by.get((ck, "pretrain_finetune", "none", lv, r["seed"]))
                    if base is not None:
                        pairs.append((r, base))
            name = f"{ck} ({adapter} adapters{', LV-Adapter' if lv else ''})"
            if not pairs:
                out.append(f"{name}: no pretrain→finetune cells to compare adapt→finetune with.")
                continue
            parts = []
            for key, label in [(k, k.replace("/", " ")) for k in table_keys(tasks)] + [("delta_mtl", "Δ_MTL")]:
                diffs = [a[key] - b[key] for a, b in pairs if _finite(a[key]) and _finite(b[key])]
                if not diffs:
                    parts.append(f"{label}: no values")
                    continue
                wins = sum(d > 0 for d in diffs)
                unit = " points" if key == "delta_mtl" else ""
                parts.append(f"{label} in {wins}/{len(diffs)} seeds (mean {statistics.fmean(diffs):+.2f}{unit})")
            ad = [a["delta_mtl"] for a, _ in pairs if _finite(a["delta_mtl"])]
            pf = [b["delta_mtl"] for _, b in pairs if _finite(b["delta_mtl"])]
            tail = ""
            if ad and pf:
                tail = (f" Against the single-task baselines, Δ_MTL is {statistics.fmean(pf):+.2f} % for "
                        f"pretrain→finetune and {statistics.fmean(ad):+.2f} % for adapt→finetune.")
            out.append(f"{name}: adapt→finetune beat pretrain→finetune on " + "; ".join(parts) + "." + tail)
    return out


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def table_markdown(cfg: Config, table: list[dict], lines_after: list[str]) -> str:
    st = cfg.study
    keys = table_keys(cfg.model.tasks)
    header = ["checkpoint", "paradigm", "seeds", *(k.replace("/", " ") for k in keys), "Δ_MTL (%)"]
    lines = [f"# Study {cfg.name}", "",
             f"Every cell: {st.total_steps} optimizer steps of batch {cfg.data.batch_size} (adapt steps counted); "
             f"values are % on the val split, mean ± std over seeds; Δ_MTL against the single-task models of the "
             f"same checkpoint (Maninis et al. 2019; all metrics higher-is-better).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in table:
        cells = [e["checkpoint"], row_label(e), str(len(e["seeds"]))]
        cells += [_fmt(e[k]) for k in keys]
        cells.append("0 (reference)" if e["paradigm"] == "single_task" else _fmt(e["delta_mtl"], signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(e["delta_mtl"] is None for e in table):
        lines += ["Δ_MTL `-`: a single-task baseline of that checkpoint is missing or 0 (the relative change "
                  "is undefined).", ""]
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


def write_results(cfg: Config, rows: list[dict], out_dir: str, wall_s: float, pretrained: dict | None = None) -> dict:
    """study.csv, study.json, study.md, study.png in the study folder."""
    table = table_rows(rows, table_keys(cfg.model.tasks))
    said = sentences(rows, list(cfg.model.tasks))
    missing = [r["cell"] for r in rows if r["status"] != "done"]
    notes = said + ([f"INCOMPLETE: {len(missing)} of {len(rows)} cells have no result: {', '.join(missing)}"]
                    if missing else [])
    markdown = table_markdown(cfg, table, notes)
    write_text(storage.join(out_dir, "study.csv"), rows_csv(rows))
    write_text(storage.join(out_dir, "study.md"), markdown)
    plot_table(table, list(cfg.model.tasks), storage.join(out_dir, "study.png"))
    budget = {"rule": "equal optimizer steps per cell, adapt steps counted", "total_steps": cfg.study.total_steps,
              "steps_per_epoch": cfg.study.steps_per_epoch, "batch_size": cfg.data.batch_size,
              "stages": {p: stage_steps(cfg, p) for p in cfg.study.paradigms}}
    doc = {"name": cfg.name, "out_dir": out_dir, "budget": budget, "cells": rows, "table": table,
           "sentences": said, "complete": not missing, "cells_done": len(rows) - len(missing), "wall_s": wall_s,
           "checkpoints_made": pretrained or {}}
    write_text(storage.join(out_dir, "study.json"), json.dumps(doc, indent=2, default=float))
    return {"rows": rows, "table": table, "sentences": said, "markdown": markdown, "complete": not missing,
            "wall_s": wall_s}
