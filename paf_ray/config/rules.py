"""Cross-field rules: what a config must satisfy beyond the types of its keys, checked when it is loaded.

Each rule takes the sections it needs and returns (key, reason) problems; ``check_rules`` raises
the first as one ConfigError naming the file and the key, so an impossible combination fails
before any Ray work starts. Names are checked against the registries (tasks, backbones, adapter
kinds, checkpoint layouts), and each plug-in checks its own section (``check``), once, here.
"""

from __future__ import annotations

import importlib.util
import re

from paf_ray.config.loader import ConfigError
from paf_ray.config.pick import PickSyntaxError, parse_pick
from paf_ray.data.bdd100k.synth import check_synth_settings
from paf_ray.eval.keys import describe_report_keys, is_report_key
from paf_ray.models.adapters import ADAPTERS
from paf_ray.models.backbones import BACKBONES, STAGES
from paf_ray.models.clip_text import clip_embed_dim
from paf_ray.models.normalize import NORMALIZATION
from paf_ray.tasks import TASKS

Problems = list[tuple[str, str]]


def _names(what: str, key: str, names, registry) -> Problems:
    unknown = [n for n in names if n not in registry]
    if unknown:
        return [(key, f"unknown {what} {unknown[0]!r} (registered: {', '.join(registry.names())})")]
    return []


def rule_tasks(model) -> Problems:
    """model.tasks: registered tasks, at least one, no repeats; the task-keyed settings name tasks of the model."""
    tasks = model.tasks
    if not tasks or len(set(tasks)) != len(tasks):
        return [("model.tasks", f"expected a non-empty list of tasks without repeats, got {tasks}")]
    problems = _names("task", "model.tasks", tasks, TASKS)
    problems += _names("task", "model.loss.weights", model.loss.weights, TASKS)
    for t in tasks:
        if t in TASKS:
            problems += TASKS[t].check(model.heads[t], model)
    return problems


def rule_stage_head_lr(train) -> Problems:
    problems = []
    for i, stage in enumerate(train.stages):
        problems += _names("task", f"train.stages[{i}].head_lr_mult", stage.head_lr_mult, TASKS)
    return problems


def rule_stages(train) -> Problems:
    if not train.stages:
        return [("train.stages", "at least one stage is needed")]
    problems = []
    for i, stage in enumerate(train.stages):
        if stage.epochs < 1:
            problems.append((f"train.stages[{i}].epochs", f"must be >= 1, got {stage.epochs}"))
        if stage.accum_steps < 1:
            problems.append((f"train.stages[{i}].accum_steps", f"must be >= 1, got {stage.accum_steps}"))
        if not stage.lr > 0:
            problems.append((f"train.stages[{i}].lr", f"must be > 0, got {stage.lr}"))
    return problems


def rule_backbone(backbone) -> Problems:
    """model.backbone: a registered backbone, one of its checkpoint layouts, a known normalisation."""
    problems = _names("backbone", "model.backbone.name", [backbone.name], BACKBONES)
    if problems:
        return problems
    entry = BACKBONES[backbone.name]
    if backbone.format != "auto" and backbone.format not in entry.formats:
        problems.append(("model.backbone.format", f"{backbone.format!r} is not a checkpoint layout of {backbone.name} "
                                                  f"(auto, {', '.join(entry.formats)})"))
    if backbone.normalization != "auto" and backbone.normalization not in NORMALIZATION:
        problems.append(("model.backbone.normalization", f"expected auto or one of {', '.join(NORMALIZATION)}, "
                                                         f"got {backbone.normalization!r}"))
    if entry.requires_weights and backbone.weights is None and not backbone.random_init:
        problems.append(("model.backbone.weights", f"backbone {backbone.name} {entry.requires_weights}; set "
                         "model.backbone.random_init: true only for a deliberately random backbone (tests, demos)"))
    return problems


def rule_adapter(model) -> Problems:
    adapter = model.adapter
    problems = _names("adapter kind", "model.adapter.kind", [adapter.kind], ADAPTERS)
    if any(s not in STAGES for s in adapter.stages):
        problems.append(("model.adapter.stages", f"stages are 1..4 (strides 4..32), got {adapter.stages}"))
    for kind in ADAPTERS:
        if kind.config is not None:
            problems += kind.check(adapter.options[kind.name])
    return problems


