"""One training step, timed: ms/step, its breakdown, peak memory and (optionally) FLOPs.

Each case runs in a fresh process (``python -m paf_ray.bench.step_case SPEC OUT``), so
peak memory belongs to that case alone: on CUDA ``torch.cuda.max_memory_allocated``; on
CPU the process's peak RSS (``ru_maxrss``) minus its RSS once the libraries are
imported and the batch is built, i.e. what the model, its gradients, the optimizer state
and the step's activations added.

The step is the training loop's step, ``paf_ray.train.step.train_step`` (autocast forward,
total loss, backward, clip, optimizer and scheduler step, zero_grad). Batches are built
before timing (the data pipeline is measured in its own case).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any


def _iter_tensors(obj: Any):
    import torch

    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v)


class StepClock:
    """Timestamps of one step's phases, taken from hooks on the model and the optimizer.

    The forward ends when the model returns its losses (a hook on the model); the backward ends
    when every trainable parameter has its gradient (a multi-grad hook); the optimizer part
    (clip, step, zero_grad) ends with the step. The backbone's
    forward is bracketed by a pre-hook and a hook. Its backward starts when the gradient of
    its last output arrives (a tensor hook on every output that requires grad); a frozen
    backbone whose outputs need no gradient has no backward. On CUDA every timestamp
    synchronises first, so only use it in a breakdown pass.
    """

    def __init__(self, trainee, sync):
        import torch

        self.sync = sync
        backbone = trainee.net.backbone
        self.handles = [backbone.register_forward_pre_hook(self._pre), backbone.register_forward_hook(self._post),
                        trainee.model.register_forward_hook(self._forward_done),
                        torch.autograd.graph.register_multi_grad_hook(trainee.trainable, self._backward_done)]
        self.reset()

    def reset(self) -> None:
        self.bb_start = self.bb_end = None
        self.last_grad_at_backbone = None
        self.forward_done = self.backward_done = None

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _pre(self, module, inputs):
        self.bb_start = self.now()

    def _post(self, module, inputs, output):
        self.bb_end = self.now()
        for t in _iter_tensors(output):
            if t.requires_grad:
                t.register_hook(self._grad_arrived)

    def _grad_arrived(self, grad):
        self.last_grad_at_backbone = self.now()

    def _forward_done(self, module, inputs, output):
        self.forward_done = self.now()

    def _backward_done(self, grads):
        self.backward_done = self.now()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rss_mb() -> float:
    """This process's resident set size (Linux /proc; no psutil on the GPU bench's path)."""
    import resource

    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: clear_refs 5), so that the imports' transient
    peak does not hide the case's own. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_batch(path: str) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def build_case(spec: dict):
    """(cfg, model, stage, batch, device) for a spec; see `measure_step`."""
    import torch

    from paf_ray.config import from_dict
    from paf_ray.models import build_model
    from paf_ray.models.stages import apply_stage

    cfg = from_dict(spec["cfg"], "<bench case>")
    stage = next((s for s in cfg.train.stages if s.kind == spec["stage"]), None)
    if stage is None:
        raise ValueError(f"bench case: the config has no {spec['stage']!r} stage")
    device = torch.device(spec["device"])
    batch = load_batch(spec["batch_path"])
    torch.manual_seed(0)
    model = build_model(cfg.model, input_size=cfg.data.input_size)
    apply_stage(model, stage.kind, cfg)
    model.to(device)
    if spec.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.train()
    if spec.get("compile"):
        model.compile_dense()
    return cfg, model, stage, _to_device(batch, device), device


def _to_device(batch: dict, device) -> dict:
    import torch

    if device.type == "cpu":
        return batch
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device)
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            out[k] = [x.to(device) for x in v]
        else:
            out[k] = v
    return out


def make_step(model, stage, batch, device, amp: bool, total_updates: int):
    """The training loop's step (`train_step`) on `batch`, as a closure returning the time it
    started and ended; (trainee, step). Every call is one optimizer update."""
    from dataclasses import replace

    from paf_ray.train.step import StepCounter, make_trainee, train_step

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("bench case: the stage policy left nothing trainable")
    trainee = make_trainee(model, model, replace(stage, accum_steps=1), device, amp=amp,
                           total_updates=total_updates, name="bench")
    counter = StepCounter()

    def step(clock: StepClock | None = None) -> dict:
        now = clock.now if clock is not None else time.perf_counter
        t0 = now()
        outcome = train_step(trainee, batch, counter)
        t_end = now()
        if not outcome.updated:
            raise RuntimeError(f"bench case: the training step was skipped ({outcome.skipped})")
        return {"t0": t0, "t_end": t_end}

    return trainee, step


def breakdown_ms(times: dict, clock: StepClock) -> dict:
    """Split one step into backbone forward/backward, the rest forward/backward, optimizer."""
    t_fwd, t_bwd = clock.forward_done, clock.backward_done
    fwd = t_fwd - times["t0"]
    bwd = t_bwd - t_fwd
    bb_fwd = (clock.bb_end - clock.bb_start) if clock.bb_start is not None and clock.bb_end is not None else 0.0
    if clock.last_grad_at_backbone is not None:
        rest_bwd = clock.last_grad_at_backbone - t_fwd
        bb_bwd = t_bwd - clock.last_grad_at_backbone
    else:
        rest_bwd, bb_bwd = bwd, 0.0
    return {
        "backbone_fwd_ms": 1000 * bb_fwd,
        "backbone_bwd_ms": 1000 * bb_bwd,
        "rest_fwd_ms": 1000 * (fwd - bb_fwd),
        "rest_bwd_ms": 1000 * rest_bwd,
        "optimizer_ms": 1000 * (times["t_end"] - t_bwd),
    }


def _median_dict(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _updates(spec: dict) -> int:
    """The updates a case runs (the lr schedule's length), FLOP count included."""
    return int(spec["warmup"]) + 2 * int(spec["repeats"]) + 1


def timed_steps(spec: dict) -> dict:
    """Median ms/step of `spec` in the calling process, no hooks (the Ray Train overhead case
    runs this in a plain process and in a Ray Train worker)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    on_cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    _, model, stage, batch, device = build_case(spec)
    _, step = make_step(model, stage, batch, device, bool(spec["amp"]), _updates(spec))
    for _ in range(int(spec["warmup"])):
        step()
    sync()
    cpu_before = cpu_by_process()
    times = _timed_steps(step, int(spec["repeats"]), sync)
    cpu = cpu_ms_per_step(cpu_before, cpu_by_process(), os.getpid(), len(times))
    return {"ms": statistics.median(times), "ms_all": times, "threads": torch.get_num_threads(), "cpu_ms_per_step": cpu,
            "openmp_wait": _openmp_wait()}


def _timed_steps(step, repeats: int, sync=lambda: None) -> list[float]:
    """ms of each of `repeats` calls of `step`, each synchronised (`sync`) before its clock stops."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return times


def _openmp_wait() -> dict:
    """How this process's OpenMP threads wait (train.step.OPENMP_WAIT_VARS; None = unset)."""
    from paf_ray.train.step import OPENMP_WAIT_VARS

    return {name: os.environ.get(name) for name in OPENMP_WAIT_VARS}


def steps_beside_decoder(spec: dict) -> dict:
    """The idle_share case (share_case.py): spec is a step case (``build_case``) plus
    "decoder_records" and "decoder_data" (the ``data`` section of a config). The step timed
    alone, then beside the decoder (started first and timed from its first row on, so its
    start-up is not counted)."""
    import multiprocessing as mp

    import torch

    from paf_ray.bench.share_case import decode_until_stopped
    from paf_ray.config import from_dict

    torch.set_num_threads(int(spec["threads"]))
    _, model, stage, batch, device = build_case(spec)
    _, step = make_step(model, stage, batch, device, bool(spec["amp"]), _updates(spec))
    for _ in range(int(spec["warmup"])):
        step()
    repeats = int(spec["repeats"])
    alone = _timed_steps(step, repeats)

    data_cfg = from_dict({"data": spec["decoder_data"]}, "<bench idle_share>", rules=False).data
    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's torch threads
    stop, rows = ctx.Event(), ctx.Value("l", 0)
    decoder = ctx.Process(target=decode_until_stopped, args=(spec["decoder_records"], data_cfg, stop, rows),
                          daemon=True)
    decoder.start()
    try:
        deadline = time.time() + 120
        while rows.value == 0:
            if not decoder.is_alive() or time.time() > deadline:
                raise RuntimeError(f"bench idle_share: the decoder made no row (exit code {decoder.exitcode})")
            time.sleep(0.05)
        rows_before, t0 = rows.value, time.perf_counter()
        beside = _timed_steps(step, repeats)
        rows_s = (rows.value - rows_before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        decoder.join(timeout=60)
        if decoder.is_alive():
            decoder.kill()
    return {"alone_ms": statistics.median(alone), "beside_ms": statistics.median(beside), "decoder_rows_s": rows_s,
            "alone_ms_all": alone, "beside_ms_all": beside, "threads": torch.get_num_threads(),
            "openmp_wait": _openmp_wait()}


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of every process on this machine (Linux /proc; {} elsewhere).
    The name is the first word of the command line (Ray names its workers ``ray::Class``)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        words = [a.decode(errors="replace") for a in argv if a]
        name = os.path.basename(words[0]) if words else stat[stat.index("(") + 1:stat.rindex(")")]
        if name.startswith("python") and len(words) > 1:  # a Python daemon: name it by its script
            name = os.path.basename(words[1]) if not words[1].startswith("-") else " ".join(words[1:3])
        out[pid] = (name.split(" ")[0], (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_ms_per_step(before: dict, after: dict, me: int, steps: int) -> dict[str, float]:
    """CPU milliseconds per step between two `cpu_by_process` snapshots, by process name; this
    process is "self" (its torch threads), the rest summed under their names as they end (a Ray
    worker renames itself for each task it runs; its earlier CPU time is not counted again)."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent = seconds - (before[pid][1] if pid in before else 0.0)
        if spent > 0:
            key = "self" if pid == me else name
            used[key] = used.get(key, 0.0) + 1000 * spent / max(1, steps)
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def measure_step(spec: dict) -> dict:
    """Time `spec`'s step in this process. Keys of spec: cfg (config dict), stage ("adapt" or
    "finetune"), batch_path (a torch.save'd batch), device, amp, channels_last,
    warmup, repeats, threads, flops (count FLOPs of one step)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    on_cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    from paf_ray.models import build_model  # noqa: F401  (imported before the memory baseline)

    t_start = time.perf_counter()
    import gc

    gc.collect()
    rss_base = _rss_mb()
    peak_reset = _reset_peak_rss()
    cfg, model, stage, batch, device = build_case(spec)
    build_s = time.perf_counter() - t_start
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainee, step = make_step(model, stage, batch, device, bool(spec["amp"]), _updates(spec))
    for _ in range(int(spec["warmup"])):
        step()
    sync()

    step_ms, parts = [], []
    clock = StepClock(trainee, sync) if not on_cuda else None
    # On CPU the hooks cost nothing, so the timed steps carry the breakdown too. On CUDA
    # the breakdown's synchronisations would slow the step: it gets its own pass.
    for _ in range(int(spec["repeats"])):
        if clock is not None:
            clock.reset()
        times = step(clock)
        sync()
        step_ms.append(1000 * (time.perf_counter() - times["t0"]))
        if clock is not None:
            parts.append(breakdown_ms(times, clock))
    if on_cuda:
        clock = StepClock(trainee, sync)
        for _ in range(max(2, int(spec["repeats"]) // 2)):
            clock.reset()
            parts.append(breakdown_ms(step(clock), clock))
    clock.remove()

    out: dict[str, Any] = {
        "ms": statistics.median(step_ms),
        "ms_all": step_ms,
        "breakdown": _median_dict(parts),
        "batch": int(batch["image"].shape[0]),
        "input_size": list(cfg.data.input_size),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "threads": torch.get_num_threads(),
    }
    if on_cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = _peak_rss_mb()
        out["base_rss_mb"] = rss_base
        out["peak_mb"] = out["peak_rss_mb"] - rss_base
        out["peak_reset"] = peak_reset  # False: the peak may be the imports' rather than the case's
    if spec.get("flops"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        sync()
        out["flops_per_step"] = int(counter.get_total_flops())
    return out


def measure_interleaved(spec: dict) -> dict:
    """Time several cases' steps in one process, one step of each case in turn, so that a
    load change on a shared machine hits every case alike. spec: {"cases": {name: case spec},
    "threads", "device", "warmup", "repeats"}; returns {name: {"ms", "ms_all", "breakdown"}}.
    Peak memory needs a process per case: `measure_step` gives it."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    on_cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    steps, clocks, first_ms = {}, {}, {}
    for name, case in spec["cases"].items():
        _, model, stage, batch, device = build_case(case)
        trainee, steps[name] = make_step(model, stage, batch, device, bool(case["amp"]), _updates(spec))
        # no hooks on a compiled backbone: they would run inside the compiled graph
        clocks[name] = None if case.get("compile") else StepClock(trainee, sync)
    names = list(steps)
    for i in range(int(spec["warmup"])):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if i == 0:
                first_ms[name] = 1000 * (time.perf_counter() - t0)  # includes torch.compile's compilation
    sync()
    ms = {n: [] for n in names}
    parts = {n: [] for n in names}
    for r in range(int(spec["repeats"])):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            clock = clocks[name]
            if clock is not None:
                clock.reset()
            # the hooks cost nothing on CPU; on CUDA they synchronise, so the headline goes without
            times = steps[name](None if on_cuda else clock)
            sync()
            ms[name].append(1000 * (time.perf_counter() - times["t0"]))
            if not on_cuda and clock is not None:
                parts[name].append(breakdown_ms(times, clock))
    if on_cuda:
        for _ in range(max(2, int(spec["repeats"]) // 2)):
            for name in names:
                if clocks[name] is not None:
                    clocks[name].reset()
                    parts[name].append(breakdown_ms(steps[name](clocks[name]), clocks[name]))
    return {n: {"ms": statistics.median(ms[n]), "ms_all": ms[n], "first_step_ms": first_ms.get(n),
                "breakdown": _median_dict(parts[n]) if parts[n] else None} for n in names}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m paf_ray.bench.step_case SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec_path, out_path = argv
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("entry") == "timed_steps":  # the plain loop of the Ray Train overhead case
        result = timed_steps(spec)
    elif spec.get("entry") == "beside_decoder":
        result = steps_beside_decoder(spec)
    elif spec.get("entry") == "interleaved":
        result = measure_interleaved(spec)
    elif spec.get("entry") == "box_check":
        import torch

        from paf_ray.bench.box_check import box_check

        torch.set_num_threads(int(spec["threads"]))
        result = box_check(spec["device"], image_size=tuple(spec["image_size"]), batch=int(spec["batch"]))
    else:
        result = measure_step(spec)
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
