"""What each benchmark case runs: model, input size, batch, repeats, for CPU, CUDA and --quick.

A model is given as overrides of the `model` section of the config (plain data), so
every case builds its network with the same `build_model` the training uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# The 3-task R50-FPN with the reference detector settings: the config defaults.
R50_FPN: dict[str, Any] = {"backbone": {"name": "resnet50"}}

# A ResNet-18 with a narrow FPN and a light detector: a few seconds a step on 2 CPU cores.
R18_SMALL: dict[str, Any] = {
    "backbone": {"name": "resnet18"},
    "fpn_channels": 64,
    "seg_channels": 32,
    "det": {
        "rpn_pre_nms_top_n_train": 600,
        "rpn_post_nms_top_n_train": 300,
        "box_batch_size_per_image": 128,
        "representation_size": 256,
    },
}

# A very small network: for --quick, where only completeness counts. Width 16, not 8: torch
# 2.14.1 on CPU corrupts the heap in the backward of a 1x1 stride-2 conv with <= 8 input
# channels on channels_last input (what BatchCollate's NHWC->NCHW permute gives).
TINY: dict[str, Any] = {
    "backbone": {"name": "tiny", "tiny_width": 16},
    "fpn_channels": 16,
    "seg_channels": 8,
    "det": {
        "rpn_pre_nms_top_n_train": 100,
        "rpn_post_nms_top_n_train": 50,
        "box_batch_size_per_image": 32,
        "representation_size": 32,
    },
}


@dataclass
class BenchSettings:
    device: str  # "cpu" or "cuda"
    quick: bool
    # 1. input pipeline: synthetic frames at frame_size, decoded and transformed to data_input_size
    frames: int
    data_input_size: tuple[int, int]
    data_batch: int
    data_workers: int  # DataLoader num_workers == Ray Data CPUs for the map
    data_warmup: int  # whole passes over the frames before timing
    data_repeats: int
    consumer_step_s: float  # the consumer's fixed work per batch in the data case's consumer stages
    consumer_epochs: int  # epochs of a consumer stage (one stream, as a training stage reads it)
    # 1b. the stage stream: an epoch of stream_frames frames under a training-bound consumer
    stream_frames: int
    stream_step_s: float
    # 2. step cost (adapt / finetune / pretrain-finetune), one process per case
    step_model: dict
    step_input_size: tuple[int, int]
    step_batch: int
    step_warmup: int
    step_repeats: int
    # 3. Ray Train overhead and 4. LV-Adapter overhead: a smaller model, more steps
    small_model: dict
    small_input_size: tuple[int, int]
    small_batch: int
    small_warmup: int
    small_repeats: int
    threads: int  # torch threads of every timed loop (the Ray worker gets this many CPUs)
    # 3. Ray Train overhead: `overhead_rounds` TorchTrainer runs of `overhead_steps` timed steps,
    # each between two plain runs of as many
    overhead_steps: int
    overhead_rounds: int
    # 5. GPU: throughput of the 3-task R50-FPN at full resolution
    gpu_model: dict = field(default_factory=dict)
    gpu_input_size: tuple[int, int] = (1280, 736)
    gpu_batch: int = 8
    frame_size: tuple[int, int] = (1280, 720)
    case_timeout_s: int = 600  # one measuring process may not take longer

    @property
    def amp(self) -> bool:
        return self.device == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda"


def bench_settings(device: str, quick: bool) -> BenchSettings:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"bench --device: expected cpu or cuda, got {device!r}")
    cpus = os.cpu_count() or 1
    if quick:
        return BenchSettings(
            device=device,
            quick=True,
            frames=8,
            data_input_size=(256, 160),
            data_batch=2,
            data_workers=min(2, cpus),
            data_warmup=1,
            data_repeats=2,
            consumer_step_s=0.01,
            consumer_epochs=2,
            stream_frames=8,
            stream_step_s=0.05,
            step_model=TINY,
            step_input_size=(128, 96),
            step_batch=2,
            step_warmup=1,
            step_repeats=2,
            small_model=TINY,
            small_input_size=(128, 96),
            small_batch=2,
            small_warmup=1,
            small_repeats=2,
            threads=min(2, cpus),
            overhead_steps=2,
            overhead_rounds=1,
            gpu_model=TINY,
            gpu_input_size=(256, 160),
            gpu_batch=2,
            case_timeout_s=240,
        )
    if device == "cpu":
        return BenchSettings(
            device="cpu",
            quick=False,
            frames=512,
            data_input_size=(640, 384),
            data_batch=4,
            data_workers=min(2, cpus),
            data_warmup=1,
            data_repeats=5,
            consumer_step_s=0.08,  # one batch decodes in ~0.2 CPU-s: both sides stay CPU-bound
            consumer_epochs=3,
            stream_frames=256,
            stream_step_s=0.3,  # longer than a batch's decode: training-bound, so rows pile up
            step_model=R50_FPN,  # the target is stated for R50 at 640x384
            step_input_size=(640, 384),
            step_batch=1,
            step_warmup=1,
            step_repeats=3,
            small_model=R18_SMALL,
            small_input_size=(320, 192),
            small_batch=2,
            small_warmup=1,
            small_repeats=10,
            threads=min(2, cpus),
            # single steps of one side took 300-940 ms within a run: 10 steps and one TorchTrainer
            # run moved the ratio between 0.98 and 1.17 across three runs (docs/benchmarks.md)
            overhead_steps=30,
            overhead_rounds=2,
        )
    # A GPU machine: feed the GPU from most of its cores, measure at full resolution.
    workers = max(1, min(8, cpus - 2))
    return BenchSettings(
        device="cuda",
        quick=False,
        frames=256,
        data_input_size=(1280, 736),  # the training size of the throughput case: headroom compares like with like
        data_batch=8,
        data_workers=workers,
        data_warmup=1,
        data_repeats=3,
        consumer_step_s=0.05,
        consumer_epochs=3,
        stream_frames=256,
        stream_step_s=0.2,
        step_model=R50_FPN,
        step_input_size=(640, 384),
        step_batch=8,
        step_warmup=3,
        step_repeats=10,
        small_model=R50_FPN,
        small_input_size=(640, 384),
        small_batch=8,
        small_warmup=3,
        small_repeats=20,
        threads=min(4, cpus),
        overhead_steps=20,
        overhead_rounds=2,
        gpu_model=R50_FPN,
        gpu_input_size=(1280, 736),
        gpu_batch=8,
    )
