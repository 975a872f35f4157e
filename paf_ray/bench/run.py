"""`paf-ray bench`: runs every case side by side and writes DIR/bench.json and DIR/bench.md.

Cases (docs/benchmarks.md says what each one is precisely):
1. data          Ray Data vs DataLoader, same row function + collate, same CPUs: time to first
                 batch, steady-state rows/s, rows/s delivered over a stage to a consumer that computes
   stream        the stage's stream of two epochs under a training-bound consumer: epoch starts,
                 and an object store of a quarter epoch vs a whole one (with and without the fix)
2. step          adapt vs finetune vs pretrain-finetune: ms/step, peak memory, breakdown
   compile       the finetune step with the dense part under torch.compile vs eager
3. ray_overhead  1-worker TorchTrainer vs a plain loop, same steps; start-up separately
   idle_share    that step alone and beside an idle-priority decoder, with OpenMP's default
                 waiting vs a training worker's: the share of the cores left to decoding
4. lv_overhead   the adapt step with and without the LV-Adapter
5. gpu           (--device cuda) images/s of the 3-task R50-FPN at full resolution, adapt and
                 finetune, peak memory, MFU, input-pipeline headroom, fp32-vs-bf16 box check;
                 bf16 autocast and channels_last in every case
Every number is a median over repeats after warm-up; ratios compare cases of one run.
`--cases step,compile,gpu` needs only torch, torchvision, numpy, PIL and PyYAML: Ray is
imported by the sections that use it (data, ray_overhead), open_clip by lv_overhead.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from paf_ray.bench.settings import BenchSettings, bench_settings

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, for the MFU estimate.
# The first entry whose words all occur in the device name wins, so specific names come first.
BF16_PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("h200",), 989.4),
    (("gh200",), 989.4),
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
    (("h100",), 989.4),  # SXM
    (("h800",), 989.4),
    (("b200",), 2250.0),
    (("a100",), 312.0),
    (("a800",), 312.0),
    (("l40s",), 362.05),
    (("l40",), 181.05),
    (("l4",), 121.0),
    (("a10g",), 70.0),
    (("a10",), 125.0),
    (("rtx", "4090"), 165.2),
    (("rtx", "3090"), 71.0),
    (("v100",), 125.0),  # fp16: V100 has no bf16
]


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    name = gpu_name.lower()
    for words, tflops in BF16_PEAK_TFLOPS:
        if all(w in name for w in words):
            return tflops
    return None


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import numpy
    import torch
    import torchvision

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "gpu_name": None,
        "gpu_count": 0,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cuda": torch.version.cuda,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    info["gpu_bf16_peak_tflops"] = bf16_peak_tflops(info["gpu_name"])
    return info


# --------------------------------------------------------------------------- cases


def case_config(model: dict, input_size, batch: int, adapter: str | None = None, lv: bool = False,
                amp: bool = False, channels_last: bool = False) -> dict:
    """A full config dict for one case: `model` overrides on the defaults, one adapt and one finetune stage."""
    from paf_ray.config import from_dict, to_dict

    model = copy.deepcopy(model)
    if adapter is not None:
        model.setdefault("adapter", {})["kind"] = adapter
    model.setdefault("lv_adapter", {})["enabled"] = lv
    if lv:  # the step's cost does not depend on CLIP's weights
        model["lv_adapter"]["random_init"] = True
    model.setdefault("backbone", {})["random_init"] = True  # step time does not depend on the weights
    data = {"input_size": list(input_size), "batch_size": batch}
    train = {
        "stages": [{"kind": "adapt", "lr": 1e-3}, {"kind": "finetune", "lr": 1e-4}],
        "amp": "bf16" if amp else "off",
        "channels_last": "on" if channels_last else "off",
    }
    return to_dict(from_dict({"data": data, "model": model, "train": train}, "<bench>"))


@dataclass
class Frames:
    """The folder where cases keep their files (specs, batches, results)."""

    workdir: str
    frame_size: tuple[int, int] = (1280, 720)


def collate_samples(rows: list[dict]) -> dict:
    """Transformed rows -> the training batch, as `pipeline.BatchCollate` builds it (NCHW view of
    NHWC images), without importing the pipeline (Ray)."""
    import numpy as np
    import torch

    def each(key, dtype):
        return [torch.from_numpy(np.asarray(r[key], dtype)) for r in rows]

    return {
        "image": torch.from_numpy(np.stack([r["image"] for r in rows])).permute(0, 3, 1, 2),
        "boxes": [b.reshape(-1, 4) for b in each("boxes", np.float32)],
        "labels": each("labels", np.int64),
        "ignore_boxes": [b.reshape(-1, 4) for b in each("ignore_boxes", np.float32)],
        "ignore_labels": each("ignore_labels", np.int64),
        "sem": torch.from_numpy(np.stack([r["sem"] for r in rows])),
        "drv": torch.from_numpy(np.stack([r["drv"] for r in rows])),
        **{f"has_{t}": torch.tensor([bool(r[f"has_{t}"]) for r in rows]) for t in ("det", "sem", "drv")},
        "name": [f"synth-{i}" for i in range(len(rows))],
        "scale": torch.tensor([float(r["scale"]) for r in rows]),
        "orig_size": torch.from_numpy(np.stack([r["orig_size"] for r in rows])),
    }


def batch_file(frames: Frames, input_size, batch: int) -> str:
    """A training batch at `input_size`, saved once for the measuring processes: synthetic frames
    rendered in memory at the frame size (`synth.render_samples`), the pipeline's val transform
    (letterbox), the pipeline's collate layout. Needs neither Ray nor dataset files."""
    import torch

    from paf_ray.data.synth import render_samples
    from paf_ray.data.transforms import val_transform

    path = os.path.join(frames.workdir, f"batch-{input_size[0]}x{input_size[1]}-b{batch}.pt")
    if not os.path.exists(path):
        rows = [val_transform(sample, input_size) for sample in render_samples(batch, frames.frame_size)]
        torch.save(collate_samples(rows), path)
    return path


