"""`paf-ray bench`: the cases side by side; writes DIR/bench.json and DIR/bench.md.

data          Ray Data against a DataLoader on the same rows and CPUs (data_case.py)
step          adapt vs finetune vs pretrain-finetune: ms/step, peak memory, breakdown
compile       the finetune step with its dense part under torch.compile vs eager
ray_overhead  the same steps in a 1-worker TorchTrainer vs a plain loop
lv_overhead   the adapt step without, with the LV-Adapter, and with its prompts frozen
gpu           (--device cuda) images/s of the 3-task R50-FPN at 1280x736, adapt and finetune, MFU

docs/benchmarks.md says what each measures. `step`, `compile` and `gpu` import no Ray (step_case.py).
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
import tempfile
import time
from typing import Any

from paf_ray.bench.settings import BenchSettings, bench_settings

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, for the MFU estimate.
# The first entry whose words all occur in the device name wins, so specific names come first.
BF16_PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("h200",), 989.4), (("gh200",), 989.4), (("h100", "pcie"), 756.0), (("h100", "nvl"), 835.0),
    (("h100",), 989.4), (("h800",), 989.4), (("b200",), 2250.0), (("a100",), 312.0), (("a800",), 312.0),
    (("l40s",), 362.05), (("l40",), 181.05), (("l4",), 121.0), (("a10g",), 70.0), (("a10",), 125.0),
    (("rtx", "4090"), 165.2), (("rtx", "3090"), 71.0), (("v100",), 125.0),  # V100: fp16, it has no bf16
]
SECTIONS = ("data", "step", "compile", "ray_overhead", "lv_overhead", "gpu")


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    name = (gpu_name or "").lower()
    return next((tflops for words, tflops in BF16_PEAK_TFLOPS if name and all(w in name for w in words)), None)


def machine_info(device: str) -> dict:
    import torch
    import torchvision

    try:
        import ray
    except ImportError:
        ray = None
    with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "gpu_name": gpu, "gpu_bf16_peak_tflops":
            bf16_peak_tflops(gpu), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "ray": ray and ray.__version__, "python": platform.python_version(),
            "device": device, "load_avg_at_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# --------------------------------------------------------------------------- step cases


def case_spec(s: BenchSettings, workdir: str, stage: str, size: str, adapter: str = "bypass", lv: bool = False,
              **extra) -> dict:
    """A step case at the `size` settings ("step", "small" or "gpu"): a config with one adapt and one
    finetune stage, random weights (a step's cost does not depend on them); its batch saved in `workdir`."""
    import torch

    from paf_ray.bench.step_case import synthetic_batch
    from paf_ray.config import from_dict, to_dict

    model, input_size, batch = (getattr(s, f"{size}_{k}") for k in ("model", "input_size", "batch"))
    model = {**copy.deepcopy(model), "adapter": {"kind": adapter}, "lv_adapter": {"enabled": lv, "random_init": True}}
    model["backbone"]["random_init"] = True
    train = {"stages": [{"kind": "adapt", "lr": 1e-3}, {"kind": "finetune", "lr": 1e-4}],
             "amp": "bf16" if s.amp else "off", "channels_last": "on" if s.channels_last else "off"}
    cfg = from_dict({"data": {"input_size": list(input_size), "batch_size": batch}, "model": model, "train": train})
    path = os.path.join(workdir, f"batch-{input_size[0]}x{input_size[1]}-b{batch}-{'-'.join(cfg.model.tasks)}.pt")
    if not os.path.exists(path):
        torch.save(synthetic_batch(input_size, batch, cfg.model.tasks), path)
    return {"cfg": to_dict(cfg), "stage": stage, "batch_path": path, "device": s.device, "amp": s.amp,
            "channels_last": s.channels_last, **extra}


def process_spec(s: BenchSettings, size: str, cases: dict, **extra) -> dict:
    """What one measuring process runs (`step_case.measure`): `cases`, interleaved."""
    warmup, repeats = (s.small_warmup, s.small_repeats) if size == "small" else (s.step_warmup, s.step_repeats)
    return {"cases": cases, "device": s.device, "threads": s.threads, "warmup": warmup, "repeats": repeats, **extra}


def run_case_process(spec: dict, workdir: str, name: str, timeout_s: int) -> dict:
    """`step_case.measure(spec)` in a fresh Python process (its own peak memory) with a training
    worker's environment: OpenMP's waiting (`train_process_env`), OMP_NUM_THREADS = its threads."""
    from paf_ray.train.step import train_process_env

    spec_path, out_path = (os.path.join(workdir, f"{name}.{kind}.json") for kind in ("spec", "result"))
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "paf_ray.bench.step_case", spec_path, out_path]
    env = {**os.environ, **train_process_env(), "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bench case {name}: no result after {timeout_s} s ({' '.join(cmd)})") from None
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise RuntimeError(f"bench case {name} failed (exit {proc.returncode}, spec {spec_path}):\n" + "\n".join(tail))
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)


