"""The config schema: every key of every command, its type and default, as dataclasses.

One schema serves every command. Plug-ins add sections: each registered task its head section
``model.heads.<task>``, each adapter kind ``model.adapter.<kind>``, each backbone with options
``model.backbone.<name>`` (the loader builds them with the plug-in's own dataclass). Names that
refer to a registry (tasks, backbones, adapter kinds, checkpoint layouts) are plain strings here;
``rules.py`` checks them against the registries. Job files in ``jobs/`` are configs too (their
first line may be a shebang comment; YAML ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from paf_ray.data.decode import MAX_IMAGE_PIXELS
from paf_ray.models.adapters import ADAPTERS
from paf_ray.models.backbones import BACKBONES
from paf_ray.tasks import DEFAULT_TASKS, TASKS


def head_sections() -> dict[str, type]:
    return {t.name: t.config for t in TASKS if t.config is not None}


def adapter_sections() -> dict[str, type]:
    return {a.name: a.config for a in ADAPTERS if a.config is not None}


def backbone_sections() -> dict[str, type]:
    return {b.name: b.config for b in BACKBONES if b.config is not None}


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
    # images and masks with more pixels (width x height) are refused before decoding (docs/reliability.md)
    max_image_pixels: int = MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- model


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # a registered backbone (models/backbones)
    # the pretrained checkpoint: a local path or a URI (s3://, gs://, file://), fetched once per node
    # into its cache; None = random init, which an adapt stage accepts only with random_init: true
    weights: Optional[str] = None
    random_init: bool = False  # say so to adapt (freeze) a randomly initialised backbone on purpose
    format: str = "auto"  # the checkpoint's layout: one of the backbone's formats, or auto (sniffed)
    trust_checkpoint: bool = False  # allow plain pickles (detectron2 .pkl) and TorchScript archives
    normalization: str = "auto"  # auto (the checkpoint layout's) or a recipe of models/normalize.py
    # per-backbone options, e.g. tiny: {width: 16}
    options: dict[str, Any] = field(default_factory=dict, metadata={"sections": backbone_sections, "inline": True})


@dataclass
class AdapterConfig:
    kind: str = "bypass"  # a registered adapter kind (models/adapters): none, bypass, inline, lora
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # 1..4 = strides 4..32
    # per-kind settings, e.g. bypass: {reduction: 8}, lora: {rank: 8}
    options: dict[str, Any] = field(default_factory=dict, metadata={"sections": adapter_sections, "inline": True})


@dataclass
class LossConfig:
    weighting: Literal["fixed", "uncertainty"] = "fixed"
    weights: dict[str, float] = field(default_factory=dict)  # task -> weight of its loss (default 1)


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
    task_specific: bool = True  # one set of learnable prompt context vectors per task, or one shared by all tasks
    # what the language context feeds: per_task = each task's branch (FPN and head) gets the cross-attention
    # context of its own task's class embeddings; shared = the tasks' contexts averaged into the shared features
    context: Literal["per_task", "shared"] = "per_task"
    levels: list[int] = field(default_factory=lambda: [4])  # backbone stages (4 = stride 32)
    tau: float = 0.07
    learn_tau: bool = False
    align_weight: float = 0.5
    heads: int = 4  # cross-attention heads
    train_prompts_in_finetune: bool = True


@dataclass
class ModelConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # registered tasks (paf_ray/tasks)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # the backbone's BatchNorm (the heads use GroupNorm): frozen = FrozenBatchNorm2d (needs pretrained
    # statistics), bn = per-worker batch statistics, syncbn = statistics over all workers' batches;
    # what each stage does with it: models/stages.py
    norm: Literal["frozen", "bn", "syncbn"] = "bn"
    fpn_channels: int = 256
    # one section per registered task: its head and loss settings (e.g. heads.det.kind, heads.sem.channels)
    heads: dict[str, Any] = field(default_factory=dict, metadata={"sections": head_sections})
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
    head_lr_mult: dict[str, float] = field(default_factory=dict)
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
    # heterogeneous clusters (docs/cluster.md, "Autoscaling"): the accelerator every worker needs, by Ray's
    # name (H100, A100, A10G, L4, ...); a Tune trial and Ray Data's decode tasks then run on such nodes too
    accelerator_type: Optional[str] = None
    # more per worker, merged with cpus_per_worker/gpus_per_worker: custom resources and `memory` in bytes
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # where the workers go: PACK fills a node before the next, SPREAD puts them on different nodes
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"


# --------------------------------------------------------------------------- tune


@dataclass
class TuneSchedulerConfig:
    # asha: early stopping on `tune.metric` (its first metric when it lists several); fifo: every trial runs out
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs (Tune iterations) before a trial can be stopped
    reduction_factor: int = 2
    max_t: Optional[int] = None  # last epoch with a rung (ASHA's max_t); default: the epoch budget - 1


Mode = Literal["max", "min"]


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent_trials: int = 1
    # a report key (eval/keys.py), or several for a multi-objective sweep (Pareto front), e.g.
    # [score, cost/trainable_params] with mode [max, min]
    metric: Union[str, list[str]] = "score"
    mode: Union[Mode, list[Mode]] = "max"  # one per metric
    # which trial best.yaml holds: default the best by the first metric; or a rule such as
    # "highest score with cost/trainable_params <= 5e6" (config/pick.py)
    pick: Optional[str] = None
    seed: int = 0
    # Optuna sampler, seeded with `seed`; tpe and nsga2 run multi-objective when `metric` lists several
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    # tpe: random trials before TPE takes over (Optuna's n_startup_trials); nsga2: its population size
    startup_trials: int = 10
    study_name: Optional[str] = None  # Optuna study name; default: the config's `name`
    max_failures: int = 0  # restarts of a failed trial (it resumes its Train runs)
    total_epochs: Optional[int] = None  # epoch budget split between adapt and finetune by `adapt_fraction`
    scheduler: TuneSchedulerConfig = field(default_factory=TuneSchedulerConfig)
    storage_url: Optional[str] = None  # Optuna study storage; default sqlite in the output dir
    trial_cpus: float = 0.01  # resources of the trial driver (workers come from `ray`)
    search_space: dict[str, Any] = field(default_factory=dict)  # dotted key -> spec; see docs/tune.md
    backbones: list[dict[str, Any]] = field(default_factory=list)  # choices for `backbone`

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


# --------------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    """Experiment tracking (train/tracking.py): every `paf-ray run` and every Tune trial as an MLflow run."""

    mlflow: bool = False  # needs the optional extra: pip install 'paf_ray[mlflow]'
    # an MLflow tracking URI (http://host:5000, sqlite:///...), or a local folder; None = a folder
    # `mlruns/` in the run storage (a run's --out / ray.storage_path, a sweep's folder)
    uri: Optional[str] = None
    experiment: Optional[str] = None  # MLflow experiment; None = the config's name (a sweep: the sweep's)


# --------------------------------------------------------------------------- study


STUDY_PARADIGMS = ("single_task", "pretrain_finetune", "adapt_finetune", "finetune_adapters", "adapt_only")


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
    # the frames it trains on: None = the config's own training frames; an int = the training frames of a
    # synthetic set generated with this seed (data.synth's size and count), so the checkpoint never sees the
    # downstream frames or their labels (synthetic data only)
    data_seed: Optional[int] = None


@dataclass
class StudyCheckpointConfig:
    """One row group of the study: a published file (`weights` + `format`) or one made here (`pretrain`)."""

    weights: Optional[str] = None  # path or URI
    format: str = "auto"
    backbone: Optional[str] = None  # default: model.backbone.name
    trust_checkpoint: bool = False
    pretrain: Optional[PretrainConfig] = None
    lv_adapter: Optional[list[bool]] = None  # LV-Adapter off/on for this checkpoint; default study.lv_adapter


@dataclass
class StudyConfig:
    """`paf-ray study`: the comparison grid (docs/study.md). Every cell trains `total_steps` optimizer steps."""

    checkpoints: dict[str, StudyCheckpointConfig] = field(default_factory=dict)
    paradigms: list[Literal["single_task", "pretrain_finetune", "adapt_finetune", "finetune_adapters",
                            "adapt_only"]] = field(
        default_factory=lambda: ["single_task", "pretrain_finetune", "adapt_finetune"])
    adapter_kinds: list[str] = field(default_factory=lambda: ["bypass"])
    lv_adapter: list[bool] = field(default_factory=lambda: [False])
    # LV-on cells: model.lv_adapter.context of each (per_task: each task's own language context; shared: averaged)
    lv_context: list[Literal["per_task", "shared"]] = field(default_factory=lambda: ["per_task"])
    # what a single-task cell is given: equal_steps = total_steps, like every cell; equal_labels = as many
    # labelled samples of its task as a multi-task cell sees (total_steps x that task's share of the
    # multi-task training frames, per epoch rounded to whole steps)
    exposure: Literal["equal_labels", "equal_steps"] = "equal_labels"
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
    # modules to import before the rest is read: a user's tasks, backbones or adapter kinds register there
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    job: JobConfig = field(default_factory=JobConfig)
