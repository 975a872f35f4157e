"""Starting or joining Ray, and the Ray Data settings every driver and trial applies."""

from __future__ import annotations

import os

import ray


def configure_data_context(data_cpus: float) -> None:
    """Bound Ray Data to its CPU budget so training workers always get theirs (2-core boxes hang otherwise)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=data_cpus)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def pin_ray_address() -> None:
    """Worker setup hook: name this cluster in RAY_ADDRESS inside every worker process.

    Ray Train's PlacementGroupCleaner (it frees the resources of a Tune trial that ASHA stopped)
    finds the cluster through the State API, which refuses to guess when several Ray instances
    run on one machine ("Found multiple active Ray instances"); the next trial then never starts.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 512) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="warning",
        runtime_env={"worker_process_setup_hook": "paf_ray.train.ray_setup.pin_ray_address"},
        # The raylet kills idle workers beyond this many (default: num_cpus). On a 2-CPU box the
        # Train and Data actors alone pass 2, so each epoch's decode tasks would start new
        # Python processes (importing torch) while the trainer runs.
        _system_config={"num_workers_soft_limit": 16},
    )