def _alone(r: dict, name: str) -> dict:  # a process's result for case `name`, with its peak_mb, cpu_ms_per_step, ...
    return {**{k: v for k, v in r.items() if k != "cases"}, **r["cases"][name]}


def side_by_side(s: BenchSettings, workdir: str, section: str, size: str, cases: dict[str, dict]) -> dict[str, dict]:
    """Peak memory of each case in a process of its own (a warm-up step and one more: the optimizer
    state exists from the first step on); time of all of them in one process, their steps interleaved."""
    results = {}
    for name, case in cases.items():
        results[name] = _alone(run_case_process(process_spec(s, size, {name: case}, repeats=1), workdir,
                                                f"{section}_{name}", s.case_timeout_s), name)
        _log(f"{section}: {name} peak {results[name]['peak_mb']:.0f} MB")
    timing = run_case_process(process_spec(s, size, cases), workdir, f"{section}_time", 3 * s.case_timeout_s)
    for name, t in timing["cases"].items():
        results[name].update(t)
        _log(f"{section}: {name} {t['ms']:.0f} ms/step")
    return results


def _per_case(r: dict[str, dict], *more: str) -> dict:
    """{case}_ms and {case}_peak_mb of every case, and {key: {case: value}} for trainable_params and `more`."""
    return {**{f"{k}_{key}": v[key] for k, v in r.items() for key in ("ms", "peak_mb")},
            **{key: {k: v[key] for k, v in r.items()} for key in ("trainable_params", *more)}}


def _about(s: BenchSettings, size: str) -> dict:
    model, input_size, batch = (getattr(s, f"{size}_{k}") for k in ("model", "input_size", "batch"))
    return {"model": model["backbone"]["name"], "input_size": list(input_size), "batch": batch}


def bench_steps(s: BenchSettings, workdir: str) -> dict:
    r = side_by_side(s, workdir, "step", "step", {
        "adapt": case_spec(s, workdir, "adapt", "step"),  # bypass adapters, backbone frozen
        "finetune": case_spec(s, workdir, "finetune", "step"),  # the same model after adapt: all trains
        "pretrain_finetune": case_spec(s, workdir, "finetune", "step", adapter="none"),  # no adapters
    })
    fb = r["finetune"]["breakdown"]
    return {
        **_per_case(r, "breakdown", "params"), "time_ratio": r["adapt"]["ms"] / r["finetune"]["ms"],
        "mem_ratio": r["adapt"]["peak_mb"] / r["finetune"]["peak_mb"],
        # what adapt could reach: finetune's step without the backbone's backward and its optimizer share
        "reachable_time_ratio": (fb["backbone_fwd_ms"] + fb["rest_fwd_ms"] + fb["rest_bwd_ms"]) / sum(fb.values()),
        "memory": ("CUDA max_memory_allocated" if s.device == "cuda" else
                   "peak RSS of the case's process minus its RSS before the model was built"),
        **_about(s, "step"),
    }