def step_spec(s: BenchSettings, frames: Frames, stage: str, model: dict, input_size, batch: int,
              warmup: int, repeats: int, adapter: str | None = None, lv: bool = False, flops: bool = False) -> dict:
    return {
        "cfg": case_config(model, input_size, batch, adapter, lv, s.amp, s.channels_last),
        "stage": stage,
        "batch_path": batch_file(frames, input_size, batch),
        "batch": batch,
        "device": s.device,
        "amp": s.amp,
        "channels_last": s.channels_last,
        "warmup": warmup,
        "repeats": repeats,
        "threads": s.threads,
        "flops": flops,
    }


def run_case_process(spec: dict, workdir: str, name: str, timeout_s: int, openmp_wait: dict | None = None) -> dict:
    """Run one case in a fresh Python process (its own peak memory); returns its result dict.
    The process has a training worker's environment (`train_process_env`), or OpenMP's waiting
    set to exactly `openmp_wait` ({} = the library's default)."""
    os.makedirs(workdir, exist_ok=True)
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    out_path = os.path.join(workdir, f"{name}.result.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    cmd = [sys.executable, "-m", "paf_ray.bench.step_case", spec_path, out_path]
    from paf_ray.train.step import OPENMP_WAIT_VARS, train_process_env

    if openmp_wait is None:
        env = {**os.environ, **train_process_env()}
    else:
        env = {**{k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARS}, **openmp_wait}
    # the thread set-up of a training worker with that many CPUs (Ray sets OMP_NUM_THREADS to them)
    env["OMP_NUM_THREADS"] = str(spec.get("threads", 1))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bench case {name}: no result after {timeout_s} s ({' '.join(cmd)})") from None
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise RuntimeError(f"bench case {name} failed (exit {proc.returncode}, spec {spec_path}):\n" + "\n".join(tail))
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def bench_data(s: BenchSettings, records: list[dict]) -> dict:
    from paf_ray.bench.data_case import measure_input_pipeline

    return measure_input_pipeline(records, bench_data_config(s), s.data_workers, s.data_warmup, s.data_repeats,
                                  s.consumer_step_s, s.consumer_epochs, pin_memory=s.device == "cuda")


def bench_data_config(s: BenchSettings):
    from paf_ray.config import from_dict

    return from_dict({"data": {"input_size": list(s.data_input_size), "batch_size": s.data_batch}}, rules=False).data


def bench_stream(s: BenchSettings, records: list[dict]) -> dict:
    """The stage stream on fresh local Rays (object stores sized to the epoch); the bench's own
    Ray is started again afterwards for the sections that follow."""
    from paf_ray.bench.data_case import measure_stream
    from paf_ray.data.pipeline import row_bytes
    from paf_ray.train.ray_setup import init_ray

    data_cfg = bench_data_config(s)
    records = records[:s.stream_frames]
    epoch_mb = len(records) * row_bytes(data_cfg) / 2**20
    # Ray Data takes half the store for its rows: "whole" holds an epoch in that half.
    stores = {"whole": max(MIN_STORE_MB, int(2.5 * epoch_mb)), "quarter": max(MIN_STORE_MB, int(epoch_mb / 4))}
    _log(f"stream: {len(records)} frames an epoch ({epoch_mb:.0f} MB of rows), stores {stores} MB ...")
    try:
        return measure_stream(records, data_cfg, s.data_workers, s.stream_step_s, stores)
    finally:
        init_ray(num_cpus=os.cpu_count(), object_store_mb=BENCH_STORE_MB[s.device])


def bench_steps(s: BenchSettings, frames: Frames) -> dict:
    cases = {
        # adapt: the default bypass adapters, backbone frozen
        "adapt": step_spec(s, frames, "adapt", s.step_model, s.step_input_size, s.step_batch, s.step_warmup,
                           s.step_repeats, adapter="bypass"),
        # finetune after adapt: the same model (adapters kept), everything trains
        "finetune": step_spec(s, frames, "finetune", s.step_model, s.step_input_size, s.step_batch, s.step_warmup,
                              s.step_repeats, adapter="bypass"),
        # pretrain-finetune: no adapters at all, everything trains
        "pretrain_finetune": step_spec(s, frames, "finetune", s.step_model, s.step_input_size, s.step_batch,
                                       s.step_warmup, s.step_repeats, adapter="none"),
    }
    # Peak memory: one process per case (a warm-up step and one more: the optimizer state
    # exists from the first step on). Time: all three in one process, their steps interleaved.
    results = {}
    for name, spec in cases.items():
        _log(f"step: {name} memory ...")
        results[name] = run_case_process({**spec, "repeats": 1}, frames.workdir, f"step_{name}", s.case_timeout_s)
        _log(f"step: {name} peak {results[name]['peak_mb']:.0f} MB")
    _log("step: time, the three cases interleaved ...")
    timing = run_case_process({"entry": "interleaved", "cases": cases, "threads": s.threads, "device": s.device,
                               "warmup": s.step_warmup, "repeats": s.step_repeats},
                              frames.workdir, "step_timing", 3 * s.case_timeout_s)
    for name, t in timing.items():
        results[name].update(t)
        _log(f"step: {name} {t['ms']:.0f} ms/step")
    a, f, p = results["adapt"], results["finetune"], results["pretrain_finetune"]
    fb = f["breakdown"]
    f_parts = sum(fb.values())
    # What adapt could reach: finetune's step without the backbone's backward and its optimizer share.
    reachable = (fb["backbone_fwd_ms"] + fb["rest_fwd_ms"] + fb["rest_bwd_ms"]) / f_parts if f_parts else None
    return {
        "adapt_ms": a["ms"],
        "finetune_ms": f["ms"],
        "pretrain_finetune_ms": p["ms"],
        "adapt_peak_mb": a["peak_mb"],
        "finetune_peak_mb": f["peak_mb"],
        "pretrain_finetune_peak_mb": p["peak_mb"],
        "time_ratio": a["ms"] / f["ms"],
        "mem_ratio": a["peak_mb"] / f["peak_mb"],
        "reachable_time_ratio": reachable,
        "breakdown": {k: r["breakdown"] for k, r in results.items()},
        "trainable_params": {k: r["trainable_params"] for k, r in results.items()},
        "params": {k: r["params"] for k, r in results.items()},
        "peak_rss_mb": {k: r.get("peak_rss_mb") for k, r in results.items()},
        "base_rss_mb": {k: r.get("base_rss_mb") for k, r in results.items()},
        "ms_all": {k: r["ms_all"] for k, r in results.items()},
        "model": s.step_model["backbone"]["name"],
        "input_size": list(s.step_input_size),
        "batch": s.step_batch,
        "memory": "CUDA max_memory_allocated" if s.device == "cuda" else "peak RSS of the case's process minus its RSS before the model was built",
    }


def bench_ray_overhead(s: BenchSettings, frames: Frames) -> dict:
    import ray

    from paf_ray.bench.ray_case import ray_train_steps

    spec = step_spec(s, frames, "finetune", s.small_model, s.small_input_size, s.small_batch, s.small_warmup,
                     s.overhead_steps, adapter="bypass")
    deadline = time.time() + 60  # Ray Data's tasks from the data case may still be releasing their CPUs
    while (free_cpus := ray.available_resources().get("CPU", 0.0)) < s.threads and time.time() < deadline:
        time.sleep(1)
    if free_cpus < s.threads:
        raise RuntimeError(f"bench ray_overhead: the worker needs {s.threads} CPUs, Ray has {free_cpus:g} free")
    # plain, Ray, plain, Ray, ..., plain: every TorchTrainer run between two plain runs, whose mean
    # it is compared with, so the box's drift over the minutes of the case hits both sides alike
    def plain_run(i: int) -> dict:
        r = run_case_process({**spec, "entry": "timed_steps"}, frames.workdir, f"ray_overhead_plain_{i}",
                             s.case_timeout_s)
        _log(f"ray_overhead: plain {r['ms']:.0f} ms/step")
        return r

    plain_runs, ray_runs = [plain_run(1)], []
    for i in range(s.overhead_rounds):
        r = ray_train_steps(spec, os.path.join(frames.workdir, "ray_train"),
                            f"bench-overhead-{os.getpid()}-{int(time.time())}-{i}")
        _log(f"ray_overhead: TorchTrainer {r['ms']:.0f} ms/step, start-up {r['startup_s']:.1f} s")
        ray_runs.append(r)
        plain_runs.append(plain_run(i + 2))
    ratios = [r["ms"] / ((plain_runs[i]["ms"] + plain_runs[i + 1]["ms"]) / 2) for i, r in enumerate(ray_runs)]
    plain_cpu = _mean_dicts([r["cpu_ms_per_step"] for r in plain_runs])
    ray_cpu = _mean_dicts([r["cpu_ms_per_step"] for r in ray_runs])
    return {
        "plain_ms": statistics.median(r["ms"] for r in plain_runs),
        "ray_ms": statistics.median(r["ms"] for r in ray_runs),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "startup_s": statistics.median(r["startup_s"] for r in ray_runs),
        "fit_s": [r["fit_s"] for r in ray_runs],
        "plain_ms_all": [r["ms_all"] for r in plain_runs],
        "ray_ms_all": [r["ms_all"] for r in ray_runs],
        "threads": {"plain": plain_runs[0]["threads"], "ray": ray_runs[0]["threads"]},
        "openmp_wait": {"plain": plain_runs[0]["openmp_wait"], "ray": ray_runs[0]["openmp_wait"]},
        "ray_worker_omp_num_threads": ray_runs[0].get("omp_num_threads"),
        # CPU ms per timed step, by process: where the difference goes (docs/benchmarks.md)
        "cpu_ms_per_step": {"plain": plain_cpu, "ray": ray_cpu},
        "others_cpu_ms_per_step": {"plain": sum(v for k, v in plain_cpu.items() if k != "self"),
                                   "ray": sum(v for k, v in ray_cpu.items() if k != "self")},
        "steps": s.overhead_steps,
        "rounds": s.overhead_rounds,
        "model": s.small_model["backbone"]["name"],
        "input_size": list(s.small_input_size),
        "batch": s.small_batch,
    }


def bench_idle_share(s: BenchSettings, frames: Frames, records: list[dict]) -> dict:
    """The Ray Train overhead case's step alone and beside an idle-priority decoder (share_case.py),
    with OpenMP's default waiting and with a training worker's; processes in the order A B B A."""
    from paf_ray.config import to_dict
    from paf_ray.train.step import TRAIN_PROCESS_ENV

    spec = step_spec(s, frames, "finetune", s.small_model, s.small_input_size, s.small_batch, s.small_warmup,
                     s.small_repeats, adapter="bypass")
    spec.update(entry="beside_decoder", decoder_records=records[:64], decoder_data=to_dict(bench_data_config(s)))
    variants = {"openmp_default": {}, "train_worker": dict(TRAIN_PROCESS_ENV)}
    order = ["openmp_default", "train_worker"] + ([] if s.quick else ["train_worker", "openmp_default"])
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i, name in enumerate(order):
        _log(f"idle_share: {name} ({i + 1}/{len(order)}) ...")
        r = run_case_process(spec, frames.workdir, f"idle_share_{i}_{name}", s.case_timeout_s, openmp_wait=variants[name])
        _log(f"idle_share: {name}: step {r['alone_ms']:.0f} ms alone, {r['beside_ms']:.0f} ms beside the decoder, "
             f"which made {r['decoder_rows_s']:.2f} rows/s")
        runs[name].append(r)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {key: statistics.mean(r[key] for r in rs) for key in ("alone_ms", "beside_ms", "decoder_rows_s")}
        out[name]["openmp_wait"] = rs[0]["openmp_wait"]
        out[name]["runs"] = rs
    base, worker = out["openmp_default"], out["train_worker"]
    out.update(
        decoder_share_ratio=worker["decoder_rows_s"] / base["decoder_rows_s"] if base["decoder_rows_s"] else None,
        alone_ratio=worker["alone_ms"] / base["alone_ms"],
        beside_ratio=worker["beside_ms"] / base["beside_ms"],
        threads=runs["openmp_default"][0]["threads"],
        model=s.small_model["backbone"]["name"],
        input_size=list(s.small_input_size),
        batch=s.small_batch,
        steps=s.small_repeats,
        decoder_input_size=list(s.data_input_size),
    )
    return out


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d}
    return dict(sorted(((k, sum(d.get(k, 0.0) for d in dicts) / len(dicts)) for k in keys), key=lambda kv: -kv[1]))


