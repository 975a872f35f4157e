"""What each benchmark case runs (model, input size, batch, repeats) on CPU, on CUDA and with --quick.

The models are models.yaml's, overrides of the config's `model` section: every case builds its
network with the `build_model` training uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def bench_model(name: str) -> dict:
    """A network of models.yaml (next to this file): overrides of a config's `model` section."""
    import yaml

    with open(os.path.join(os.path.dirname(__file__), "models.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)[name]


@dataclass
class BenchSettings:
    device: str  # "cpu" or "cuda"
    quick: bool
    # data: `frames` synthetic 1280x720 frames, decoded and transformed to data_input_size
    frames: int
    data_input_size: tuple[int, int]
    data_batch: int
    data_workers: int  # DataLoader num_workers == the CPUs of Ray Data's map
    data_repeats: int  # after one warm-up pass of each side
    consumer_step_s: float  # the consumer's fixed work per batch in the consumer stages (3 epochs each)
    # step: adapt / finetune / pretrain-finetune
    step_model: dict
    step_input_size: tuple[int, int]
    step_batch: int
    step_warmup: int
    step_repeats: int
    # compile, ray_overhead, lv_overhead: a smaller model, more steps
    small_model: dict
    small_input_size: tuple[int, int]
    small_batch: int
    small_warmup: int
    small_repeats: int
    # ray_overhead: `overhead_rounds` TorchTrainer runs of `overhead_steps` steps, each between two plain runs
    overhead_steps: int
    overhead_rounds: int
    threads: int  # torch threads of every timed loop (the Ray worker gets this many CPUs)
    # gpu: the 3-task model at full resolution
    gpu_model: dict
    gpu_input_size: tuple[int, int] = (1280, 736)
    gpu_batch: int = 8
    case_timeout_s: int = 600  # one measuring process may not take longer

    @property
    def amp(self) -> bool:  # bf16 autocast and channels_last on CUDA, as training has them there
        return self.device == "cuda"

    channels_last = amp


def bench_settings(device: str, quick: bool) -> BenchSettings:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"bench --device: expected cpu or cuda, got {device!r}")
    cpus = os.cpu_count() or 1
    if quick:
        tiny = dict(model=bench_model("tiny"), input_size=(128, 96), batch=2, warmup=1, repeats=2)
        return BenchSettings(
            device, True, frames=8, data_input_size=(256, 160), data_batch=2, data_workers=min(2, cpus),
            data_repeats=2, consumer_step_s=0.01,
            **{f"{p}_{k}": v for p in ("step", "small") for k, v in tiny.items()},
            overhead_steps=2, overhead_rounds=1, threads=min(2, cpus),
            gpu_model=bench_model("tiny"), gpu_input_size=(256, 160), gpu_batch=2, case_timeout_s=240)
    if device == "cpu":
        return BenchSettings(
            "cpu", False, frames=512, data_input_size=(640, 384), data_batch=4, data_workers=min(2, cpus),
            data_repeats=5, consumer_step_s=0.08,  # a batch decodes in ~0.2 CPU-s: both sides stay CPU-bound
            step_model=bench_model("r50_fpn"), step_input_size=(640, 384), step_batch=1, step_warmup=1, step_repeats=3,
            small_model=bench_model("r18_small"), small_input_size=(320, 192), small_batch=2, small_warmup=1, small_repeats=10,
            # single steps moved between 300 and 940 ms within a run: 10 steps in one TorchTrainer run
            # moved the ratio between 0.98 and 1.17 across three runs
            overhead_steps=30, overhead_rounds=2, threads=min(2, cpus), gpu_model=bench_model("r50_fpn"))
    return BenchSettings(  # a GPU machine: feed the GPU from most of its cores, measure at full resolution
        "cuda", False, frames=256,
        data_input_size=(1280, 736),  # the gpu case's size: its pipeline headroom compares like with like
        data_batch=8, data_workers=max(1, min(8, cpus - 2)), data_repeats=3, consumer_step_s=0.05,
        step_model=bench_model("r50_fpn"), step_input_size=(640, 384), step_batch=8, step_warmup=3, step_repeats=10,
        small_model=bench_model("r50_fpn"), small_input_size=(640, 384), small_batch=8, small_warmup=3, small_repeats=20,
        overhead_steps=20, overhead_rounds=2, threads=min(4, cpus), gpu_model=bench_model("r50_fpn"))