def bench_compile(s: BenchSettings, workdir: str) -> dict:
    """Compilation happens in the first warm-up step: one more warm-up step than the eager case needs."""
    eager = case_spec(s, workdir, "finetune", "small")
    _log("compile: eager vs torch.compile of the dense part, interleaved ...")
    r = run_case_process(process_spec(s, "small", {"eager": eager, "compiled": {**eager, "compile": True}},
                                      warmup=s.small_warmup + 1), workdir, "compile", 3 * s.case_timeout_s)["cases"]
    _log(f"compile: eager {r['eager']['ms']:.0f} ms/step, compiled {r['compiled']['ms']:.0f} ms/step")
    return {"eager_ms": r["eager"]["ms"], "compiled_ms": r["compiled"]["ms"],
            "speedup": r["eager"]["ms"] / r["compiled"]["ms"],
            "compile_s": (r["compiled"]["first_step_ms"] - r["eager"]["first_step_ms"]) / 1000,
            "compiled_parts": r["compiled"]["compiled_parts"], "stage": "finetune",
            **_about(s, "small")}


def bench_lv_overhead(s: BenchSettings, workdir: str) -> dict:
    """with - frozen prompts is the text tower's share (CLIP's text transformer over every class
    prompt, each step while the prompts train); frozen - without the vision side's."""
    r = side_by_side(s, workdir, "lv_overhead", "small", {
        "without": case_spec(s, workdir, "adapt", "small"),
        "with": case_spec(s, workdir, "adapt", "small", lv=True),
        "prompts_frozen": case_spec(s, workdir, "adapt", "small", lv=True, prompts_frozen=True)})
    w, f, wo = r["with"], r["prompts_frozen"], r["without"]
    return {"ratio": w["ms"] / wo["ms"], "frozen_ratio": f["ms"] / wo["ms"], "mem_ratio": w["peak_mb"] / wo["peak_mb"],
            "text_tower_ms": w["ms"] - f["ms"], "vision_side_ms": f["ms"] - wo["ms"], **_per_case(r),
            "stage": "adapt", **_about(s, "small")}


# --------------------------------------------------------------------------- Ray Train overhead


def ray_timed_steps(spec: dict) -> None:
    """The Ray Train worker: `step_case.measure` of the one case, reported with a checkpoint
    (Result.metrics keeps only reports that carry one)."""
    import ray.train

    from paf_ray.bench.step_case import measure

    entered_at = time.time()
    result = _alone(measure(spec), "step")
    result["entered_at"] = entered_at
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "bench.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(d))


def ray_train_steps(spec: dict, storage_path: str, name: str) -> dict:
    """`ray_timed_steps` in a 1-worker TorchTrainer given spec["threads"] CPUs (Ray sets a worker's
    OMP_NUM_THREADS to its CPUs); its result plus startup_s (fit() to the worker's first line)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from paf_ray.train.step import train_process_env

    use_gpu = spec["device"] == "cuda"
    trainer = TorchTrainer(
        ray_timed_steps, train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={
            "CPU": float(spec["threads"]), **({"GPU": 1.0} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.abspath(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
            worker_runtime_env={"env_vars": train_process_env()}))  # as train/run.py gives its workers
    t0 = time.time()
    metrics = trainer.fit().metrics or {}
    if "ms" not in metrics:
        raise RuntimeError(f"bench ray_overhead: the Ray Train worker reported no timing (metrics: {metrics})")
    return {**metrics, "startup_s": metrics["entered_at"] - t0}


def _mean_cpu(runs: list[dict]) -> dict:
    """CPU ms per step by process, the mean over `runs`, largest first."""
    names = {k for r in runs for k in r["cpu_ms_per_step"]}
    return dict(sorted(((k, statistics.fmean(r["cpu_ms_per_step"].get(k, 0.0) for r in runs)) for k in names),
                       key=lambda kv: -kv[1]))


def bench_ray_overhead(s: BenchSettings, workdir: str) -> dict:
    """Plain, TorchTrainer, plain, ..., plain: each TorchTrainer run against the mean of the two plain
    runs around it, so the machine's drift over the minutes of the case hits both sides alike."""
    import ray

    spec = process_spec(s, "small", {"step": case_spec(s, workdir, "finetune", "small")}, breakdown=False,
                        repeats=s.overhead_steps)
    deadline = time.time() + 60  # the data case's tasks may still be releasing their CPUs
    while (free := ray.available_resources().get("CPU", 0.0)) < s.threads and time.time() < deadline:
        time.sleep(1)
    if free < s.threads:
        raise RuntimeError(f"bench ray_overhead: the worker needs {s.threads} CPUs, Ray has {free:g} free")

    def plain_run(i: int) -> dict:
        r = _alone(run_case_process(spec, workdir, f"ray_overhead_plain_{i}", s.case_timeout_s), "step")
        _log(f"ray_overhead: plain {r['ms']:.0f} ms/step")
        return r

    plain, trained = [plain_run(0)], []
    for i in range(s.overhead_rounds):
        trained.append(ray_train_steps(spec, os.path.join(workdir, "ray_train"), f"bench-{os.getpid()}-{i}"))
        _log(f"ray_overhead: TorchTrainer {trained[-1]['ms']:.0f} ms/step, start-up {trained[-1]['startup_s']:.1f} s")
        plain.append(plain_run(i + 1))
    ratios = [r["ms"] / ((plain[i]["ms"] + plain[i + 1]["ms"]) / 2) for i, r in enumerate(trained)]
    cpu = {"plain": _mean_cpu(plain), "ray": _mean_cpu(trained)}
    return {
        "plain_ms": statistics.median(r["ms"] for r in plain), "ray_ms": statistics.median(r["ms"] for r in trained),
        "ratio": statistics.median(ratios), "ratios": ratios,
        "startup_s": statistics.median(r["startup_s"] for r in trained),
        "threads": {"plain": plain[0]["threads"], "ray": trained[0]["threads"]},
        "openmp_wait": {"plain": plain[0]["openmp_wait"], "ray": trained[0]["openmp_wait"]},
        # CPU ms per timed step by process: where Ray Train's cost goes
        "cpu_ms_per_step": cpu,
        "others_cpu_ms_per_step": {k: sum(v for p, v in c.items() if p != "self") for k, c in cpu.items()},
        "steps": s.overhead_steps, "rounds": s.overhead_rounds, **_about(s, "small"),
    }


