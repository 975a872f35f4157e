"""`paf-ray bench --quick`: every case runs and bench.json / bench.md are complete.

Nothing here asserts speed (speed claims come from the full bench, as ratios).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

# What bench.json must hold (issue 8), section -> keys with a finite number each.
REQUIRED = {
    "data": ["ray_data_first_batch_s", "dataloader_first_batch_s", "dataloader_new_first_batch_s", "first_batch_ratio",
             "ray_data_rows_s", "dataloader_rows_s", "steady_ratio", "ray_data_consumer_rows_s", "dataloader_consumer_rows_s",
             "consumer_ratio", "consumer_stage_ratio"],
    "stream": ["epoch_start_ratio", "first_epoch_start_ratio", "whole_store_rows_s", "quarter_store_rows_s",
               "backpressure_ratio", "backpressure_ratio_unfixed", "backpressure_ratio_epoch2"],
    "step": ["adapt_ms", "finetune_ms", "pretrain_finetune_ms", "adapt_peak_mb", "finetune_peak_mb", "time_ratio",
             "mem_ratio"],
    "ray_overhead": ["plain_ms", "ray_ms", "ratio", "startup_s"],
    "idle_share": ["alone_ratio", "beside_ratio"],
    "lv_overhead": ["ratio"],
    "gpu": ["step_ms", "train_img_s", "flops_per_step", "achieved_tflops", "pipeline_headroom"],
}


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_quick_bench_writes_every_field(ray_local, tmp_path):
    from paf_ray.cli import main

    out = tmp_path / "bench"
    # every section but compile (inductor's C++ compilation alone takes minutes on a 2-core machine)
    assert main(["bench", "--quick", "--cases", "data,stream,step,ray_overhead,idle_share,lv_overhead,gpu", "--out", str(out)]) == 0

    result = json.loads((out / "bench.json").read_text())
    assert result["complete"] is True and result["failed"] == []
    machine = result["machine"]
    assert machine["cpu_count"] == os.cpu_count()
    assert machine["torch"] == torch.__version__ and machine["ray"]
    assert "gpu_name" in machine
    for section, keys in REQUIRED.items():
        for key in keys:
            assert _finite_positive(result[section].get(key)), (section, key, result[section].get(key))
    # each stream run accounts for its epochs: the consumer's wait and where the CPU went
    for run in result["stream"]["runs"].values():
        assert len(run["epoch_wait_ms"]) == len(run["epoch_cpu_ms"]) == len(run["epoch_rows_s"]) == 2
        assert all(c["consumer"] > 0 and c["others"] > 0 for c in run["epoch_cpu_ms"]), run["epoch_cpu_ms"]
    step = result["step"]
    assert step["time_ratio"] == step["adapt_ms"] / step["finetune_ms"]
    # the breakdown covers the step: backbone fwd/bwd, neck + heads fwd/bwd, optimizer
    for case in ("adapt", "finetune", "pretrain_finetune"):
        parts = step["breakdown"][case]
        assert set(parts) == {"backbone_fwd_ms", "backbone_bwd_ms", "rest_fwd_ms", "rest_bwd_ms", "optimizer_ms"}
    # adapt freezes the backbone: no backward through it, far fewer trainable parameters
    assert step["breakdown"]["adapt"]["backbone_bwd_ms"] == 0.0
    assert step["breakdown"]["finetune"]["backbone_bwd_ms"] > 0.0
    assert step["trainable_params"]["adapt"] < step["trainable_params"]["finetune"]
    assert step["trainable_params"]["pretrain_finetune"] < step["trainable_params"]["finetune"]  # no adapters
    # the Ray worker ran with as many torch threads as the plain loop
    ro = result["ray_overhead"]
    assert ro["threads"]["ray"] == ro["threads"]["plain"]
    # and with OpenMP's waiting as a training worker of train/run.py has it (train.step.train_process_env)
    from paf_ray.train.step import OPENMP_WAIT_VARS, train_process_env

    expected = {**{name: os.environ.get(name) for name in OPENMP_WAIT_VARS}, **train_process_env()}
    assert ro["openmp_wait"]["ray"] == ro["openmp_wait"]["plain"] == expected

    # each idle_share case's step process had its own OpenMP waiting (the case waits for the decoder's first row)
    share = result["idle_share"]
    assert share["openmp_default"]["openmp_wait"] == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}
    assert share["train_worker"]["openmp_wait"] == {"GOMP_SPINCOUNT": "30000", "OMP_WAIT_POLICY": None}

    md = (out / "bench.md").read_text()
    for heading in ("## 1. Input pipeline", "## 1b. The stage stream", "## 2. Step cost", "## 3. Ray Train overhead",
                    "## 3b. Training beside idle-priority decoding", "## 4. LV-Adapter overhead",
                    "## 5. GPU"):
        assert heading in md
    assert "FAILED" not in md and "n/a" in md  # MFU has no peak on a CPU


def test_dataloader_baseline_yields_the_ray_data_batches(ray_local, synth_root):
    """The DataLoader side runs the same load + collate: with the val transform, identical batches."""
    from paf_ray.bench.data_case import RecordDataset, collate_rows
    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import build_dataset, iter_train_batches, load_records

    data_cfg = from_dict({"data": {"input_size": [128, 96], "batch_size": 2}}, rules=False).data
    records = load_records(data_cfg, synth_root, "train")[:4]
    from_ray = {}
    for batch in iter_train_batches(build_dataset(records, data_cfg, train=False), 2):
        for i, name in enumerate(batch["name"]):
            from_ray[name] = {k: batch[k][i] for k in ("image", "boxes", "labels", "sem", "drv", "has_det")}
    loader = torch.utils.data.DataLoader(RecordDataset(records, data_cfg, train=False), batch_size=2,
                                         collate_fn=collate_rows, num_workers=0)
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 96, 128)
        for i, name in enumerate(batch["name"]):
            for key, expected in from_ray[name].items():
                assert torch.equal(batch[key][i], expected), (name, key)
            seen += 1
    assert seen == len(records) == len(from_ray)


def test_mfu_peak_table_names_common_cards():
    from paf_ray.bench.run import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.4
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA L4") == 121.0
    assert bf16_peak_tflops("NVIDIA L40S") == 362.05
    assert bf16_peak_tflops("Some Unknown Card") is None
    assert bf16_peak_tflops(None) is None


def test_rows_to_columns_stacks_equal_shapes_and_keeps_ragged_as_objects():
    from paf_ray.bench.data_case import rows_to_columns

    rows = [{"image": np.zeros((2, 3, 3), np.uint8), "boxes": np.zeros((k, 4), np.float32), "name": f"f{k}"}
            for k in (0, 2)]
    cols = rows_to_columns(rows)
    assert cols["image"].shape == (2, 2, 3, 3) and cols["image"].dtype == np.uint8
    assert cols["boxes"].dtype == object and [b.shape for b in cols["boxes"]] == [(0, 4), (2, 4)]
    assert list(cols["name"]) == ["f0", "f2"]


# Put first on PYTHONPATH, this makes Ray, open_clip and pycocotools unimportable in the process
# and in every process it starts (the bench runs each case in a child process).
_BLOCKER = '''
import sys


class _Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "open_clip", "pycocotools"):
            raise ImportError(f"{name} is not installed here (blocked by the test)")
        return None


sys.meta_path.insert(0, _Unimportable())
'''


@pytest.mark.timeout(1800)  # six measuring processes, each importing torch: slow on a busy 2-core box
def test_step_and_gpu_cases_run_without_ray_open_clip_or_pycocotools(tmp_path):
    """What scripts/gpu_bench.sh runs on a GPU machine's stock image, on CPU and --quick sizes."""
    import subprocess
    import sys

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCKER)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), repo])}
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr

    out = tmp_path / "bench"
    # compile is left out: inductor's C++ compilation alone takes minutes on a 2-core machine
    proc = subprocess.run([sys.executable, "-m", "paf_ray", "bench", "--quick", "--cases", "gpu,step",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1700, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["complete"] is True and result["machine"]["ray"] is None
    assert "data" not in result and "ray_overhead" not in result
    gpu = result["gpu"]
    for key in REQUIRED["gpu"][:-1] + ["adapt_img_s", "adapt_peak_mb", "adapt_over_finetune_img_s",
                                       "adapt_over_finetune_peak"]:
        assert _finite_positive(gpu[key]), (key, gpu[key])
    assert gpu["pipeline_headroom"] is None  # no data case ran
    for kind in ("faster_rcnn", "fcos"):
        check = gpu["box_check"][kind]
        assert check["boxes_dtype"] == "float32" and check["boxes_px"] <= 0.01 and check["anchors_px"] <= 0.01
    for key in REQUIRED["step"]:
        assert _finite_positive(result["step"][key]), key
    md = (out / "bench.md").read_text()
    assert "## 5. GPU" in md and "## 2. Step cost" in md and "## 1. Input pipeline" not in md
