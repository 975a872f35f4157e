"""`paf-ray bench --quick` and `paf-ray bench --config`: every case runs and writes the numbers a user reads.

Nothing here asserts speed (speed claims come from full bench runs, as ratios measured side by side).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What bench.json must hold, section -> keys with a finite positive number each.
REQUIRED = {
    "data": ["ray_data_first_batch_s", "dataloader_first_batch_s", "dataloader_new_first_batch_s", "first_batch_ratio",
             "ray_data_rows_s", "dataloader_rows_s", "steady_ratio", "ray_data_consumer_rows_s",
             "dataloader_consumer_rows_s", "consumer_ratio", "consumer_stage_ratio"],
    "ray_overhead": ["plain_ms", "ray_ms", "ratio", "startup_s"],
    "lv_overhead": ["without_ms", "with_ms", "prompts_frozen_ms", "ratio", "frozen_ratio", "with_peak_mb",
                    "without_peak_mb"],
    "step": ["adapt_ms", "finetune_ms", "pretrain_finetune_ms", "adapt_peak_mb", "finetune_peak_mb", "time_ratio",
             "mem_ratio", "reachable_time_ratio"],
    "gpu": ["step_ms", "train_img_s", "peak_mb", "flops_per_step", "achieved_tflops", "adapt_img_s", "adapt_peak_mb",
            "adapt_over_finetune_img_s", "adapt_over_finetune_peak"],
}


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_sections(result: dict, sections: list[str]) -> None:
    assert result["complete"] is True and result["failed"] == [] and result["cases"] == sections
    for section in sections:
        for key in REQUIRED[section]:
            assert _finite_positive(result[section].get(key)), (section, key, result[section].get(key))


def test_quick_bench_of_the_ray_and_lv_cases(ray_local, tmp_path):
    from paf_ray.cli import main
    from paf_ray.train.step import OPENMP_WAIT_VARS, train_process_env

    out = tmp_path / "bench"
    sections = ["data", "ray_overhead", "lv_overhead"]
    assert main(["bench", "--quick", "--cases", ",".join(sections), "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    _check_sections(result, sections)
    assert result["machine"]["cpu_count"] == os.cpu_count() and result["machine"]["ray"]
    # the Ray worker ran with as many torch threads, and OpenMP's waiting, as the plain loop and a
    # training worker of train/run.py (train.step.train_process_env)
    ro = result["ray_overhead"]
    assert ro["threads"]["ray"] == ro["threads"]["plain"] == 2
    expected = {**{name: os.environ.get(name) for name in OPENMP_WAIT_VARS}, **train_process_env()}
    assert ro["openmp_wait"]["ray"] == ro["openmp_wait"]["plain"] == expected
    assert ro["cpu_ms_per_step"]["ray"]["self"] > 0 and ro["others_cpu_ms_per_step"]["ray"] > 0  # the CPU account
    lv = result["lv_overhead"]
    params = lv["trainable_params"]
    assert params["with"] > params["prompts_frozen"] > params["without"]  # the prompts, then the vision side
    md = (out / "bench.md").read_text()
    for heading in ("## data: the input pipeline", "## ray_overhead: Ray Train", "## lv_overhead: the LV-Adapter"):
        assert heading in md
    assert "FAILED" not in md and "| all but self |" in md


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


def test_step_and_gpu_cases_run_without_ray_open_clip_or_pycocotools(tmp_path):
    """What scripts/gpu_bench.sh runs on a GPU machine's stock image, on CPU at --quick sizes
    (compile is left out: inductor's C++ compilation alone takes minutes on 2 cores)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "paf_ray", "bench", "--quick", "--cases", "gpu,step",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    _check_sections(result, ["gpu", "step"])
    assert result["machine"]["ray"] is None and result["gpu"]["pipeline_headroom"] is None  # no data case ran
    step = result["step"]
    assert step["time_ratio"] == step["adapt_ms"] / step["finetune_ms"]
    for case in ("adapt", "finetune", "pretrain_finetune"):  # the breakdown covers the step
        assert set(step["breakdown"][case]) == {"backbone_fwd_ms", "backbone_bwd_ms", "rest_fwd_ms", "rest_bwd_ms",
                                                "optimizer_ms"}
    # adapt freezes the backbone: no backward through it, far fewer trainable parameters
    assert step["breakdown"]["adapt"]["backbone_bwd_ms"] == 0.0 < step["breakdown"]["finetune"]["backbone_bwd_ms"]
    assert step["trainable_params"]["adapt"] < step["trainable_params"]["pretrain_finetune"] \
        < step["trainable_params"]["finetune"]  # pretrain-finetune has no adapters
    md = (out / "bench.md").read_text()
    assert md.index("## gpu") < md.index("## step: adapt vs finetune")  # in the order asked for
    assert "n/a (no bf16 peak known for this device)" in md and "FAILED" not in md


def test_bench_config_times_a_configs_steps_side_by_side(capsys):
    from paf_ray.cli import main

    demo = os.path.join(REPO, "jobs", "demo.yaml")
    assert main(["bench", "--config", demo, "--steps", "2", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["ms_per_step"]) == {"adapt", "finetune"} and r["threads"] == 1 and r["input_size"] == [320, 192]
    assert _finite_positive(r["adapt_over_finetune"]) and _finite_positive(r["adapt_over_finetune_cpu"])
    assert main(["bench", "--config", demo, "--steps", "2", "--set", "model.heads.det.roi_sampling_ratio=1",
                 "--compare", "model.heads.det.roi_sampling_ratio=2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["changes"] == ["model.heads.det.roi_sampling_ratio=2"] and set(r["ms_per_step"]) == {"base", "variant"}
    assert _finite_positive(r["variant_over_base"]) and _finite_positive(r["variant_over_base_cpu"])
    assert main(["bench", "--compare", "model.heads.det.roi_sampling_ratio=2"]) == 1
    assert "they need --config CONFIG" in capsys.readouterr().err


def test_dataloader_baseline_yields_the_ray_data_batches(ray_local, synth_root):
    """The DataLoader side runs the same load + collate: with the val transform, identical batches."""
    from paf_ray.bench.data_case import CollateRows, RecordDataset
    from paf_ray.config import from_dict
    from paf_ray.data.pipeline import build_dataset, iter_train_batches, load_records
    from paf_ray.tasks import TASKS

    cfg = from_dict({"data": {"input_size": [128, 96], "batch_size": 2}}, rules=False)
    tasks = TASKS.get_many(cfg.model.tasks)
    records = load_records(cfg.data, synth_root, "train", tasks)[:4]
    from_ray = {}
    for batch in iter_train_batches(build_dataset(records, cfg.data, tasks, train=False), tasks, 2):
        for i, name in enumerate(batch["name"]):
            from_ray[name] = (batch["image"][i], {t: batch["has"][t][i] for t in batch["has"]},
                              batch["targets"]["det"]["boxes"][i], batch["targets"]["sem"][i])
    loader = torch.utils.data.DataLoader(RecordDataset(records, cfg.data, tasks, train=False), batch_size=2,
                                         collate_fn=CollateRows(tasks), num_workers=0)
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 96, 128)
        for i, name in enumerate(batch["name"]):
            image, has, boxes, sem = from_ray[name]
            assert torch.equal(batch["image"][i], image) and torch.equal(batch["targets"]["sem"][i], sem)
            assert torch.equal(batch["targets"]["det"]["boxes"][i], boxes)
            assert {t: batch["has"][t][i] for t in batch["has"]} == has
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


def test_stack_rows_stacks_equal_shapes_and_keeps_ragged_as_objects():
    from paf_ray.data.collate import stack_rows

    rows = [{"image": np.zeros((2, 3, 3), np.uint8), "boxes": np.zeros((k, 4), np.float32), "name": f"f{k}"}
            for k in (0, 2)]
    cols = stack_rows(rows)
    assert cols["image"].shape == (2, 2, 3, 3) and cols["image"].dtype == np.uint8
    assert cols["boxes"].dtype == object and [b.shape for b in cols["boxes"]] == [(0, 4), (2, 4)]
    assert list(cols["name"]) == ["f0", "f2"]