# --------------------------------------------------------------------------- data, gpu


def bench_data(s: BenchSettings, out: str) -> dict:
    """Synthetic BDD100K at 1280x720 under `out` (kept for a rerun), Ray Data against a DataLoader."""
    from paf_ray.bench.data_case import measure_input_pipeline
    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import load_records
    from paf_ray.data.bdd100k.synth import write_synthetic
    from paf_ray.tasks import TASKS

    root = os.path.join(out, f"synth-{s.frames}-1280x720")
    write_synthetic(root, images=s.frames, seed=0, size=(1280, 720), val_fraction=0.02)
    data = {"input_size": list(s.data_input_size), "batch_size": s.data_batch}
    cfg = from_dict({"data": data}, rules=False)  # the data section and the default tasks
    tasks = TASKS.get_many(cfg.model.tasks)
    records = load_records(cfg.data, root, "train", tasks)
    _log(f"data: {len(records)} training frames in {root} ...")
    return measure_input_pipeline(records, cfg.data, tasks, s.data_workers, s.data_repeats, s.consumer_step_s,
                                  pin_memory=s.device == "cuda")


def bench_gpu(s: BenchSettings, workdir: str, data: dict, machine: dict) -> dict:
    """Finetune and adapt at full resolution, each in its own process: images/s, peak memory, FLOPs
    per step, MFU; the input pipeline's headroom when the data case ran at the same size."""
    peak = machine["gpu_bf16_peak_tflops"] if s.device == "cuda" else None
    r, tasks = {}, []
    for stage in ("finetune", "adapt"):
        _log(f"gpu: {stage} throughput ...")
        case = case_spec(s, workdir, stage, "gpu")
        tasks = case["cfg"]["model"]["tasks"]
        spec = process_spec(s, "gpu", {stage: case}, flops=True)
        r[stage] = _alone(run_case_process(spec, workdir, f"gpu_{stage}", s.case_timeout_s), stage)
        r[stage]["img_s"] = r[stage]["batch"] / (r[stage]["ms"] / 1000)
        r[stage]["tflops"] = r[stage]["flops_per_step"] / (r[stage]["ms"] / 1000) / 1e12
        _log(f"gpu: {stage} {r[stage]['img_s']:.1f} img/s, peak {r[stage]['peak_mb']:.0f} MB")
    f, a = r["finetune"], r["adapt"]
    same_size = data.get("input_size") == list(s.gpu_input_size) and "ray_data_rows_s" in data
    return {
        "ran_on": s.device, "gpu_name": machine["gpu_name"] if s.device == "cuda" else None,
        "amp": "bf16" if s.amp else "off", "channels_last": s.channels_last, "tasks": tasks,
        "step_ms": f["ms"], "train_img_s": f["img_s"], "peak_mb": f["peak_mb"], "flops_per_step": f["flops_per_step"],
        "achieved_tflops": f["tflops"], "bf16_peak_tflops": peak, "mfu": f["tflops"] / peak if peak else None,
        "adapt_step_ms": a["ms"], "adapt_img_s": a["img_s"], "adapt_peak_mb": a["peak_mb"],
        "adapt_flops_per_step": a["flops_per_step"], "adapt_mfu": a["tflops"] / peak if peak else None,
        "adapt_over_finetune_img_s": a["img_s"] / f["img_s"], "adapt_over_finetune_peak": a["peak_mb"] / f["peak_mb"],
        "pipeline_img_s": data.get("ray_data_rows_s"),
        "pipeline_headroom": data["ray_data_rows_s"] / f["img_s"] if same_size else None,
        "breakdown": {"finetune": f["breakdown"], "adapt": a["breakdown"]}, **_about(s, "gpu"),
    }


