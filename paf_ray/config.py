"""Typed configuration: YAML in, validated dataclasses out, ``--set a.b=value`` overrides.

One schema serves every command. An unknown key, a wrong type or a missing required
value raises :class:`ConfigError` naming the key and the file. Job files in ``jobs/``
are configs too (their first line may be a shebang comment; YAML ignores it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or missing."""


# --------------------------------------------------------------------------- data


@dataclass
class SynthConfig:
    """The synthetic BDD100K generated when ``data.root`` is not given."""

    images: int = 120  # frames in all (split into train/val, 100k/10k sets)
    size: tuple[int, int] = (640, 360)  # (width, height) of the generated frames
    seed: int = 0
    val_fraction: float = 0.25


@dataclass
class DataConfig:
    root: Optional[str] = None  # dataset root in the official layout (path or URI); None = synthetic
    # where the dataset index is kept once built (path or URI); None = <root>/.paf_ray_index (or, where
    # the root is read-only, this node's cache). Reused while the root's listing is unchanged
    index_dir: Optional[str] = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    train_split: str = "train"
    val_split: str = "val"
    drop_overlap: bool = True  # drop 10k-train frames whose stem is in 100k-val (and vice versa)
    input_size: tuple[int, int] = (640, 384)  # (width, height) the network sees
    scale_range: tuple[float, float] = (0.75, 1.25)  # random scale before the crop (train only)
    hflip: float = 0.5
    color_jitter: float = 0.2  # strength of brightness/contrast/saturation jitter (train only)
    batch_size: int = 4  # per training worker
    # CPUs Ray Data may use in all to decode and augment a stage's rows: one cap for the whole cluster
    # (the executor's limit; decode tasks on every node count against it), not per node
    cpus: float = 1.0
    # "idle": each decode task runs its rows on a thread at idle CPU priority (Linux SCHED_IDLE),
    # so on a machine without spare cores decoding fills the trainer's gaps instead of
    # preempting its threads (docs/benchmarks.md); "normal": the worker's own priority
    decode_priority: Literal["idle", "normal"] = "idle"
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    on_bad_sample: Literal["error", "skip"] = "error"


# --------------------------------------------------------------------------- model


BackboneName = Literal["resnet18", "resnet34", "resnet50", "clip_rn50", "tiny"]
CheckpointFormat = Literal[
    "auto",
    "torchvision",
    "moco",
    "mocov3",
    "simclr",
    "simclr2",
    "densecl",
    "detco",
    "swav",
    "byol",
    "mmselfsup",
    "clip",
]


@dataclass
class BackboneConfig:
    name: BackboneName = "resnet50"
    # the pretrained checkpoint: a local path or a URI (s3://, gs://, file://), fetched once per node
    # into its cache; None = random init, which an adapt stage accepts only with random_init: true
    weights: Optional[str] = None
    random_init: bool = False  # say so to adapt (freeze) a randomly initialised backbone on purpose
    format: CheckpointFormat = "auto"
    trust_checkpoint: bool = False  # allow plain pickles (detectron2 .pkl)
    normalization: Literal["auto", "imagenet", "swav", "clip", "none"] = "auto"
    tiny_width: int = 16  # channels of the first stage of the `tiny` backbone


@dataclass
class AdapterConfig:
    # bypass: beside the backbone, on each stage output for the FPN; inline: after each stage, its
    # output feeding the next stage; lora: weight deltas inside the stage convs (models/adapters.py)
    kind: Literal["none", "bypass", "inline", "lora"] = "bypass"
    reduction: int = 8  # bypass / inline: bottleneck = channels // reduction
    rank: int = 8  # lora: rank of the weight deltas
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # 1..4 = strides 4..32
    init_scale: float = 1.0  # bypass / inline: the learnable output scale starts here (up-proj is zero-init)
    lora_alpha: float = 8.0  # lora: the delta is scaled by alpha / rank


@dataclass
class DetConfig:
    kind: Literal["faster_rcnn", "fcos"] = "faster_rcnn"
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    representation_size: int = 1024  # box head MLP width
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_nms_thresh: float = 0.5
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # faster_rcnn: one per P2..P6
    ignore_iof_thresh: float = 0.5  # anchors/proposals this much inside an ignore box are neither pos nor neg
    fcos_num_convs: int = 4  # fcos: conv layers in each tower
    # faster_rcnn: RoIAlign sample points per bin side (torchvision's 2); 0 = adaptive. Its CPU
    # backward is serial: 1 makes a small-input CPU step 1-11% faster (docs/benchmarks.md)
    roi_sampling_ratio: int = 2