def rule_input_size(data) -> Problems:
    width, height = data.input_size
    if width % 32 or height % 32 or width < 32 or height < 32:
        return [("data.input_size", f"width and height must be positive multiples of 32, got {[width, height]}")]
    return []


def rule_image_limits(data) -> Problems:
    """data.max_image_pixels > 0; the synthetic dataset's settings within synth's bounds."""
    if data.max_image_pixels < 1:
        return [("data.max_image_pixels", f"must be > 0, got {data.max_image_pixels}")]
    if data.root is None:
        s = data.synth
        try:
            check_synth_settings(s.images, tuple(s.size), s.val_fraction, data.max_image_pixels)
        except ValueError as e:
            return [("data.synth", str(e))]
    return []


def rule_lv_adapter(lv) -> Problems:
    if not lv.enabled:
        return []
    problems = []
    if not lv.levels or any(level not in STAGES for level in lv.levels):
        problems.append(("model.lv_adapter.levels", f"a non-empty subset of the backbone stages 1..4, got {lv.levels}"))
    if not lv.tau > 0:
        problems.append(("model.lv_adapter.tau", f"must be > 0, got {lv.tau}"))
    if lv.heads < 1:
        problems.append(("model.lv_adapter.heads", f"must be >= 1, got {lv.heads}"))
    if lv.clip_weights is None and not lv.random_init:
        problems.append(("model.lv_adapter.clip_weights",
                         "the LV-Adapter carries CLIP's language prior and needs CLIP's weights (e.g. OpenAI's RN50.pt "
                         "or open_clip's .safetensors); set model.lv_adapter.random_init: true only for a "
                         "deliberately random text tower (tests, demos)"))
    if lv.clip_weights is not None and lv.random_init:
        problems.append(("model.lv_adapter.random_init", "true, but model.lv_adapter.clip_weights names a file: choose one"))
    if lv.n_ctx < 1:
        problems.append(("model.lv_adapter.n_ctx", f"must be >= 1, got {lv.n_ctx}"))
    if lv.clip_model.startswith("hf-hub:"):
        return problems + [("model.lv_adapter.clip_model", f"{lv.clip_model!r} would download; use an open_clip model "
                            "name with model.lv_adapter.clip_weights set to a file, or 'local-dir:<folder>'")]
    dim = None if lv.clip_model.startswith("local-dir:") else clip_embed_dim(lv.clip_model)  # a folder: read at build
    if dim is None and not lv.clip_model.startswith("local-dir:"):
        problems.append(("model.lv_adapter.clip_model", f"unknown open_clip model {lv.clip_model!r} (e.g. 'RN50', "
                         "'RN50-quickgelu', 'ViT-B-32', 'local-dir:<folder>', or 'paf-tiny-clip')"))
    elif dim is not None and dim % lv.heads:
        problems.append(("model.lv_adapter.heads", f"{lv.heads} does not divide the text embedding size {dim} of "
                                                   f"{lv.clip_model!r}"))
    # open_clip's `-quickgelu` model names are QuickGELU by definition (its model configs say so).
    if lv.activation == "gelu" and lv.clip_model.endswith("-quickgelu"):
        problems.append(("model.lv_adapter.activation", f"gelu contradicts clip_model {lv.clip_model!r} (QuickGELU)"))
    return problems


def rule_adapt_needs_weights(backbone, train, tune, study) -> Problems:
    """An adapt stage freezes the backbone: it needs pretrained weights (or says random on purpose).
    A sweep's trials and a study's cells take their backbone from tune.backbones / study.checkpoints;
    each trial's or cell's own config is checked when it is made."""
    if tune.backbones or study.checkpoints:
        return []
    if backbone.weights is None and not backbone.random_init and any(s.kind == "adapt" for s in train.stages):
        return [("model.backbone.weights", "an adapt stage freezes the backbone, and no pretrained weights are "
                 "named: set the checkpoint (a path or URI), or model.backbone.random_init: true if a randomly "
                 "initialised frozen backbone is really meant")]
    return []


def rule_frozen_norm_needs_statistics(model, train, tune, study) -> Problems:
    if tune.backbones or study.checkpoints:
        return []
    if model.norm == "frozen" and not model.backbone.weights and not train.init_checkpoint:
        return [("model.norm", "frozen keeps the backbone's BatchNorm statistics fixed, but the backbone starts from "
                               "random init (no model.backbone.weights or train.init_checkpoint): use bn or syncbn")]
    return []