def bench_lv_overhead(s: BenchSettings, frames: Frames) -> dict:
    out = {}
    for name, lv in (("without", False), ("with", True)):
        spec = step_spec(s, frames, "adapt", s.small_model, s.small_input_size, s.small_batch, s.small_warmup,
                         s.small_repeats, adapter="bypass", lv=lv)
        _log(f"lv_overhead: {name} LV-Adapter ...")
        out[name] = run_case_process(spec, frames.workdir, f"lv_{name}", s.case_timeout_s)
    return {
        "ratio": out["with"]["ms"] / out["without"]["ms"],
        "with_ms": out["with"]["ms"],
        "without_ms": out["without"]["ms"],
        "with_peak_mb": out["with"]["peak_mb"],
        "without_peak_mb": out["without"]["peak_mb"],
        "stage": "adapt",
        "model": s.small_model["backbone"]["name"],
        "input_size": list(s.small_input_size),
        "batch": s.small_batch,
    }


def bench_compile(s: BenchSettings, frames: Frames) -> dict:
    """The finetune step with the dense part (backbone, adapters, FPN, seg heads) under torch.compile
    vs eager, the two interleaved in one process; compilation happens in the first warm-up step."""
    base = step_spec(s, frames, "finetune", s.small_model, s.small_input_size, s.small_batch, s.small_warmup,
                     s.small_repeats, adapter="bypass")
    _log("compile: eager vs torch.compile of the dense part, interleaved ...")
    r = run_case_process({"entry": "interleaved", "cases": {"eager": base, "compiled": {**base, "compile": True}},
                          "threads": s.threads, "device": s.device, "warmup": s.small_warmup + 1,
                          "repeats": s.small_repeats}, frames.workdir, "compile", 3 * s.case_timeout_s)
    eager, compiled = r["eager"], r["compiled"]
    _log(f"compile: eager {eager['ms']:.0f} ms/step, compiled {compiled['ms']:.0f} ms/step")
    return {
        "eager_ms": eager["ms"],
        "compiled_ms": compiled["ms"],
        "speedup": eager["ms"] / compiled["ms"],
        # the first step of each: compiling (forward and backward graphs) is the difference
        "compile_s": (compiled["first_step_ms"] - eager["first_step_ms"]) / 1000,
        "eager_ms_all": eager["ms_all"],
        "compiled_ms_all": compiled["ms_all"],
        "compiled_parts": ["backbone", "adapters", "neck", "sem_head", "drv_head"],
        "stage": "finetune",
        "model": s.small_model["backbone"]["name"],
        "input_size": list(s.small_input_size),
        "batch": s.small_batch,
    }