@dataclass
class LossConfig:
    weighting: Literal["fixed", "uncertainty"] = "fixed"
    weights: dict[str, float] = field(default_factory=lambda: {"det": 1.0, "sem": 1.0, "drv": 1.0})
    # seg tasks: pixel weight (1 / class share in the batch) ** this; 0 = plain cross-entropy
    class_balance: dict[str, float] = field(default_factory=lambda: {"sem": 0.0, "drv": 0.0})


@dataclass
class LVAdapterConfig:
    enabled: bool = False
    clip_model: str = "RN50"  # any open_clip model name
    # OpenAI's TorchScript archive (RN50.pt), its state dict, or open_clip's .safetensors / state dict;
    # required unless `random_init`
    clip_weights: Optional[str] = None
    random_init: bool = False  # a randomly initialised CLIP on purpose (tests, the CPU demo)
    # text-tower MLP activation: auto = from the weights (OpenAI's layout: quick_gelu, open_clip's: gelu)
    activation: Literal["auto", "quick_gelu", "gelu"] = "auto"
    n_ctx: int = 8
    ctx_init: str = "a photo of a"  # "" = random init
    task_specific: bool = True  # one context per task, or one shared by all tasks
    levels: list[int] = field(default_factory=lambda: [4])  # backbone stages (4 = stride 32)
    tau: float = 0.07
    learn_tau: bool = False
    align_weight: float = 0.5
    heads: int = 4  # cross-attention heads
    train_prompts_in_finetune: bool = True


@dataclass
class ModelConfig:
    tasks: list[str] = field(default_factory=lambda: ["det", "sem", "drv"])
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # the backbone's BatchNorm (the heads use GroupNorm): frozen = FrozenBatchNorm2d (needs pretrained
    # statistics), bn = per-worker batch statistics, syncbn = statistics over all workers' batches;
    # what each stage does with it: models/stages.py
    norm: Literal["frozen", "bn", "syncbn"] = "bn"
    fpn_channels: int = 256
    seg_channels: int = 128  # width of the semantic-FPN style segmentation heads
    det: DetConfig = field(default_factory=DetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lv_adapter: LVAdapterConfig = field(default_factory=LVAdapterConfig)


# --------------------------------------------------------------------------- training


@dataclass
class StageConfig:
    """One training stage. ``kind`` selects the stage policy in ``models/stages.py``."""

    kind: Literal["adapt", "finetune"]
    epochs: int = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    backbone_lr_mult: float = 1.0  # finetune: backbone lr = lr * this
    # a task head's lr = lr * this, e.g. {det: 0.5}: the detector wants a lower lr than the seg heads
    head_lr_mult: dict[Literal["det", "sem", "drv"], float] = field(default_factory=dict)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: Optional[float] = 10.0
    accum_steps: int = 1
    max_steps_per_epoch: Optional[int] = None
    merge_adapters: bool = True  # lora: fold deltas into the weights when this stage ends (adapt)


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(kind="adapt"), StageConfig(kind="finetune")])
    # a paf_ray checkpoint dir, model.pt or run dir (summary.json), local path or URI, to start the first stage from
    init_checkpoint: Optional[str] = None
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 on GPU, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"
    log_every: int = 10
    eval_every_epochs: int = 1
    checkpoint_every_steps: Optional[int] = None
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    torch_threads: Optional[int] = None  # intra-op threads per worker; None = Ray's default (its CPU count)
    seed: int = 0


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start a local Ray
    num_workers: int = 1  # training workers (one per GPU); 0 = Train local mode (in-process)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # where runs land (<storage_path>/<name>-<stamp>/): a path or URI; on a cluster a URI every node can
    # reach (s3://, gs://). None = ~/paf_ray_runs of the user running the driver, never the working dir
    storage_path: Optional[str] = None
    keep_checkpoints: int = 2
    # restarts of a stage's workers after a failure (they resume from the last checkpoint); "auto": 3 when
    # the run folder is on object storage (rides out its outages, docs/reliability.md), else 0
    max_failures: Union[int, Literal["auto"]] = "auto"
    object_store_mb: int = 512
    # joining ray.address: how long to wait for the cluster to accept a connection before failing
    connect_timeout_s: float = 30.0
    # how long a stage (in `run` and in every Tune trial) waits for its training workers' resources,
    # e.g. while an autoscaler boots GPU nodes; after that it fails naming this key
    worker_start_timeout_s: float = 1800.0


