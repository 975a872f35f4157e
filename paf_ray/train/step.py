"""One training step: the loop's and every benchmark's, so a benchmark times what training runs.

Forward under autocast, the total loss, backward (without DDP's all-reduce on the micro-batches
of an accumulation that are not its last), then at the accumulation boundary: clip, a check that
the gradient norm is finite, optimizer and scheduler step, zero_grad. A non-finite loss or an
empty batch on any rank skips the step on every rank (so DDP never waits for a rank that gave
up), and too many bad steps in a row stop training.

No Ray here: the GPU benchmark runs this on machines where only torch is installed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paf_ray.models.stages import param_groups


# OpenMP (libgomp, torch's CPU thread pool) lets a thread that waits at a barrier or for work spin
# 300,000 times before it sleeps. A training step is hundreds of such waits, so where the decode
# tasks share the cores (at idle priority, data/pipeline.py) the trainer's spinning threads held
# both: beside the demo's step an idle-priority decoder got 3-17 rows/s, with 30,000 spins 63-81,
# and the step alone was as fast (docs/benchmarks.md). libgomp reads this when it loads, so it goes
# into the environment of a training process, not into the loop.
TRAIN_PROCESS_ENV = {"GOMP_SPINCOUNT": "30000"}
OPENMP_WAIT_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def train_process_env(environ=None) -> dict[str, str]:
    """Environment variables for the processes that run training steps (Ray Train workers, the
    benchmarks' step processes): TRAIN_PROCESS_ENV, unless `environ` (default: this process's: the
    user's shell, a job's runtime_env) sets OpenMP's waiting itself, which the workers then inherit."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in OPENMP_WAIT_VARS):
        return {}
    return dict(TRAIN_PROCESS_ENV)


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the base lr: linear warm-up, then cosine / poly(0.9) / constant."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** 0.9

    return f


def build_optimizer(net: torch.nn.Module, stage) -> torch.optim.Optimizer:
    """The optimizer of a stage (train.stages[i]) over the trainable parameters' groups."""
    groups = param_groups(net, stage)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


@dataclass
class Trainee:
    """What a step works on. `model` may be DDP-wrapped; `net` is the plain module inside it."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp: bool = False  # bf16 autocast for the forward (box arithmetic stays fp32 inside the model)
    grad_clip: float | None = None
    accum: int = 1
    max_bad_steps: int = 5
    name: str = "train"
    trainable: list = field(default_factory=list)

    def __post_init__(self):
        if not self.trainable:
            self.trainable = [p for p in self.net.parameters() if p.requires_grad]


def make_trainee(model: torch.nn.Module, net: torch.nn.Module, stage, device: torch.device, *,
                 amp: bool, total_updates: int, max_bad_steps: int = 5, name: str = "train") -> Trainee:
    """The optimizer and lr schedule of `stage` around a model whose stage policy is applied."""
    optimizer = build_optimizer(net, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.schedule, stage.warmup_steps, total_updates))
    return Trainee(model, net, optimizer, scheduler, device, amp=amp, grad_clip=stage.grad_clip,
                   accum=max(1, stage.accum_steps), max_bad_steps=max_bad_steps, name=name)


@dataclass
class StepCounter:
    micro: int = 0  # micro-batches accumulated since the last update
    bad_in_a_row: int = 0
    updates: int = 0


@dataclass
class StepOutcome:
    images: int
    losses: dict[str, float] = field(default_factory=dict)  # this micro-batch's losses
    total: float = float("nan")  # the total loss (not divided by the accumulation)
    updated: bool = False  # an optimizer update happened
    skipped: str = ""  # "", "empty", "nonfinite loss", "nonfinite grad"


def _skip(t: Trainee, counter: StepCounter, outcome: StepOutcome, why: str) -> StepOutcome:
    t.optimizer.zero_grad(set_to_none=True)
    counter.micro = 0
    outcome.skipped = why
    if why != "empty":
        counter.bad_in_a_row += 1
        if counter.bad_in_a_row >= t.max_bad_steps:
            raise RuntimeError(f"{t.name}: {counter.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                               f"{t.max_bad_steps}); lower the learning rate or check the data")
    return outcome


def train_step(t: Trainee, batch: dict, counter: StepCounter) -> StepOutcome:
    """One micro-batch: forward, backward, and at the accumulation boundary the update."""
    images = int(batch["image"].shape[0])
    outcome = StepOutcome(images=images)
    # agreed before the forward: SyncBatchNorm's collectives need every rank in the forward
    if all_reduce_sum([float(images == 0)], t.device)[0]:
        return _skip(t, counter, outcome, "empty")
    with torch.autocast(device_type=t.device.type, dtype=torch.bfloat16, enabled=t.amp):
        losses = t.model(batch["image"], batch)
        total = t.net.total_loss(losses) / t.accum
    outcome.losses = {k: float(v.detach()) for k, v in losses.items()}
    outcome.total = float(total.detach()) * t.accum
    if all_reduce_sum([float(not math.isfinite(outcome.total))], t.device)[0]:
        return _skip(t, counter, outcome, "nonfinite loss")

    counter.micro += 1
    boundary = counter.micro == t.accum
    if dist_on() and not boundary:
        with t.model.no_sync():
            total.backward()
    else:
        total.backward()
    if not boundary:
        return outcome
    counter.micro = 0
    # the total norm is needed for the finiteness check even when nothing is clipped
    grad_norm = torch.nn.utils.clip_grad_norm_(t.trainable, t.grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):  # gradients are all-reduced: every rank sees the same norm
        return _skip(t, counter, outcome, "nonfinite grad")
    counter.bad_in_a_row = 0
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    counter.updates += 1
    outcome.updated = True
    return outcome