def bench_gpu(s: BenchSettings, frames: Frames, data: dict, machine: dict) -> dict:
    """Adapt and finetune at full resolution, each in its own process: images/s, peak memory,
    FLOPs per step, MFU; pipeline headroom; then the fp32-vs-bf16 box check on the device."""
    peak = machine.get("gpu_bf16_peak_tflops") if s.device == "cuda" else None
    runs = {}
    for stage in ("finetune", "adapt"):
        spec = step_spec(s, frames, stage, s.gpu_model, s.gpu_input_size, s.gpu_batch, s.step_warmup,
                         s.step_repeats, adapter="bypass", flops=True)
        _log(f"gpu: {stage} throughput ...")
        r = run_case_process(spec, frames.workdir, f"gpu_{stage}", s.case_timeout_s)
        r["img_s"] = r["batch"] / (r["ms"] / 1000)
        r["achieved_tflops"] = r["flops_per_step"] / (r["ms"] / 1000) / 1e12
        runs[stage] = r
        _log(f"gpu: {stage} {r['img_s']:.1f} img/s, peak {r['peak_mb']:.0f} MB")
    _log("gpu: fp32 vs bf16 box check ...")
    box = run_case_process({"entry": "box_check", "device": s.device, "image_size": list(s.gpu_input_size),
                            "batch": 2, "threads": s.threads}, frames.workdir, "gpu_box_check", s.case_timeout_s)
    f, a = runs["finetune"], runs["adapt"]
    same_size = list(data.get("input_size", [])) == list(s.gpu_input_size)
    return {
        "ran_on": s.device,
        "gpu_name": machine.get("gpu_name") if s.device == "cuda" else None,
        "amp": "bf16" if s.amp else "off",
        "channels_last": s.channels_last,
        "model": s.gpu_model["backbone"]["name"],
        "tasks": ["det", "sem", "drv"],
        "input_size": list(s.gpu_input_size),
        "batch": f["batch"],
        "step_ms": f["ms"],
        "train_img_s": f["img_s"],
        "peak_mb": f["peak_mb"],
        "flops_per_step": f["flops_per_step"],
        "achieved_tflops": f["achieved_tflops"],
        "bf16_peak_tflops": peak,
        "mfu": f["achieved_tflops"] / peak if peak else None,
        "adapt_step_ms": a["ms"],
        "adapt_img_s": a["img_s"],
        "adapt_peak_mb": a["peak_mb"],
        "adapt_flops_per_step": a["flops_per_step"],
        "adapt_mfu": a["achieved_tflops"] / peak if peak else None,
        "adapt_over_finetune_img_s": a["img_s"] / f["img_s"],
        "adapt_over_finetune_peak": a["peak_mb"] / f["peak_mb"],
        "pipeline_img_s": data.get("ray_data_rows_s"),
        "pipeline_headroom": data["ray_data_rows_s"] / f["img_s"] if same_size and "ray_data_rows_s" in data else None,
        "box_check": box,
        "breakdown": {"finetune": f["breakdown"], "adapt": a["breakdown"]},
    }