def rule_worker_start_timeout(ray_cfg) -> Problems:
    t = ray_cfg.worker_start_timeout_s
    return [] if t > 0 else [("ray.worker_start_timeout_s", f"must be > 0 seconds, got {t:g}")]


def rule_name(name: str) -> Problems:
    """A run name names a folder under the storage: one path component, nothing that escapes it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) or ".." in name:
        return [("name", f"a run name is letters, digits, '_', '.' and '-' (it names a folder under the storage; "
                         f"no path separators or '..'), got {name[:80]!r}")]
    return []


def rule_ray_failure_bounds(ray_cfg) -> Problems:
    """How long joining a cluster may take, how often a stage restarts."""
    problems = []
    if not ray_cfg.connect_timeout_s > 0:
        problems.append(("ray.connect_timeout_s", f"must be > 0 seconds, got {ray_cfg.connect_timeout_s:g}"))
    if ray_cfg.max_failures != "auto" and ray_cfg.max_failures < -1:
        problems.append(("ray.max_failures", f"must be >= -1 (-1: no limit) or auto, got {ray_cfg.max_failures}"))
    return problems


def rule_resources_per_worker(ray_cfg) -> Problems:
    """Custom resources beside the CPUs and GPUs, which have keys of their own."""
    for name, amount in ray_cfg.resources_per_worker.items():
        key = f"ray.resources_per_worker.{name}"
        if name in ("CPU", "GPU"):
            return [(key, f"set ray.{name.lower()}s_per_worker instead (the two would be merged)")]
        if name.startswith("accelerator_type:"):
            return [(key, f"set ray.accelerator_type: {name.split(':', 1)[1]} instead")]
        if amount < 0:
            return [(key, f"must be >= 0, got {amount:g}")]
    return []


def rule_job_command(command: str, study) -> Problems:
    """The file's `command` key against the section it runs: a study job names its checkpoints."""
    if command == "study" and not study.checkpoints:
        return [("study.checkpoints", "name at least one checkpoint")]
    return []


def rule_study(study, train, data) -> Problems:
    """The study's grid: checkpoint names, budget split, adapter kinds, where checkpoints made here train
    (checked when the config has a grid)."""
    if not study.checkpoints:
        return []
    problems = _names("adapter kind", "study.adapter_kinds", study.adapter_kinds, ADAPTERS)
    problems += [(f"study.adapter_kinds[{i}]", f"{kind!r} adds no adapters: the adapt-finetune arms need a kind "
                                               "that does (the grid's pretrain_finetune cells are the no-adapter arm)")
                 for i, kind in enumerate(study.adapter_kinds) if kind in ADAPTERS and not ADAPTERS[kind].adds_parameters]
    for name, ck in study.checkpoints.items():
        key = f"study.checkpoints.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            problems.append((key, "a checkpoint name is letters, digits, '_' and '.' (it names folders and cells)"))
        if (ck.weights is None) == (ck.pretrain is None):
            problems.append((key, "give exactly one of `weights` (a file or URI) and `pretrain` (make it here)"))
        if ck.pretrain is not None and ck.pretrain.steps < 1:
            problems.append((f"{key}.pretrain.steps", "must be >= 1"))
        if ck.pretrain is not None and ck.pretrain.data_seed is not None:
            if data.root is not None:
                problems.append((f"{key}.pretrain.data_seed", "a differently seeded set exists only for synthetic "
                                 "data (data.root is set): leave it null, or pretrain elsewhere and name `weights`"))
            elif ck.pretrain.data_seed == data.synth.seed:
                problems.append((f"{key}.pretrain.data_seed", f"{ck.pretrain.data_seed} is data.synth.seed: the "
                                 "checkpoint would train on the downstream frames; pick another seed"))
        if ck.backbone is not None:
            problems += _names("backbone", f"{key}.backbone", [ck.backbone], BACKBONES)
    for key, values in (("study.paradigms", study.paradigms), ("study.adapter_kinds", study.adapter_kinds),
                        ("study.lv_adapter", study.lv_adapter), ("study.lv_context", study.lv_context),
                        ("study.seeds", study.seeds)):
        if not values:
            problems.append((key, "needs at least one value"))
        elif len(set(values)) != len(values):
            problems.append((key, f"values repeat: {values}"))
    if study.steps_per_epoch < 1:
        problems.append(("study.steps_per_epoch", "must be >= 1"))
    elif study.total_steps < 2 * study.steps_per_epoch or study.total_steps % study.steps_per_epoch:
        problems.append(("study.total_steps", f"must be a multiple of study.steps_per_epoch ({study.steps_per_epoch}) "
                                              f"and at least two epochs of it (adapt and finetune), got {study.total_steps}"))
    elif not 0 < study.adapt_fraction < 1:
        problems.append(("study.adapt_fraction", f"must lie strictly between 0 and 1, got {study.adapt_fraction}"))
    kinds = [s.kind for s in train.stages]
    if kinds != ["adapt", "finetune"]:
        problems.append(("train.stages", f"a study takes its stage settings (lr, schedule...) from two stages "
                                         f"[adapt, finetune]; got {kinds}"))
    return problems


