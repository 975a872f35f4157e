"""Training steps, timed in a process of their own: `python -m paf_ray.bench.step_case SPEC OUT`.

The step is the training loop's `train.step.train_step` (autocast forward, total loss, backward, clip,
optimizer and scheduler step, zero_grad) on a batch built before timing. The cases of a spec are built
in one process and their steps interleaved (one step of each in turn), so a load change on a shared
machine hits every case alike. Peak memory is the process's: a case's own where it runs alone (on CUDA
`max_memory_allocated`; on CPU the peak RSS, reset after the imports, minus the RSS before the model
was built: weights, gradients, optimizer state and activations).

No Ray here, open_clip only for an LV-Adapter case: scripts/gpu_bench.sh runs this on a GPU machine's stock image.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any


class StepClock:
    """Timestamps of a step's phases from hooks: the backbone's forward (a pre-hook and a hook) and
    backward (from the gradient of its last output; a frozen backbone has none), the model's forward
    (it returns the losses), the backward (every trainable parameter has its gradient: a multi-grad
    hook), the optimizer part (clip, step, zero_grad) to the step's end. Each timestamp synchronises."""

    def __init__(self, trainee, sync):
        import torch

        self.sync = sync
        backbone = trainee.net.backbone
        self.handles = [backbone.register_forward_pre_hook(lambda m, i: self._mark("bb_start")),
                        backbone.register_forward_hook(self._backbone_done),
                        trainee.model.register_forward_hook(lambda m, i, o: self._mark("forward_done")),
                        torch.autograd.graph.register_multi_grad_hook(trainee.trainable,
                                                                      lambda g: self._mark("backward_done"))]
        self.reset()

    def reset(self) -> StepClock:
        self.bb_start = self.bb_end = self.grad_at_backbone = self.forward_done = self.backward_done = None
        return self

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _mark(self, name: str) -> None:
        setattr(self, name, self.now())

    def _backbone_done(self, module, inputs, output) -> None:
        self.bb_end = self.now()
        for t in output.values() if isinstance(output, dict) else [output]:  # a backbone's feature maps
            if t.requires_grad:
                t.register_hook(lambda grad: self._mark("grad_at_backbone"))

    def breakdown_ms(self, t0: float, t_end: float) -> dict:
        """The step from `t0` to `t_end`: backbone forward/backward, the rest forward/backward, optimizer."""
        fwd, bwd = self.forward_done - t0, self.backward_done - self.forward_done
        bb_fwd = self.bb_end - self.bb_start if self.bb_start is not None and self.bb_end is not None else 0.0
        bb_bwd = self.backward_done - self.grad_at_backbone if self.grad_at_backbone is not None else 0.0
        return {"backbone_fwd_ms": 1000 * bb_fwd, "backbone_bwd_ms": 1000 * bb_bwd,
                "rest_fwd_ms": 1000 * (fwd - bb_fwd), "rest_bwd_ms": 1000 * (bwd - bb_bwd),
                "optimizer_ms": 1000 * (t_end - self.backward_done)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _memory_mb(key: str) -> float:
    """This process's VmRSS (now) or VmHWM (its peak since `_reset_peak`), Linux /proc; no psutil on the GPU path."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _reset_peak() -> bool:
    """Reset the peak RSS (clear_refs 5), so that the imports' peak does not hide the case's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5") == 1
    except OSError:
        return False


def synthetic_batch(input_size, batch: int, task_names) -> dict:
    """A training batch of `task_names`: synthetic 1280x720 frames rendered in memory
    (`synth.render_samples`, what `data synth` writes before JPEG), the pipeline's val geometry and
    rows (`transforms.make_row`), its collate (`collate.collate_rows`). No Ray, no files."""
    from paf_ray.data.bdd100k.synth import render_samples
    from paf_ray.data.collate import collate_rows, stack_rows
    from paf_ray.data.transforms import make_row, val_geometry
    from paf_ray.tasks import TASKS

    tasks = TASKS.get_many(task_names)
    rows = []
    for i, sample in enumerate(render_samples(batch, (1280, 720))):
        h, w = sample["image"].shape[:2]
        row = make_row(sample["image"], sample["targets"], tasks, val_geometry(w, h, input_size))
        rows.append({**row, "name": f"synth-{i}.jpg", "error": ""})
    return dict(collate_rows(stack_rows(rows), tasks))


def build_case(spec: dict):
    """(model, stage, batch, device) of a case: the config dict "cfg", the stage kind "stage" (the
    config's stage of that kind, or its defaults), a torch.save'd batch "batch_path", "device",
    "channels_last", "compile", "prompts_frozen", "load_weights" (default true)."""
    import torch

    from paf_ray.config import StageConfig, from_dict
    from paf_ray.data.collate import batch_to_device
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import apply_stage

    cfg = from_dict(spec["cfg"], "<bench case>")
    stage = next((s for s in cfg.train.stages if s.kind == spec["stage"]), StageConfig(kind=spec["stage"]))
    device = torch.device(spec["device"])
    batch = torch.load(spec["batch_path"], weights_only=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.input_size, load_weights=spec.get("load_weights", True))
    apply_stage(model, stage.kind, cfg.model.lv_adapter.train_prompts_in_finetune)
    if spec.get("prompts_frozen"):  # class embeddings cached: the LV-Adapter without its text tower
        model.lv_adapter.set_prompts_trainable(False)
    model.to(device)
    if spec.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.train()
    model.compiled_parts = model.compile_dense() if spec.get("compile") else []
    return model, stage, batch_to_device(batch, device), device


def make_step(model, stage, batch, device, amp: bool, total_updates: int):
    """(trainee, step): `step(clock=None)` runs `train_step` on `batch`, one optimizer update, and
    returns the times it started and ended."""
    from dataclasses import replace

    from paf_ray.train.step import StepCounter, make_trainee, train_step

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("bench case: the stage policy left nothing trainable")
    trainee = make_trainee(model, model, replace(stage, accum_steps=1), device, amp=amp,
                           total_updates=total_updates, name="bench")
    counter = StepCounter()

    def step(clock: StepClock | None = None) -> tuple[float, float]:
        now = clock.now if clock is not None else time.perf_counter
        t0 = now()
        outcome = train_step(trainee, batch, counter)
        t_end = now()
        if not outcome.updated:
            raise RuntimeError(f"bench case: the training step was skipped ({outcome.skipped})")
        return t0, t_end

    return trainee, step


def measure(spec: dict) -> dict:
    """{"cases": {name: `build_case` spec + "amp"}, "device", "threads", "warmup", "repeats", "breakdown"
    (default true), "flops" (count one more step's FLOPs)} -> {"cases": {name: {"ms", "ms_all",
    "cpu_ms", "first_step_ms", "breakdown", ...}}, "peak_mb" (of the process: a case's own where it is alone),
    "threads", "openmp_wait", "cpu_ms_per_step" (over the timed steps, by process)}."""
    import gc

    import torch

    from paf_ray.models.multitask import build_model  # noqa: F401  (imported before the memory baseline)
    from paf_ray.train.step import OPENMP_WAIT_VARS

    torch.set_num_threads(int(spec["threads"]))
    on_cuda, repeats = spec["device"] == "cuda", int(spec["repeats"])
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    gc.collect()
    peak_reset, rss_base = _reset_peak(), _memory_mb("VmRSS")
    trainees, steps, out = {}, {}, {}
    for name, case in spec["cases"].items():
        model, stage, batch, device = build_case(case)
        trainees[name], steps[name] = make_step(model, stage, batch, device, bool(case["amp"]),
                                                int(spec["warmup"]) + 2 * repeats + 1)  # the lr schedule's length
        out[name] = {"batch": int(batch["image"].shape[0]), "compiled_parts": model.compiled_parts,
                     "params": sum(p.numel() for p in model.parameters()),
                     "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    names = list(steps)
    for i in range(int(spec["warmup"])):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if i == 0:
                out[name]["first_step_ms"] = 1000 * (time.perf_counter() - t0)  # torch.compile's compilation included
    # On CPU the hooks cost nothing, so the timed steps carry the breakdown; on CUDA every hook
    # synchronises: the breakdown gets steps of its own. No hooks on a compiled backbone (they would
    # run inside the compiled graph).
    broken_down = [n for n in names if spec.get("breakdown", True) and not spec["cases"][n].get("compile")]
    clocks = {} if on_cuda else {n: StepClock(trainees[n], sync) for n in broken_down}
    ms: dict[str, list] = {n: [] for n in names}
    own_cpu_ms: dict[str, list] = {n: [] for n in names}  # this process's CPU time a step
    parts: dict[str, list] = {n: [] for n in names}
    cpu_before = cpu_by_process()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            clock, c0 = clocks.get(name), time.process_time()
            t0, t_end = steps[name](clock.reset() if clock else None)
            sync()
            ms[name].append(1000 * (time.perf_counter() - t0))
            own_cpu_ms[name].append(1000 * (time.process_time() - c0))
            if clock is not None:
                parts[name].append(clock.breakdown_ms(t0, t_end))
    cpu = cpu_ms_per_step(cpu_before, cpu_by_process(), os.getpid(), sum(len(v) for v in ms.values()))
    for name in broken_down if on_cuda else []:
        clock = clocks[name] = StepClock(trainees[name], sync)
        parts[name] = [clock.breakdown_ms(*steps[name](clock.reset())) for _ in range(max(2, repeats // 2))]
    for clock in clocks.values():
        clock.remove()
    for name in names:
        out[name].update(ms=statistics.median(ms[name]), ms_all=ms[name], cpu_ms=statistics.median(own_cpu_ms[name]),
                         breakdown={k: statistics.median(p[k] for p in parts[name]) for k in parts[name][0]}
                         if parts[name] else None)
        if spec.get("flops"):
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                steps[name]()
            out[name]["flops_per_step"] = int(counter.get_total_flops())
    result: dict[str, Any] = {"cases": out, "threads": torch.get_num_threads(), "cpu_ms_per_step": cpu,
                              "openmp_wait": {v: os.environ.get(v) for v in OPENMP_WAIT_VARS}}
    if on_cuda:
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # peak_reset False: the peak may be the imports' rather than the case's
        peak = _memory_mb("VmHWM")
        result.update(peak_mb=peak - rss_base, peak_rss_mb=peak, base_rss_mb=rss_base, peak_reset=peak_reset)
    return result


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of every process on this machine (Linux /proc).
    The name is the command's first word, a Python daemon's script (Ray names its workers `ray::Class`)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = os.path.basename(words[0]) if words else stat[stat.index("(") + 1:stat.rindex(")")]
        if name.startswith("python") and len(words) > 1:
            name = os.path.basename(words[1]) if not words[1].startswith("-") else " ".join(words[1:3])
        out[pid] = (name.split(" ")[0], (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_ms_per_step(before: dict, after: dict, me: int, steps: int) -> dict[str, float]:
    """CPU ms per step between two `cpu_by_process` snapshots, by process name, largest first; this
    process is "self". Counted by pid: a Ray worker renames itself for each task it runs."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent = seconds - (before[pid][1] if pid in before else 0.0)
        if spent > 0:
            key = "self" if pid == me else name
            used[key] = used.get(key, 0.0) + 1000 * spent / max(1, steps)
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        result = measure(json.load(f))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