# --------------------------------------------------------------------------- driver


def write_synth_frames(root: str, s: BenchSettings) -> list[dict]:
    """Synthetic BDD100K at 1280x720 under `root` (reused when already there); its train records.
    Imports Ray's side of the pipeline (the index loading): the data, stream and idle_share cases use them."""

    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import load_records
    from paf_ray.data.synth import write_synthetic

    write_synthetic(root, images=s.frames, seed=0, size=s.frame_size, val_fraction=0.02)
    data_cfg = from_dict({}, rules=False).data
    return load_records(data_cfg, root, "train")


SECTIONS = ("data", "stream", "step", "compile", "ray_overhead", "idle_share", "lv_overhead", "gpu")
RAY_SECTIONS = ("data", "stream", "ray_overhead")  # the sections that start a local Ray
BENCH_STORE_MB = {"cpu": 512, "cuda": 4096}
MIN_STORE_MB = 80  # Ray refuses an object store under 75 MB


def write_results(out: str, result: dict) -> None:
    """bench.json and bench.md; written after every case, so a run cut short keeps what it measured."""
    from paf_ray.bench.report import bench_markdown

    for name, text in (("bench.json", json.dumps(result, indent=1)), ("bench.md", bench_markdown(result))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def run_bench(out: str, quick: bool = False, device: str = "cpu", cases: list[str] | None = None) -> dict:
    """Run the sections in `cases` (default: all in SECTIONS order, on CPU all but compile); write `out`/bench.json and
    `out`/bench.md; return the bench dict.

    A case that fails is recorded as {"error": ...} and the others still run; the result's
    "failed" lists them (the command then exits 1). Ray starts only for the sections that use it.
    """
    import torch

    # On CPU inductor's C++ build of the compile case alone takes longer than every other case
    # together (docs/benchmarks.md): there it runs when asked for by name.
    # idle_share is about CPUs that training and decoding share: a GPU run leaves it out unless named.
    sections = list(cases) if cases else [c for c in SECTIONS if not (c == "compile" and device == "cpu")
                                          and not (c == "idle_share" and device == "cuda")]
    unknown = [c for c in sections if c not in SECTIONS]
    if unknown:
        raise ValueError(f"bench --cases: unknown {unknown} (known: {', '.join(SECTIONS)})")
    s = bench_settings(device, quick)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench --device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    workdir = os.path.join(out, "cases")  # specs, batches and results of each case, for a look afterwards
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(device), "settings": _settings_dict(s), "complete": False,
                              "failed": [], "cases": sections}
    if any(c in RAY_SECTIONS for c in sections):
        from paf_ray.train.ray_setup import init_ray

        init_ray(num_cpus=os.cpu_count(), object_store_mb=BENCH_STORE_MB["cpu" if quick else device])
    frames = Frames(workdir, s.frame_size)
    written: list = []

    def frame_records() -> list[dict]:
        if not written:
            frames_root = os.path.join(out, f"synth-{s.frames}-{s.frame_size[0]}x{s.frame_size[1]}")
            written.append(write_synth_frames(frames_root, s))
            _log(f"{len(written[0])} training frames at {s.frame_size[0]}x{s.frame_size[1]} in {frames_root}")
        return written[0]

    runners = {
        "data": lambda: bench_data(s, frame_records()),
        "stream": lambda: bench_stream(s, frame_records()),
        "step": lambda: bench_steps(s, frames),
        "compile": lambda: bench_compile(s, frames),
        "ray_overhead": lambda: bench_ray_overhead(s, frames),
        "idle_share": lambda: bench_idle_share(s, frames, frame_records()),
        "lv_overhead": lambda: bench_lv_overhead(s, frames),
        "gpu": lambda: bench_gpu(s, frames, result.get("data") or {}, result["machine"]),
    }
    if device == "cpu" and not quick:
        runners["gpu"] = lambda: {"ran_on": None, "why": "CPU run: `paf-ray bench --device cuda` (scripts/gpu_bench.sh) fills this"}
    for name in sections:
        t0 = time.perf_counter()
        try:
            result[name] = runners[name]()
        except Exception as e:  # keep the other cases' numbers; the command exits 1
            _log(f"{name}: FAILED: {type(e).__name__}: {e}")
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            result["failed"].append(name)
        result[name]["case_s"] = time.perf_counter() - t0
        result["wall_s"] = time.perf_counter() - t_start
        write_results(out, result)
    result["complete"] = not result["failed"]
    write_results(out, result)
    return result


def _settings_dict(s: BenchSettings) -> dict:
    from dataclasses import asdict

    d = asdict(s)
    for key in ("step_model", "small_model", "gpu_model"):
        d[key] = d[key].get("backbone", {}).get("name")
    return d


def bench_command(args) -> int:
    if getattr(args, "config", None):
        from paf_ray.bench.step_time import step_time_command

        return step_time_command(args)
    if getattr(args, "compare", None) or getattr(args, "overrides", None):
        raise ValueError("bench --compare / --set: they change a config, so they need --config CONFIG")
    out = os.path.abspath(args.out)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    result = run_bench(out, quick=args.quick, device=args.device, cases=cases)
    with open(os.path.join(out, "bench.md"), encoding="utf-8") as f:
        print(f.read())
    _log(f"wrote {os.path.join(out, 'bench.json')} in {result['wall_s']:.0f} s")
    if result["failed"]:
        _log(f"cases that failed: {', '.join(result['failed'])} (their error is in bench.json)")
        return 1
    return 0
