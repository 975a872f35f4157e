"""Ray Train overhead: the same steps through a 1-worker TorchTrainer vs a plain loop in one process.

Both sides run `step_case.timed_steps` (build the model and batch, warm up, time each step) with
the same torch thread count; the Ray worker is given that many CPUs, because Ray sets a
worker's OMP_NUM_THREADS to its CPU count and a 1-CPU worker would run single-threaded.
Steady-state ms/step is measured inside the function on both sides; start-up is the
wall time from ``fit()`` to the worker entering the function, reported separately.
"""

from __future__ import annotations

import json
import os
import tempfile
import time


def ray_timed_steps(config: dict) -> None:
    """Ray Train worker function: `timed_steps`, reported with a checkpoint (Result.metrics
    keeps only reports that carry one)."""
    import ray.train

    from paf_ray.bench.step_case import timed_steps

    entered_at = time.time()
    result = timed_steps(config)
    result["entered_at"] = entered_at
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "bench.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(d))


def ray_train_steps(spec: dict, storage_path: str, name: str) -> dict:
    """Run `timed_steps` in a 1-worker TorchTrainer; returns its result plus startup_s and fit_s."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from paf_ray.train.step import train_process_env

    use_gpu = spec["device"] == "cuda"
    resources = {"CPU": float(spec["threads"])}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        ray_timed_steps,
        train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=os.path.abspath(storage_path),
            # fail instead of retrying forever when the worker cannot be placed
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
            worker_runtime_env={"env_vars": train_process_env()},  # as train/run.py gives its workers
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    fit_s = time.time() - t0
    metrics = dict(result.metrics or {})
    if "ms" not in metrics:
        raise RuntimeError(f"bench ray_overhead: the Ray Train worker reported no timing (metrics: {metrics})")
    metrics["startup_s"] = metrics["entered_at"] - t0
    metrics["fit_s"] = fit_s
    return metrics
