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
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from paf_ray.config import Config, StageConfig, from_dict
from paf_ray.train.checkpoint import load_model_state, read_train_state, save_checkpoint, unwrap


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _all_gather(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def build_optimizer(net: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    from paf_ray.models.stages import param_groups

    groups = param_groups(net, stage)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


def evaluate(net: torch.nn.Module, batches, cfg: Config, device: torch.device, amp: bool) -> dict:
    """Run `net` over `batches` (this worker's share of val); return the evaluator state."""
    from paf_ray.eval.metrics import Evaluator

    evaluator = Evaluator(tasks=list(cfg.model.tasks))
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


def gather_metrics(state: dict, tasks: list[str]) -> dict:
    """All ranks call this: merge every worker's evaluator state and compute the metrics."""
    from paf_ray.eval.metrics import compute_metrics, merge_states

    states = _all_gather(state)
    return compute_metrics(merge_states(states), tasks)


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
    """Rank-0 writer of metrics.jsonl and TensorBoard events in the run folder."""

    def __init__(self, log_dir: str | None, enabled: bool):
        self.enabled = enabled and bool(log_dir)
        self.log_dir = log_dir
        self.tb = None
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(log_dir, "tb"))
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

    def forget_after(self, stage_name: str, step: int) -> None:
        """Drop rows of `stage_name` past `step`: work after the restored checkpoint is redone,
        so its rows would otherwise appear twice."""
        path = os.path.join(self.log_dir, "metrics.jsonl") if self.enabled else None
        if not path or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip()]
        keep = [r for r in rows if not (json.loads(r).get("stage") == stage_name and json.loads(r).get("step", 0) > step)]
        if len(keep) != len(rows):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train_loop(config: dict) -> None:
    """Ray Train entry point. `config` keys: cfg (dict), stage_index, init_checkpoint (a
    ray.train.Checkpoint or None), steps_per_epoch, step_offset, log_dir, stage_name."""
    from paf_ray.data.pipeline import iter_train_batches
    from paf_ray.models import build_model
    from paf_ray.models.stages import apply_stage, finish_stage, prepare_norm

    cfg: Config = from_dict(config["cfg"], "<train_loop_config>")
    stage_index: int = config["stage_index"]
    stage = cfg.train.stages[stage_index]
    stage_name = config.get("stage_name", f"stage{stage_index}-{stage.kind}")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and on_gpu)
    torch.manual_seed(cfg.train.seed + 1000 * stage_index + rank)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)

    resumed = ray.train.get_checkpoint()
    from_checkpoint = resumed is not None or config.get("init_checkpoint") is not None
    # Weights named in the config are read only when no checkpoint supplies them.
    model = build_model(cfg.model, input_size=cfg.data.input_size, load_weights=not from_checkpoint)
    start_epoch, skip_steps, global_step, train_state = 0, 0, 0, None
    if resumed is not None:
        with resumed.as_directory() as d:
            load_model_state(model, d)
            train_state = read_train_state(d)
    elif config.get("init_checkpoint") is not None:
        with config["init_checkpoint"].as_directory() as d:
            load_model_state(model, d)

    apply_stage(model, stage.kind, cfg)
    model.to(device)
    if cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and on_gpu):
        model.to(memory_format=torch.channels_last)
    net = model
    synced = prepare_norm(model, cfg.model.norm, world)  # SyncBatchNorm before DDP wraps the model
    if synced and rank == 0:
        print(f"[{stage_name}] model.norm syncbn: {synced} BatchNorm layers use the statistics of all {world} workers")
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
        net = unwrap(model)

    steps_per_epoch = int(config["steps_per_epoch"])
    if stage.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, stage.max_steps_per_epoch)
    accum = max(1, stage.accum_steps)
    total_updates = max(1, stage.epochs * steps_per_epoch // accum)
    optimizer = build_optimizer(net, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stage.schedule, stage.warmup_steps, total_updates)
    )
    best_score = None
    if train_state is not None and int(train_state["epoch"]) >= stage.epochs:
        if rank == 0:
            print(f"[{stage_name}] already complete in the restored checkpoint; nothing to do")
        return
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        start_epoch = int(train_state["epoch"])
        skip_steps = int(train_state["step_in_epoch"])
        global_step = int(train_state["global_step"])
        best_score = train_state.get("best_score")
        if rank == 0:
            print(f"[{stage_name}] resumed at epoch {start_epoch} step {skip_steps} (global step {global_step})")

    log = _RunLog(config.get("log_dir"), enabled=rank == 0)
    log.forget_after(stage_name, global_step if train_state is not None else 0)
    step_offset = int(config.get("step_offset", 0))
    trainable = [p for p in net.parameters() if p.requires_grad]
    last_metrics: dict = {}
    bad_in_a_row = 0

    def report(epoch: int, step_in_epoch: int, metrics: dict, final: bool) -> None:
        """All ranks call this together (ray.train.report is a barrier)."""
        nonlocal best_score
        score = metrics.get("score")
        if isinstance(score, (int, float)) and math.isfinite(score):
            best_score = score if best_score is None else max(best_score, score)
        row = {
            "stage": stage_name,
            "stage_index": stage_index,
            "stage_kind": stage.kind,
            "epoch": epoch,
            "step": global_step,
            **metrics,
        }
        row.setdefault("score", last_metrics.get("score", 0.0))
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(
                    d,
                    net,
                    cfg,
                    meta={"stage": stage.kind, "stage_index": stage_index, "epoch": epoch, "step": global_step,
                          "final": final, "metrics": metrics},
                    train_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "step_in_epoch": step_in_epoch,
                        "global_step": global_step,
                        "best_score": best_score,
                    },
                )
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(row, checkpoint=None)
        log.record(row)
        log.scalars({k: v for k, v in row.items() if "/" in k or k == "score"}, step_offset + global_step)

    model.train()
    for epoch in range(start_epoch, stage.epochs):
        shard = ray.train.get_dataset_shard("train")
        sums: dict[str, float] = {}
        n_loss, skipped, images_seen = 0, 0, 0
        t_epoch = t_log = time.perf_counter()
        imgs_since_log = 0
        micro = 0
        waits = _WaitClock()
        for step_in_epoch, batch in enumerate(waits.timed(iter_train_batches(shard, cfg.data.batch_size, device=device))):
            if step_in_epoch >= steps_per_epoch:
                break
            skipped += int(batch.get("skipped", 0))
            if step_in_epoch < skip_steps:  # resumed mid-epoch: these steps are in the checkpoint already
                continue
            batch_size = int(batch["image"].shape[0])
            # agreed before the forward: SyncBatchNorm's collectives need every rank in the forward
            empty = _all_reduce_sum([float(batch_size == 0)], device)[0]
            losses, total = {}, None
            if not empty:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    losses = model(batch["image"], batch)
                    total = net.total_loss(losses) / accum
            nonfinite = float(total is not None and not bool(torch.isfinite(total.detach())))
            nonfinite = _all_reduce_sum([nonfinite], device)[0]
            if nonfinite or empty:
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                if nonfinite:
                    bad_in_a_row += 1
                    if rank == 0:
                        print(f"[{stage_name}] non-finite loss at step {global_step}: step skipped on every rank "
                              f"({bad_in_a_row} in a row): {({k: float(v.detach()) for k, v in losses.items()})}")
                    if bad_in_a_row >= cfg.train.max_bad_steps:
                        raise RuntimeError(
                            f"{stage_name}: {bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                            f"{cfg.train.max_bad_steps}); lower the learning rate or check the data"
                        )
                continue
            micro += 1
            boundary = micro == accum
            if world > 1 and not boundary:
                with model.no_sync():
                    total.backward()
            else:
                total.backward()
            images_seen += batch_size
            imgs_since_log += batch_size
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_loss += 1
            if not boundary:
                continue
            micro = 0
            # the total norm is needed for the finiteness check even when nothing is clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):  # gradients are all-reduced: every rank sees the same norm
                optimizer.zero_grad(set_to_none=True)
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise RuntimeError(f"{stage_name}: {bad_in_a_row} non-finite gradient steps in a row")
                continue
            bad_in_a_row = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if rank == 0 and cfg.train.log_every and global_step % cfg.train.log_every == 0:
                now = time.perf_counter()
                img_s = imgs_since_log * world / max(1e-9, now - t_log)
                done = step_in_epoch + 1
                eta = (now - t_epoch) / max(1, done - skip_steps) * (steps_per_epoch - done)
                eta += (stage.epochs - epoch - 1) * (now - t_epoch) / max(1, done - skip_steps) * steps_per_epoch
                lr = scheduler.get_last_lr()[0]
                parts = " ".join(f"{k} {float(v.detach()):.4f}" for k, v in losses.items())
                print(f"[{stage_name}] epoch {epoch + 1}/{stage.epochs} step {done}/{steps_per_epoch} "
                      f"loss {float(total.detach()) * accum:.4f} ({parts}) lr {lr:.2e} {img_s:.1f} img/s "
                      f"data wait {waits.take() / max(1e-9, now - t_log):.0%} ETA {eta:.0f}s", flush=True)
                log.scalars({f"loss/{k}": float(v.detach()) for k, v in losses.items()}, step_offset + global_step)
                log.scalars({"train/lr": lr, "train/img_s": img_s}, step_offset + global_step)
                t_log, imgs_since_log = now, 0
            if cfg.train.checkpoint_every_steps and global_step % cfg.train.checkpoint_every_steps == 0:
                report(epoch, step_in_epoch + 1, {**last_metrics}, final=False)
        skip_steps = 0

        # ---- end of epoch: losses, skipped samples, evaluation, checkpoint
        keys = sorted(sums)
        totals = _all_reduce_sum([sums[k] for k in keys] + [n_loss, skipped, images_seen], device)
        n_all = max(1.0, totals[len(keys)])
        epoch_metrics = {f"train/loss_{k}": totals[i] / n_all for i, k in enumerate(keys)}
        epoch_metrics["data/skipped"] = int(totals[len(keys) + 1])
        wall = time.perf_counter() - t_epoch
        epoch_metrics["train/img_s"] = totals[len(keys) + 2] / max(1e-9, wall)
        epoch_metrics["train/epoch_s"] = wall
        last_epoch = epoch == stage.epochs - 1
        if last_epoch or (cfg.train.eval_every_epochs and (epoch + 1) % cfg.train.eval_every_epochs == 0):
            val_shard = ray.train.get_dataset_shard(f"val_{rank}")
            state = evaluate(net, iter_train_batches(val_shard, cfg.data.batch_size, device=device), cfg, device, amp)
            eval_metrics = gather_metrics(state, list(cfg.model.tasks))
            last_metrics = {k: v for k, v in eval_metrics.items()}
            epoch_metrics.update(eval_metrics)
            if rank == 0:
                shown = {k: round(v, 2) for k, v in eval_metrics.items() if k.count("/") <= 1 and isinstance(v, float)}
                print(f"[{stage_name}] epoch {epoch + 1}/{stage.epochs} eval: {shown}", flush=True)
        if last_epoch:
            finish_stage(net, stage.kind, stage)  # LoRA merge at the end of adapt, per the stage policy
        report(epoch + 1, 0, epoch_metrics, final=last_epoch)
    log.close()
