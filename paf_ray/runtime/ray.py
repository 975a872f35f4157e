"""Starting or joining Ray, and the one place Ray Data's process-wide settings (DataContext) are made."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
import warnings

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

# Ray Train V2 re-routes print() in its workers through the root logger and, since Ray's own log
# capture also replaced stdout there, every line of the loop reached the driver twice. The loop
# prints to stdout, which Ray forwards once. The driver's value reaches the controller and workers.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

# `paf-ray --verbose` sets this: every line of Ray's own logging shows, as Ray ships it.
VERBOSE_ENV = "PAF_RAY_VERBOSE"
VERBOSE = os.environ.get(VERBOSE_ENV) == "1"
# Ray Train's and Ray Data's INFO lines ("Checkpoint successfully created", "Progress bars
# disabled", per-dataset "execution finished") say nothing a user can act on; their warnings and
# errors still show. Train takes the level from RunConfig (train/run.py); Ray Data from this
# variable, which the processes of a local Ray inherit from the driver.
RAY_LOG_LEVEL = "INFO" if VERBOSE else "WARNING"
if not VERBOSE:
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", RAY_LOG_LEVEL)


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
MIN_BLOCK_BYTES = 1 << 20  # Ray Data's default target_min_block_size: blocks are not made smaller
# a still loop step sleeps HELD_BACK_SLEEP_S, the next one twice as long, up to HELD_BACK_MAX_SLEEP_S
HELD_BACK_SLEEP_S = 0.02
HELD_BACK_MAX_SLEEP_S = 0.2


def configure_data_context(data_cpus: float, block_bytes: int | None = None) -> None:
    """The Ray Data settings of every dataset this process builds (a dataset keeps a copy of them).

    - CPU cap: decoding never takes the training workers' CPUs (2-core boxes hang otherwise).
    - Output blocks of `block_bytes` (``pipeline.block_rows`` rows): a decode task hands its rows
      on a few at a time, so the first batch waits for its share of decoding, not a whole read block.
    - ``SleepWhileHeldBack`` and ``RefreshLimitsAtStart``: two fixes of Ray Data's executor, see there.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=data_cpus)
    if block_bytes:
        ctx.target_max_block_size = max(block_bytes, MIN_BLOCK_BYTES)
    for callback in EXECUTOR_FIXES:
        if callback not in ctx.custom_execution_callback_classes:
            ctx.custom_execution_callback_classes.append(callback)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class SleepWhileHeldBack(ExecutionCallback):
    """Ends a busy loop of Ray Data's streaming executor (Ray 2.60).

    The executor's loop blocks (``ray.wait``, up to 0.1 s) only until some task has output ready.
    When the consumer is slower than decoding, the object-store budget fills, ready outputs may
    not be read and no task may start: the loop then spins without sleeping, a whole core in the
    process that runs it (the ``SplitCoordinator`` actor behind ``get_dataset_shard``, or the
    driver). So after a step in which nothing moved (no task started, no output made or taken,
    no queue changed) this sleeps 20 ms, after the next still step 40 ms, and so on up to 0.2 s;
    a step that moved anything is followed at once by the next. A stage's stream is held back
    most of the time, each consumer's batch wakes it: at a fixed 20 ms the loop's ~50 steps a
    second took 7% of a core beside the demo's training. docs/benchmarks.md has the measurements
    and a reproduction.
    """

    def __init__(self):
        self.last: tuple | None = None
        self.still_steps = 0

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None)  # private: without it, do nothing
        if not topology:
            return
        now = tuple(_progress(op, state) for op, state in topology.items())
        if now == self.last:
            time.sleep(min(HELD_BACK_MAX_SLEEP_S, HELD_BACK_SLEEP_S * 2 ** min(self.still_steps, 8)))
            self.still_steps += 1
        else:
            self.still_steps = 0
        self.last = now


class RefreshLimitsAtStart(ExecutionCallback):
    """Lets a new execution use its CPUs from the start, not after a second (Ray 2.60).

    The executor's resource limits come from its cluster autoscaler, which answers with the
    reply of an earlier, asynchronous call to Ray Data's autoscaling coordinator: the first
    answer of an execution is empty, so the limits are zero and, kept for
    ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s), admit a single task. Every stage start and every
    evaluation ran on one decode task for its first second (a pass of 500 frames on 2 CPUs
    lost 11% of its rows/s). While the limits are still zero this asks for them again at the
    next step, a non-blocking check, until the coordinator has answered (at most
    ``MAX_REFRESH_STEPS`` steps, so a cluster without CPUs for Ray Data does not ask forever).
    """

    MAX_REFRESH_STEPS = 200

    def __init__(self):
        self.steps = 0

    def on_execution_step(self, executor) -> None:
        manager = getattr(executor, "_resource_manager", None)  # private: without it, do nothing
        limits = getattr(manager, "_global_limits", None)
        if limits is None or not hasattr(manager, "_global_limits_last_update_time"):
            return
        if not limits.cpu and self.steps < self.MAX_REFRESH_STEPS:
            self.steps += 1
            manager._global_limits_last_update_time = 0


EXECUTOR_FIXES = (SleepWhileHeldBack, RefreshLimitsAtStart)


def _progress(op, state) -> tuple:
    """What changes when an operator makes progress (Ray 2.60 names; missing ones read as 0)."""
    m = getattr(op, "metrics", None)
    counts = tuple(getattr(m, k, 0) for k in ("num_tasks_submitted", "num_task_outputs_generated",
                                              "num_outputs_taken", "num_tasks_finished"))
    queue = getattr(state, "output_queue", None)
    return counts + (len(queue) if queue is not None else 0,)


