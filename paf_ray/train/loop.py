"""The per-worker training loop: a plain function that Ray Train runs on every worker.

One call trains one stage (adapt or finetune) of the config. It builds the model,
restores from Ray's latest checkpoint (a restarted worker or a resumed run) or from the
previous stage's checkpoint, trains, evaluates on its val shard, and reports metrics
with a checkpoint every epoch. Everything a rank decides that changes control flow
(skip a non-finite step, stop) is agreed on by all ranks first, so DDP never waits.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from paf_ray.config import Config, StageConfig, from_dict
from paf_ray.data.pipeline import iter_train_batches
from paf_ray.eval.evaluator import Evaluator, compute_metrics, merge_states
from paf_ray.eval.keys import (COST_GFLOPS, COST_PEAK_MEM_MB, COST_STEP_MS, COST_TRAINABLE_PARAMS, DATA_SKIPPED,
                               SCORE, TRAIN_EPOCH_S, TRAIN_IMG_S, TRAIN_LOSS_PREFIX)
from paf_ray.models.inspect import forward_gflops
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import apply_stage, finish_stage, prepare_norm
from paf_ray.runtime import files, storage
from paf_ray.runtime.ray import quiet_ray_logs
from paf_ray.tasks import ordered
from paf_ray.train.checkpoint import load_model_state, read_train_state, save_checkpoint, unwrap
from paf_ray.train.step import StepCounter, Trainee, all_reduce_sum, dist_on, make_trainee, train_step


def _all_gather(obj: Any) -> list[Any]:
    if not dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def evaluate(net: torch.nn.Module, batches, cfg: Config, device: torch.device, amp: bool) -> dict:
    """Run `net` over `batches` (this worker's share of val); return the evaluator state."""
    evaluator = Evaluator(ordered(cfg.model.tasks), cfg.model.heads)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for batch in batches:
            if batch["image"].shape[0] == 0:
                continue
            images = batch["image"]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = net(images)
            evaluator.update(outputs, batch)
    net.train(was_training)
    return evaluator.state()


def gather_metrics(state: dict, task_names: list[str]) -> dict:
    """All ranks call this: merge every worker's evaluator state and compute the metrics."""
    tasks = ordered(task_names)
    return compute_metrics(tasks, merge_states(tasks, _all_gather(state)))


class _WaitClock:
    """Seconds the loop spent waiting for its next batch (shown as "data wait" in the log line)."""

    def __init__(self):
        self.waited = 0.0

    def timed(self, iterable):
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            yield item

    def take(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited


class _RunLog:
    """Rank-0 writer of metrics.jsonl and TensorBoard events in the run folder.

    A run folder on object storage is written through a local folder on this worker's node:
    metrics.jsonl (continued from the run folder's copy, whichever node wrote it) and the
    TensorBoard events are uploaded after every report.
    """

    def __init__(self, run_dir: str | None, enabled: bool):
        self.enabled = enabled and bool(run_dir)
        self.run_dir = run_dir
        self.remote = self.enabled and storage.is_remote(run_dir)
        self.log_dir = tempfile.mkdtemp(prefix="paf_ray_log_") if self.remote else run_dir
        self.tb = None
        if self.enabled:
            os.makedirs(self.log_dir, exist_ok=True)
            remote_rows = storage.join(run_dir, "metrics.jsonl")
            if self.remote and storage.exists(remote_rows):
                files.write_bytes(os.path.join(self.log_dir, "metrics.jsonl"), storage.read_bytes(remote_rows))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.log_dir, "tb"))
            except ImportError:  # tensorboard missing: jsonl still written
                self.tb = None

    def scalars(self, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self.tb is not None:
            self.tb.flush()
        self.upload()

    def upload(self) -> None:
        """Copy metrics.jsonl and the TensorBoard files to a run folder on object storage."""
        if not self.remote:
            return
        for folder, _, files in os.walk(self.log_dir):
            for name in files:
                local = os.path.join(folder, name)
                storage.upload_file(local, storage.join(self.run_dir, os.path.relpath(local, self.log_dir)))

    def forget_after(self, stage_name: str, step: int) -> None:
        """Drop rows of `stage_name` past `step`: work after the restored checkpoint is redone,
        so its rows would otherwise appear twice."""
        path = os.path.join(self.log_dir, "metrics.jsonl") if self.enabled else None
        if not path or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for number, line in enumerate(rows, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if number == len(rows):  # cut short by the crash this run resumes from: never written whole
                    continue
                raise ValueError(f"{path}: line {number}: not a JSON row") from None
            if not (row.get("stage") == stage_name and row.get("step", 0) > step):
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != rows:
            files.write_text(path, "".join(keep))
            self.upload()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.upload()
        if self.remote:
            shutil.rmtree(self.log_dir, ignore_errors=True)


@dataclass
class Progress:
    """Where a stage stands: restored from a checkpoint's train state, advanced by the loop."""

    epoch: int = 0  # epochs completed
    skip_steps: int = 0  # steps of the current epoch already in the restored checkpoint
    global_step: int = 0  # optimizer updates in this stage
    best_score: float | None = None
    last_metrics: dict = field(default_factory=dict)  # the latest evaluation


@dataclass
class StageRun:
    """One worker's view of the stage it trains."""

    cfg: Config
    index: int
    name: str
    spec: StageConfig
    rank: int
    world: int
    trainee: Trainee
    steps_per_epoch: int
    step_offset: int  # global steps of the stages before this one (TensorBoard x axis)
    log: _RunLog
    costs: dict = field(default_factory=dict)  # the stage's fixed costs (stage_costs)
    step_ms: list = field(default_factory=list)  # this epoch's measured training steps
    last_step_ms: float | None = None
    waits: _WaitClock = field(default_factory=lambda: _WaitClock())


def build_and_restore(cfg: Config, init_checkpoint) -> tuple[torch.nn.Module, dict | None]:
    """The model, with weights from Ray's latest checkpoint (a restarted worker or a resumed run),
    else from the previous stage's checkpoint, else as the config names them."""
    resumed = ray.train.get_checkpoint()
    # Weights named in the config are read only when no checkpoint supplies them.
    model = build_model(cfg.model, input_size=cfg.data.input_size,
                        load_weights=resumed is None and init_checkpoint is None)
    if resumed is not None:
        with resumed.as_directory() as d:
            load_model_state(model, d)
            return model, read_train_state(d)
    if init_checkpoint is not None:
        with init_checkpoint.as_directory() as d:
            load_model_state(model, d)
    return model, None


def place_model(model: torch.nn.Module, cfg: Config, kind: str, device: torch.device, world: int):
    """Apply the stage policy, move to the device, wrap in DDP:
    (model to call, plain module, number of BatchNorm layers made SyncBatchNorm)."""
    apply_stage(model, kind, cfg.model.lv_adapter.train_prompts_in_finetune)
    model.to(device)
    if cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda"):
        model.to(memory_format=torch.channels_last)
    synced = prepare_norm(model, cfg.model.norm, world)  # SyncBatchNorm before DDP wraps the model
    if world == 1:
        return model, model, synced
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
    return wrapped, unwrap(wrapped), synced


def stage_costs(trainee: Trainee, cfg: Config, rank: int, name: str) -> dict:
    """The costs that hold for the whole stage: the parameters it trains and (counted on rank 0,
    whose report is the one kept) the GFLOPs of one eval forward at data.input_size."""
    costs: dict[str, float] = {COST_TRAINABLE_PARAMS: sum(p.numel() for p in trainee.trainable)}
    if rank == 0:
        try:
            with torch.random.fork_rng(devices=[]):  # counting must not move training's random stream
                gflops, _ = forward_gflops(trainee.net, cfg.data.input_size, trainee.device)
            costs[COST_GFLOPS] = round(gflops, 3)
        except Exception as e:  # counting is best effort (models/inspect.py); training goes on without it
            print(f"[{name}] {COST_GFLOPS} not counted: {type(e).__name__}: {e}", flush=True)
    return costs


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors held on the device (since the stage started); CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cost_metrics(run: StageRun) -> dict:
    """The cost/* keys of a report (eval/keys.py)."""
    out = dict(run.costs)
    if run.step_ms:
        run.last_step_ms = statistics.median(run.step_ms)
    if run.last_step_ms is not None:
        out[COST_STEP_MS] = round(run.last_step_ms, 2)
    out[COST_PEAK_MEM_MB] = round(peak_memory_mb(run.trainee.device), 1)
    return out


def restore_progress(trainee: Trainee, train_state: dict | None) -> Progress:
    if train_state is None:
        return Progress()
    trainee.optimizer.load_state_dict(train_state["optimizer"])
    trainee.scheduler.load_state_dict(train_state["scheduler"])
    return Progress(epoch=int(train_state["epoch"]), skip_steps=int(train_state["step_in_epoch"]),
                    global_step=int(train_state["global_step"]), best_score=train_state.get("best_score"))


def setup_stage(config: dict) -> tuple[StageRun, Progress] | None:
    """Everything a worker needs before its first step; None when the stage is already complete.

    `config` keys: cfg (dict), stage_index, init_checkpoint (a ray.train.Checkpoint or None),
    steps_per_epoch, step_offset, log_dir, stage_name."""
    quiet_ray_logs()  # a worker of a cluster we joined has no setup hook of ours
    cfg: Config = from_dict(config["cfg"], "<train_loop_config>", rules=False)  # checked when the run started
    index: int = config["stage_index"]
    spec = cfg.train.stages[index]
    name = config.get("stage_name", f"stage{index}-{spec.kind}")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + 1000 * index + rank)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)

    model, train_state = build_and_restore(cfg, config.get("init_checkpoint"))
    model, net, synced = place_model(model, cfg, spec.kind, device, world)
    if synced and rank == 0:
        print(f"[{name}] model.norm syncbn: {synced} BatchNorm layers use the statistics of all {world} workers")
    steps_per_epoch = int(config["steps_per_epoch"])  # run.stage_steps_per_epoch: the stream is cut to it
    amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    trainee = make_trainee(model, net, spec, device, amp=amp,
                           total_updates=max(1, spec.epochs * steps_per_epoch // max(1, spec.accum_steps)),
                           max_bad_steps=cfg.train.max_bad_steps, name=name)
    if train_state is not None and int(train_state["epoch"]) >= spec.epochs:
        if rank == 0:
            print(f"[{name}] already complete in the restored checkpoint; nothing to do")
        return None
    progress = restore_progress(trainee, train_state)
    if train_state is not None and rank == 0:
        print(f"[{name}] resumed at epoch {progress.epoch} step {progress.skip_steps} "
              f"(global step {progress.global_step})")
    log = _RunLog(config.get("log_dir"), enabled=rank == 0)
    log.forget_after(name, progress.global_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = StageRun(cfg, index, name, spec, rank, world, trainee, steps_per_epoch,
                   int(config.get("step_offset", 0)), log, costs=stage_costs(trainee, cfg, rank, name))
    return run, progress


def log_step(run: StageRun, progress: Progress, epoch: int, done: int, outcome, clock: dict, waits: _WaitClock) -> None:
    """Rank 0's progress line every `train.log_every` updates: losses, lr, img/s, data wait, ETA."""
    now = time.perf_counter()
    img_s = clock["images"] * run.world / max(1e-9, now - clock["t_log"])
    per_step = (now - clock["t_epoch"]) / max(1, done - clock["first_step"])
    eta = per_step * (run.steps_per_epoch - done) + (run.spec.epochs - epoch - 1) * per_step * run.steps_per_epoch
    lr = run.trainee.scheduler.get_last_lr()[0]
    parts = " ".join(f"{k} {v + 0.0:.4f}" for k, v in outcome.losses.items())  # + 0.0: no "-0.0000"
    print(f"[{run.name}] epoch {epoch + 1}/{run.spec.epochs} step {done}/{run.steps_per_epoch} "
          f"loss {outcome.total:.4f} ({parts}) lr {lr:.2e} {img_s:.1f} img/s "
          f"data wait {waits.take() / max(1e-9, now - clock['t_log']):.0%} ETA {eta:.0f}s", flush=True)
    step = run.step_offset + progress.global_step
    run.log.scalars({f"loss/{k}": v for k, v in outcome.losses.items()}, step)
    run.log.scalars({"train/lr": lr, "train/img_s": img_s}, step)
    clock["t_log"], clock["images"] = now, 0


def stage_batches(run: StageRun):
    """This worker's batches of the whole stage: one stream over every epoch (run.make_datasets)."""
    shard = ray.train.get_dataset_shard("train")
    tasks = ordered(run.cfg.model.tasks)
    return run.waits.timed(iter_train_batches(shard, tasks, run.cfg.data.batch_size, device=run.trainee.device))


def train_one_epoch(run: StageRun, progress: Progress, epoch: int, batches) -> dict:
    """Train one epoch (`steps_per_epoch` batches of the stage's stream); return the epoch's loss
    means and counts (all ranks)."""
    counter = StepCounter()
    sums: dict[str, float] = {}
    n_loss = skipped = images_seen = 0
    clock = {"t_epoch": time.perf_counter(), "t_log": time.perf_counter(), "images": 0,
             "first_step": progress.skip_steps}
    run.step_ms = []
    for step_in_epoch in range(run.steps_per_epoch):
        batch = next(batches, None)
        if batch is None:  # the stream ran out (a stage resumed from an earlier epoch than its stream holds)
            break
        skipped += int(batch.get("skipped", 0))
        if step_in_epoch < progress.skip_steps:  # resumed mid-epoch: these steps are in the checkpoint already
            continue
        t_step = time.perf_counter()
        outcome = train_step(run.trainee, batch, counter)
        if run.trainee.device.type == "cuda":
            torch.cuda.synchronize(run.trainee.device)  # the step's kernels, not only their launch
        if outcome.skipped != "empty":
            run.step_ms.append((time.perf_counter() - t_step) * 1000.0)
        if outcome.skipped == "nonfinite loss" and run.rank == 0:
            print(f"[{run.name}] non-finite loss at step {progress.global_step}: step skipped on every rank "
                  f"({counter.bad_in_a_row} in a row): {outcome.losses}")
        if outcome.skipped in ("empty", "nonfinite loss"):
            continue
        images_seen += outcome.images
        clock["images"] += outcome.images
        for k, v in outcome.losses.items():
            sums[k] = sums.get(k, 0.0) + v
        n_loss += 1
        if not outcome.updated:
            continue
        progress.global_step += 1
        if run.rank == 0 and run.cfg.train.log_every and progress.global_step % run.cfg.train.log_every == 0:
            log_step(run, progress, epoch, step_in_epoch + 1, outcome, clock, run.waits)
        if run.cfg.train.checkpoint_every_steps and progress.global_step % run.cfg.train.checkpoint_every_steps == 0:
            report(run, progress, epoch, step_in_epoch + 1, dict(progress.last_metrics), final=False)
    progress.skip_steps = 0

    keys = sorted(sums)
    totals = all_reduce_sum([sums[k] for k in keys] + [n_loss, skipped, images_seen], device=run.trainee.device)
    n_all = max(1.0, totals[len(keys)])
    wall = time.perf_counter() - clock["t_epoch"]
    metrics = {f"{TRAIN_LOSS_PREFIX}{k}": totals[i] / n_all for i, k in enumerate(keys)}
    metrics[DATA_SKIPPED] = int(totals[len(keys) + 1])
    metrics[TRAIN_IMG_S] = totals[len(keys) + 2] / max(1e-9, wall)
    metrics[TRAIN_EPOCH_S] = wall
    return metrics


def evaluate_epoch(run: StageRun, progress: Progress, epoch: int) -> dict:
    """Validation metrics after `epoch` when one is due (every `eval_every_epochs` and the last)."""
    last = epoch == run.spec.epochs - 1
    every = run.cfg.train.eval_every_epochs
    if not (last or (every and (epoch + 1) % every == 0)):
        return {}
    val_shard = ray.train.get_dataset_shard(f"val_{run.rank}")
    batches = iter_train_batches(val_shard, ordered(run.cfg.model.tasks), run.cfg.data.batch_size,
                                 device=run.trainee.device)
    state = evaluate(run.trainee.net, batches, run.cfg, run.trainee.device, run.trainee.amp)
    metrics = gather_metrics(state, list(run.cfg.model.tasks))
    progress.last_metrics = dict(metrics)
    if run.rank == 0:
        shown = {k: round(v, 2) for k, v in metrics.items() if k.count("/") <= 1 and isinstance(v, float)}
        print(f"[{run.name}] epoch {epoch + 1}/{run.spec.epochs} eval: {shown}", flush=True)
    return metrics


def report(run: StageRun, progress: Progress, epoch: int, step_in_epoch: int, metrics: dict, final: bool) -> None:
    """Metrics, the stage's costs and, from rank 0, a checkpoint. All ranks call this together
    (ray.train.report is a barrier)."""
    score = metrics.get(SCORE)
    if isinstance(score, (int, float)) and math.isfinite(score):
        progress.best_score = score if progress.best_score is None else max(progress.best_score, score)
    row = {"stage": run.name, "stage_index": run.index, "stage_kind": run.spec.kind, "epoch": epoch,
           "step": progress.global_step, "global_step": run.step_offset + progress.global_step,
           **metrics, **cost_metrics(run)}
    row.setdefault(SCORE, progress.last_metrics.get(SCORE, 0.0))
    if run.rank == 0:
        t = run.trainee
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(
                d, t.net, run.cfg,
                meta={"stage": run.spec.kind, "stage_index": run.index, "epoch": epoch, "step": progress.global_step,
                      "final": final, "metrics": metrics},
                train_state={"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                             "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": progress.global_step,
                             "best_score": progress.best_score},
            )
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(row, checkpoint=None)
    run.log.record(row)
    run.log.scalars({k: v for k, v in row.items() if "/" in k or k == SCORE}, run.step_offset + progress.global_step)


def train_loop(config: dict) -> None:
    """Ray Train entry point: one stage on this worker (keys of `config`: see `setup_stage`)."""
    started = setup_stage(config)
    if started is None:
        return
    run, progress = started
    run.trainee.model.train()
    batches = stage_batches(run)
    for epoch in range(progress.epoch, run.spec.epochs):
        metrics = train_one_epoch(run, progress, epoch, batches)
        if run.rank == 0:
            print(f"[{run.name}] epoch {epoch + 1}/{run.spec.epochs}: {metrics[TRAIN_EPOCH_S]:.1f} s, "
                  f"{metrics[TRAIN_IMG_S]:.1f} img/s", flush=True)
        metrics.update(evaluate_epoch(run, progress, epoch))
        last = epoch == run.spec.epochs - 1
        if last:
            finish_stage(run.trainee.net, run.spec.kind, run.spec.merge_adapters)  # LoRA merge at the end of adapt
        report(run, progress, epoch + 1, 0, metrics, final=last)
    run.log.close()