# --------------------------------------------------------------------------- driver


def write_results(out: str, result: dict) -> None:
    """bench.json and bench.md, rewritten after every case: a run cut short keeps what it measured."""
    from paf_ray.bench.report import bench_markdown

    for name, text in (("bench.json", json.dumps(result, indent=1)), ("bench.md", bench_markdown(result))):
        with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def run_bench(out: str, quick: bool = False, device: str = "cpu", cases: list[str] | None = None) -> dict:
    """Run `cases` (default: SECTIONS; on CPU without compile, whose C++ build alone outlasts the other
    cases together); write `out`/bench.json and bench.md; return the result. A case that fails is
    recorded as {"error": ...} and listed in "failed"; the others still run."""
    import torch

    sections = list(cases) if cases else [c for c in SECTIONS if not (c == "compile" and device == "cpu")]
    if unknown := [c for c in sections if c not in SECTIONS]:
        raise ValueError(f"bench --cases: unknown {unknown} (known: {', '.join(SECTIONS)})")
    s = bench_settings(device, quick)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench --device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    out = os.path.abspath(out)
    workdir = os.path.join(out, "cases")  # each case's spec, batch and result, for a look afterwards
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    t_start = time.perf_counter()
    settings = {k: v["backbone"]["name"] if k.endswith("_model") else v for k, v in vars(s).items()}
    result: dict[str, Any] = {"machine": machine_info(device), "settings": settings, "complete": False,
                              "failed": [], "cases": sections}
    if {"data", "ray_overhead"} & set(sections):  # the cases that use a local Ray
        from paf_ray.runtime.ray import init_ray

        init_ray(num_cpus=os.cpu_count(), object_store_mb=4096 if device == "cuda" and not quick else 512)
    runners = {
        "data": lambda: bench_data(s, out),
        "step": lambda: bench_steps(s, workdir),
        "compile": lambda: bench_compile(s, workdir),
        "ray_overhead": lambda: bench_ray_overhead(s, workdir),
        "lv_overhead": lambda: bench_lv_overhead(s, workdir),
        "gpu": lambda: bench_gpu(s, workdir, result.get("data") or {}, result["machine"]),
    }
    if device == "cpu" and not quick:
        runners["gpu"] = lambda: {"ran_on": None, "why": "a CPU run: `paf-ray bench --device cuda` fills this"}
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


def bench_command(args) -> int:
    if args.config:
        from paf_ray.bench.step_time import step_time_command

        return step_time_command(args)
    if args.compare or args.overrides:
        raise ValueError("bench --compare / --set: they change a config, so they need --config CONFIG")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    result = run_bench(args.out, quick=args.quick, device=args.device, cases=cases)
    with open(os.path.join(args.out, "bench.md"), encoding="utf-8") as f:
        print(f.read())
    _log(f"wrote {os.path.abspath(os.path.join(args.out, 'bench.json'))} in {result['wall_s']:.0f} s")
    if result["failed"]:
        _log(f"cases that failed: {', '.join(result['failed'])} (their error is in bench.json)")
        return 1
    return 0