def quiet_ray_warnings() -> None:
    """Ray's own deprecation warnings raised by Ray's internals (not by calls of ours)."""
    # Ray Train's DatasetManager builds ExecutionOptions(exclude_resources=...) itself (Ray 2.60).
    warnings.filterwarnings("ignore", message=".*exclude_resources.*", category=DeprecationWarning)


# Loggers of Ray internals whose lines a user cannot act on, and the level they are kept at:
# Ray Data warns on every dataset that progress bars are off (we turn them off on purpose);
# Ray Train's worker logs every report at INFO ("Reporting training result N: TrainingReport(...)",
# a whole metrics dict a line), on a logger named after its file (Ray 2.60), so outside "ray.train"
# and past Train's own level setting.
QUIET_LOGGERS = {
    "ray.data._internal.progress": logging.ERROR,
    # "Token authentication is enabled for this Ray cluster ...", at every start of a local Ray
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
QUIET_MODULE_LOGGERS = {"ray.train.v2._internal.execution.context": logging.WARNING}


class _AtLeast(logging.Filter):
    # A filter rather than a level: Ray Train's logging set-up resets the levels of its child loggers.
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_ray_logs() -> None:
    """Keep Ray's bookkeeping lines out of this process's log (not with --verbose); idempotent."""
    if VERBOSE:
        return
    quiet_ray_warnings()
    names = dict(QUIET_LOGGERS)
    for module, level in QUIET_MODULE_LOGGERS.items():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            names[spec.origin] = level
    for name, level in names.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _AtLeast) for f in logger.filters):
            logger.addFilter(_AtLeast(level))


def worker_setup() -> None:
    """Worker setup hook of a local Ray: quiet Ray's internal chatter, pin the cluster address."""
    quiet_ray_logs()
    pin_ray_address()


def pin_ray_address() -> None:
    """Name this cluster in RAY_ADDRESS inside every worker process.

    Ray Train's PlacementGroupCleaner (it frees the resources of a Tune trial that ASHA stopped)
    finds the cluster through the State API, which refuses to guess when several Ray instances
    run on one machine ("Found multiple active Ray instances"); the next trial then never starts.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


DEFAULT_CONNECT_TIMEOUT_S = 30.0
GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # tries of Ray's GCS connection loop, ~1 s apart


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 512,
             data_cpus: float | None = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; idempotent. With `data_cpus`, also the
    Ray Data settings of this process (``configure_data_context``).

    Joining fails within about `connect_timeout_s` when no cluster answers there (ray.init alone
    retries for ~14 minutes: 20 tries of ~41 s in Ray 2.60)."""
    if not ray.is_initialized():
        quiet_ray_logs()  # before the start: Ray logs some of its bookkeeping while it starts
        _start_or_join(address, num_cpus, object_store_mb, connect_timeout_s)
        quiet_ray_logs()
    if data_cpus is not None:
        configure_data_context(data_cpus)


def _start_or_join(address: str | None, num_cpus: int | None, object_store_mb: int, connect_timeout_s: float) -> None:
    key = "ray.address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        wait_for_cluster(address, key, connect_timeout_s)
        # The cluster accepted a connection: one round of Ray's own GCS connection loop is enough.
        # (Ray reads this variable at the call; a value the user set is kept.)
        ours = GCS_WAIT_ENV not in os.environ
        if ours:
            os.environ[GCS_WAIT_ENV] = "1"
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:
            what = "accepts connections, but no Ray cluster answered there: " if _host_port(address) else ""
            raise ConnectionError(f"{key}={address}: {what}{e}") from e
        finally:
            if ours:
                os.environ.pop(GCS_WAIT_ENV, None)
        pin_data_actors_here()
        return
    if not VERBOSE:
        # Ray Train's PreemptionWatcher polls for cloud node drains, which a Ray started here on one
        # machine never has; its start logs an error line at every stage (Ray 2.60, ray-project/ray
        # #53727). On a cluster it stays on (docs/cluster.md says what its line means).
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="info" if VERBOSE else "warning",
        runtime_env={"worker_process_setup_hook": "paf_ray.runtime.ray.worker_setup"},
        # The raylet kills idle workers beyond this many (default: num_cpus). On a 2-CPU box the
        # Train and Data actors alone pass 2, so each epoch's decode tasks would start new
        # Python processes (importing torch) while the trainer runs.
        _system_config={"num_workers_soft_limit": 16},
    )


def pin_data_actors_here() -> None:
    """Create Ray Data's two cluster-wide actors now, on this (the driver's) node: on a cluster, the head.

    Ray Data creates them (a stats actor and an autoscaling coordinator: detached, 0 CPUs) on the node
    of the first process that runs a dataset, and they live as long as the cluster. When that process
    is a Tune trial or a training worker on a worker node, that node is never idle again and the
    autoscaler never removes it (Ray 2.60; tests/test_autoscale.py).
    """
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # another Ray: its own placement stands
        return
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto` and the like."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def wait_for_cluster(address: str, key: str, timeout_s: float) -> None:
    """Wait until the cluster's address accepts a TCP connection; ConnectionError naming `key` after
    `timeout_s` (nothing listening, an unreachable host, a name that does not resolve)."""
    target = _host_port(address)
    if target is None:  # "auto": Ray looks the address up itself, and fails at once when there is none
        return
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            socket.create_connection(target, timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            last = e
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(
                f"{key}={address}: no Ray cluster answers there: nothing accepted a connection to "
                f"{target[0]}:{target[1]} within {timeout_s:g} s (ray.connect_timeout_s; last error: {last})")
        time.sleep(min(1.0, left))