# --------------------------------------------------------------------------- tune


@dataclass
class TuneSchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"  # asha: early stopping on `tune.metric`; fifo: every trial runs out
    grace_period: int = 1  # epochs (Tune iterations) before a trial can be stopped
    reduction_factor: int = 2
    max_t: Optional[int] = None  # last epoch with a rung (ASHA's max_t); default: the epoch budget - 1


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent_trials: int = 1
    metric: str = "score"
    mode: Literal["max", "min"] = "max"
    seed: int = 0
    sampler: Literal["tpe", "random"] = "tpe"  # Optuna sampler, seeded with `seed`
    startup_trials: int = 10  # tpe: random trials before TPE takes over (Optuna's n_startup_trials)
    study_name: Optional[str] = None  # Optuna study name; default: the config's `name`
    max_failures: int = 0  # restarts of a failed trial (it resumes its Train runs)
    total_epochs: Optional[int] = None  # epoch budget split between adapt and finetune by `adapt_fraction`
    scheduler: TuneSchedulerConfig = field(default_factory=TuneSchedulerConfig)
    storage_url: Optional[str] = None  # Optuna study storage; default sqlite in the output dir
    trial_cpus: float = 0.01  # resources of the trial driver (workers come from `ray`)
    search_space: dict[str, Any] = field(default_factory=dict)  # dotted key -> spec; see docs/tune.md
    backbones: list[dict[str, Any]] = field(default_factory=list)  # choices for `backbone`


# --------------------------------------------------------------------------- study


STUDY_PARADIGMS = ("single_task", "pretrain_finetune", "adapt_finetune", "adapt_only")


@dataclass
class PretrainConfig:
    """A checkpoint made here, on the config's training frames (`paf-ray pretrain`, train/pretrain.py)."""

    method: Literal["supervised", "simclr", "moco"] = "simclr"
    steps: int = 200
    batch_size: int = 32
    lr: float = 3.0e-3
    size: tuple[int, int] = (160, 96)  # (width, height) the frames are resized to
    temperature: float = 0.2  # simclr / moco: InfoNCE temperature
    queue: int = 1024  # moco: negatives kept from earlier batches
    momentum: float = 0.99  # moco: key-encoder EMA
    proj_dim: int = 64  # simclr / moco: projection head output (dropped afterwards)
    seed: int = 0


@dataclass
class StudyCheckpointConfig:
    """One row group of the study: a published file (`weights` + `format`) or one made here (`pretrain`)."""

    weights: Optional[str] = None  # path or URI
    format: CheckpointFormat = "auto"
    backbone: Optional[BackboneName] = None  # default: model.backbone.name
    trust_checkpoint: bool = False
    pretrain: Optional[PretrainConfig] = None
    lv_adapter: Optional[list[bool]] = None  # LV-Adapter off/on for this checkpoint; default study.lv_adapter


@dataclass
class StudyConfig:
    """`paf-ray study`: the comparison grid (docs/study.md). Every cell trains `total_steps` optimizer steps."""

    checkpoints: dict[str, StudyCheckpointConfig] = field(default_factory=dict)
    paradigms: list[Literal["single_task", "pretrain_finetune", "adapt_finetune", "adapt_only"]] = field(
        default_factory=lambda: ["single_task", "pretrain_finetune", "adapt_finetune"])
    adapter_kinds: list[Literal["bypass", "inline", "lora"]] = field(default_factory=lambda: ["bypass"])
    lv_adapter: list[bool] = field(default_factory=lambda: [False])
    seeds: list[int] = field(default_factory=lambda: [0])
    total_steps: int = 200  # the budget of every cell, adapt steps counted
    steps_per_epoch: int = 50  # stages are cut into epochs of this many steps (one Tune iteration each)
    adapt_fraction: float = 0.25  # adapt_finetune: the adapt stage's share of total_steps
    # trials at once, trial resources, restarts and worker timeout: tune.max_concurrent_trials,
    # tune.trial_cpus, tune.max_failures (as for `paf-ray tune`), ray.worker_start_timeout_s
    quick: dict[str, Any] = field(default_factory=dict)  # --quick: dotted key -> value overrides