def rule_tune_objectives(tune, model) -> Problems:
    """tune.metric / tune.mode: one mode (max or min) per metric, each metric a key the reports carry,
    none twice; tune.pick parses and names report keys; nsga2 needs a population of at least 2."""
    metrics, modes = tune.metrics, tune.modes
    if not metrics:
        return [("tune.metric", "name at least one report key, e.g. score")]
    if len(modes) != len(metrics):
        return [("tune.mode", f"one mode (max or min) per metric: tune.metric has {len(metrics)} "
                              f"({', '.join(metrics)}), tune.mode {len(modes)} ({', '.join(modes)})")]
    if len(set(metrics)) != len(metrics):
        return [("tune.metric", f"a metric repeats: {metrics}")]
    key = "tune.metric" if isinstance(tune.metric, str) else None
    for i, metric in enumerate(metrics):
        if not is_report_key(metric, model.tasks):
            return [(key or f"tune.metric[{i}]", f"{metric!r} is not a key of the per-epoch report "
                                                 f"({describe_report_keys(model.tasks)})")]
    problems = []
    if tune.pick is not None:
        try:
            pick = parse_pick(tune.pick)
        except PickSyntaxError as e:
            return [("tune.pick", str(e))]
        for name in pick.keys():
            if not is_report_key(name, model.tasks):
                problems.append(("tune.pick", f"{name!r} is not a key of the per-epoch report "
                                              f"({describe_report_keys(model.tasks)})"))
    if tune.sampler == "nsga2" and tune.startup_trials < 2:
        problems.append(("tune.startup_trials", f"nsga2 takes it as its population size: at least 2, "
                                                f"got {tune.startup_trials}"))
    return problems


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def rule_tracking(tracking) -> Problems:
    if tracking.mlflow and not mlflow_installed():
        return [("tracking.mlflow", "true, but the mlflow package is not installed: pip install 'paf_ray[mlflow]'")]
    return []


def check_rules(cfg, source: str = "<config>") -> None:
    """Every rule, in order; the first problem is raised as one ConfigError naming the file and the key."""
    m = cfg.model
    checks = [
        lambda: rule_name(cfg.name),
        lambda: rule_job_command(cfg.command, cfg.study),
        lambda: rule_stages(cfg.train),
        lambda: rule_tasks(m),
        lambda: rule_stage_head_lr(cfg.train),
        lambda: rule_backbone(m.backbone),
        lambda: rule_adapter(m),
        lambda: rule_input_size(cfg.data),
        lambda: rule_image_limits(cfg.data),
        lambda: rule_lv_adapter(m.lv_adapter),
        lambda: rule_adapt_needs_weights(m.backbone, cfg.train, cfg.tune, cfg.study),
        lambda: rule_frozen_norm_needs_statistics(m, cfg.train, cfg.tune, cfg.study),
        lambda: rule_worker_start_timeout(cfg.ray),
        lambda: rule_resources_per_worker(cfg.ray),
        lambda: rule_ray_failure_bounds(cfg.ray),
        lambda: rule_study(cfg.study, cfg.train, cfg.data),
        lambda: rule_tune_objectives(cfg.tune, m),
        lambda: rule_tracking(cfg.tracking),
    ]
    for check in checks:
        for key, reason in check():
            raise ConfigError(f"{source}: {key}: {reason}")