# --------------------------------------------------------------------------- jobs


@dataclass
class JobConfig:
    """How `paf-ray submit` sends this file to a cluster (Ray Jobs)."""

    runtime_env: dict[str, Any] = field(default_factory=dict)
    entrypoint_num_cpus: Optional[float] = None
    entrypoint_num_gpus: Optional[float] = None


@dataclass
class Config:
    name: str = "paf"
    command: Literal["run", "tune", "demo", "study"] = "run"  # what the job file runs when executed
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    job: JobConfig = field(default_factory=JobConfig)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples...)."""

    def fail(msg: str = "") -> ConfigError:
        got = type(value).__name__
        return ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {got} {value!r}{msg}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append((arg, e))
        for arg, e in errors:  # a mapping for an optional section: its own error names the inner key
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                raise e
        raise fail()
    if origin is Literal:
        if value not in args:
            raise fail()
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f" (a list of {len(args)})")
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return {
            _convert(k, args[0], f"{key}.{k}", source): _convert(v, args[1], f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{where}' (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. train.stages.0.epochs=2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {e}") from None
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any, source: str = "--set") -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"{source}: {where}: no list item {part!r}") from None
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: {where} is a {type(node).__name__}, not a section")
    last = path[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"{source}: {'.'.join(path)}: no list item {last!r}") from None
    else:
        node[last] = value


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict (tuples as lists), suitable for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def from_dict(data: dict | None, source: str = "<config>", overrides: list[str] | tuple[str, ...] = (),
              rules: bool = True) -> Config:
    """Build and validate a Config. `rules=False` skips the cross-field RULES: for a config that was
    checked when its run started (a checkpoint's), or a caller that uses one section only."""
    data = copy.deepcopy(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    # Overrides apply to the file merged onto the defaults, so `--set train.stages.0.lr=...`
    # works when the file does not spell the stage list out.
    if overrides:
        data = _merge(to_dict(Config()), data)
        for text in overrides:
            path, value = parse_override(text)
            apply_override(data, path, value, f"--set {text}")
        source = f"{source} (with --set overrides)"
    cfg = _build(Config, data, "", source)
    if rules:
        check_rules(cfg, source)
    return cfg


# --------------------------------------------------------------------------- cross-field rules
#
# Rules that involve more than one key, checked when a config is loaded so that an impossible
# combination fails before any Ray work starts. Each rule takes the built config and returns
# a list of (key, reason) problems; the first problem is raised as one ConfigError naming the key.


def _rule_stages(cfg: "Config") -> list[tuple[str, str]]:
    if not cfg.train.stages:
        return [("train.stages", "at least one stage is needed")]
    problems = []
    for i, stage in enumerate(cfg.train.stages):
        if stage.epochs < 1:
            problems.append((f"train.stages[{i}].epochs", f"must be >= 1, got {stage.epochs}"))
        if stage.accum_steps < 1:
            problems.append((f"train.stages[{i}].accum_steps", f"must be >= 1, got {stage.accum_steps}"))
        if not stage.lr > 0:
            problems.append((f"train.stages[{i}].lr", f"must be > 0, got {stage.lr}"))
    return problems


def _rule_model_shapes(cfg: "Config") -> list[tuple[str, str]]:
    """What the model builder needs from the config, checked here so it fails before Ray starts."""
    from paf_ray.data.bdd100k import SEG_TASKS, TASKS

    m, problems = cfg.model, []
    if not m.tasks or any(t not in TASKS for t in m.tasks) or len(set(m.tasks)) != len(m.tasks):
        problems.append(("model.tasks", f"expected a non-empty subset of {list(TASKS)} without repeats, got {m.tasks}"))
    width, height = cfg.data.input_size
    if width % 32 or height % 32:
        problems.append(("data.input_size", f"width and height must be multiples of 32, got {[width, height]}"))
    if any(s not in (1, 2, 3, 4) for s in m.adapter.stages):
        problems.append(("model.adapter.stages", f"stages are 1..4 (strides 4..32), got {m.adapter.stages}"))
    if m.adapter.rank < 1:
        problems.append(("model.adapter.rank", f"must be >= 1, got {m.adapter.rank}"))
    unknown = sorted(set(m.loss.class_balance) - set(SEG_TASKS))
    if unknown:
        problems.append(("model.loss.class_balance", f"keys are the segmentation tasks {list(SEG_TASKS)}, got {unknown}"))
    if m.backbone.name == "tiny" and m.backbone.tiny_width < 4:
        problems.append(("model.backbone.tiny_width", f"must be >= 4, got {m.backbone.tiny_width}"))
    if m.det.kind == "faster_rcnn" and len(m.det.anchor_sizes) != 5:
        problems.append(("model.det.anchor_sizes", f"Faster R-CNN needs 5 sizes (P2-P6), got {len(m.det.anchor_sizes)}"))
    if m.det.kind == "fcos" and m.fpn_channels % 32:
        problems.append(("model.fpn_channels", f"FCOS needs a multiple of 32, got {m.fpn_channels}"))
    lv = m.lv_adapter
    if lv.enabled:
        if not lv.levels or any(level not in (1, 2, 3, 4) for level in lv.levels):
            problems.append(("model.lv_adapter.levels", f"a non-empty subset of the backbone stages 1..4, got {lv.levels}"))
        if not lv.tau > 0:
            problems.append(("model.lv_adapter.tau", f"must be > 0, got {lv.tau}"))
        if lv.heads < 1:
            problems.append(("model.lv_adapter.heads", f"must be >= 1, got {lv.heads}"))
    return problems


def _rule_lv_adapter_has_clip_weights(cfg: "Config") -> list[tuple[str, str]]:
    lv = cfg.model.lv_adapter
    if not lv.enabled:
        return []
    if lv.clip_weights is None and not lv.random_init:
        return [("model.lv_adapter.clip_weights",
                 "the LV-Adapter carries CLIP's language prior and needs CLIP's weights (e.g. OpenAI's RN50.pt "
                 "or open_clip's .safetensors); set model.lv_adapter.random_init: true only for a "
                 "deliberately random text tower (tests, demos)")]
    if lv.clip_weights is not None and lv.random_init:
        return [("model.lv_adapter.random_init", "true, but model.lv_adapter.clip_weights names a file: choose one")]
    return []


def _rule_lv_adapter_activation(cfg: "Config") -> list[tuple[str, str]]:
    # open_clip's `-quickgelu` model names are QuickGELU by definition (its model configs say so).
    lv = cfg.model.lv_adapter
    if lv.enabled and lv.activation == "gelu" and lv.clip_model.endswith("-quickgelu"):
        return [("model.lv_adapter.activation", f"gelu contradicts clip_model {lv.clip_model!r} (QuickGELU)")]
    return []


def _rule_clip_backbone_has_weights(cfg: "Config") -> list[tuple[str, str]]:
    # The CLIP image tower is only worth its cost with CLIP's weights; its attention pool also seeds
    # the LV-Adapter's pixel->text projection (models/lv_adapter.py).
    bb = cfg.model.backbone
    if bb.name == "clip_rn50" and bb.weights is None and not bb.random_init:
        return [("model.backbone.weights",
                 "backbone clip_rn50 needs CLIP's weights (the same file as model.lv_adapter.clip_weights, e.g. "
                 "OpenAI's RN50.pt with trust_checkpoint: true, or open_clip's .safetensors); set "
                 "model.backbone.random_init: true only for a deliberately random backbone (tests, demos)")]
    return []


def _rule_adapt_needs_weights(cfg: "Config") -> list[tuple[str, str]]:
    bb = cfg.model.backbone
    # a sweep's trials and a study's cells take their backbone from there; each trial's or cell's
    # own config is checked when it is made
    if cfg.tune.backbones or cfg.command == "study" or cfg.study.checkpoints:
        return []
    if bb.weights is None and not bb.random_init and any(s.kind == "adapt" for s in cfg.train.stages):
        return [("model.backbone.weights", "an adapt stage freezes the backbone, and no pretrained weights are "
                 "named: set the checkpoint (a path or URI), or model.backbone.random_init: true if a randomly "
                 "initialised frozen backbone is really meant")]
    return []


def _rule_worker_start_timeout_positive(cfg: "Config") -> list[tuple[str, str]]:
    t = cfg.ray.worker_start_timeout_s
    return [] if t > 0 else [("ray.worker_start_timeout_s", f"must be > 0 seconds, got {t:g}")]


def _rule_ray_failure_bounds(cfg: "Config") -> list[tuple[str, str]]:
    problems = []
    if not cfg.ray.connect_timeout_s > 0:
        problems.append(("ray.connect_timeout_s", f"must be > 0 seconds, got {cfg.ray.connect_timeout_s:g}"))
    if cfg.ray.max_failures != "auto" and cfg.ray.max_failures < -1:
        problems.append(("ray.max_failures", f"must be >= -1 (-1: no limit) or auto, got {cfg.ray.max_failures}"))
    return problems


def _rule_frozen_norm_needs_statistics(cfg: "Config") -> list[tuple[str, str]]:
    if cfg.tune.backbones or cfg.command == "study" or cfg.study.checkpoints:
        return []
    if cfg.model.norm == "frozen" and not cfg.model.backbone.weights and not cfg.train.init_checkpoint:
        return [("model.norm", "frozen keeps the backbone's BatchNorm statistics fixed, but the backbone starts from "
                               "random init (no model.backbone.weights or train.init_checkpoint): use bn or syncbn")]
    return []


def _rule_study_grid(cfg: "Config") -> list[tuple[str, str]]:
    """The study's budget split and its checkpoints (checked whenever the config is a study)."""
    st = cfg.study
    if cfg.command != "study" and not st.checkpoints:
        return []
    problems = []
    if not st.checkpoints:
        problems.append(("study.checkpoints", "name at least one checkpoint (name: {weights, format} or {pretrain: ...})"))
    for name, ck in st.checkpoints.items():
        key = f"study.checkpoints.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            problems.append((key, "a checkpoint name is letters, digits, '_' and '.' (it names folders and cells)"))
        if (ck.weights is None) == (ck.pretrain is None):
            problems.append((key, "give exactly one of `weights` (a file or URI) and `pretrain` (make it here)"))
        if ck.pretrain is not None and ck.pretrain.steps < 1:
            problems.append((f"{key}.pretrain.steps", "must be >= 1"))
    for key, values in (("study.paradigms", st.paradigms), ("study.adapter_kinds", st.adapter_kinds),
                        ("study.lv_adapter", st.lv_adapter), ("study.seeds", st.seeds)):
        if not values:
            problems.append((key, "needs at least one value"))
        elif len(set(values)) != len(values):
            problems.append((key, f"values repeat: {values}"))
    if st.steps_per_epoch < 1:
        problems.append(("study.steps_per_epoch", "must be >= 1"))
    elif st.total_steps < 2 * st.steps_per_epoch or st.total_steps % st.steps_per_epoch:
        problems.append(("study.total_steps", f"must be a multiple of study.steps_per_epoch ({st.steps_per_epoch}) "
                                              f"and at least two epochs of it (adapt and finetune), got {st.total_steps}"))
    elif not 0 < st.adapt_fraction < 1:
        problems.append(("study.adapt_fraction", f"must lie strictly between 0 and 1, got {st.adapt_fraction}"))
    kinds = [s.kind for s in cfg.train.stages]
    if kinds != ["adapt", "finetune"]:
        problems.append(("train.stages", f"a study takes its stage settings (lr, schedule...) from two stages "
                                         f"[adapt, finetune]; got {kinds}"))
    return problems




RULES = [_rule_stages, _rule_model_shapes, _rule_adapt_needs_weights, _rule_worker_start_timeout_positive,
         _rule_ray_failure_bounds,
         _rule_lv_adapter_has_clip_weights, _rule_lv_adapter_activation, _rule_clip_backbone_has_weights,
         _rule_frozen_norm_needs_statistics, _rule_study_grid]


def check_rules(cfg: "Config", source: str = "<config>") -> None:
    for rule in RULES:
        for key, reason in rule(cfg):
            raise ConfigError(f"{source}: {key}: {reason}")


def _merge(defaults: dict, data: dict) -> dict:
    out = copy.deepcopy(defaults)
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("search_space", "runtime_env", "weights"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply ``--set`` overrides."""
    if path is None:
        return from_dict({}, "<defaults>", overrides)
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return from_dict(data, path, overrides)


def dump_config(cfg: Config, path: str | os.PathLike | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text
