"""The Ray Data pipeline: index records -> decode + joint transforms on CPU -> torch batches.

``build_dataset`` gives a ``ray.data.Dataset`` of transformed rows (docs/architecture.md §2);
a training worker iterates its shard with ``iter_train_batches`` (``BatchCollate`` makes
the batch of §3). The tasks of the run are passed in: what a task's label, row columns and
batch target are is the task's (``paf_ray/tasks``). Nothing here depends on running inside Ray
Train, and nothing the decode workers unpickle imports torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from paf_ray.data.bdd100k import synth
from paf_ray.data.collate import batch_to_device, collate_rows
from paf_ray.data.contracts import Batch, DatasetError, Record, has_column
from paf_ray.data.decode import load_sample
from paf_ray.data.index import load_index
from paf_ray.data.transforms import Geometry, make_row, train_geometry, val_geometry
from paf_ray.runtime.ray import configure_data_context

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- root and records


def synth_cache_name(data_cfg) -> str:
    s = data_cfg.synth
    name = f"synth-{s.images}-{s.size[0]}x{s.size[1]}-s{s.seed}-g{synth.GENERATOR_VERSION}"
    if s.val_fraction != 0.25:
        name += f"-v{s.val_fraction:g}"
    return name


def resolve_root(data_cfg, cache_dir: str) -> str:
    """``data.root`` if set; else the synthetic dataset under cache_dir, generated once.

    Two processes may race: each writes into its own temporary folder and renames it into
    place; the loser discards its copy. A folder without the completion marker is never used.
    """
    if data_cfg.root:
        return data_cfg.root
    s = data_cfg.synth
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, synth_cache_name(data_cfg))
    if synth.is_complete(final):
        return final
    if os.path.exists(final):
        raise DatasetError(f"{final}: exists but has no completion marker ({synth.COMPLETE_MARKER}); remove it")
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=os.path.basename(final) + ".tmp-")
    try:
        synth.write_synthetic(tmp, images=s.images, seed=s.seed, size=tuple(s.size), val_fraction=s.val_fraction,
                              max_pixels=data_cfg.max_image_pixels)
        try:
            os.rename(tmp, final)
        except OSError:
            if not synth.is_complete(final):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_records(data_cfg, root: str, split: str, tasks, stats: dict | None = None) -> list[Record]:
    """The split's index records (sorted by name) that carry at least one of `tasks`, cut to
    max_{train,val}_samples if set.

    The index of these tasks' labels is built once per state of the root, then reused
    (``index.load_index``)."""
    all_stats: dict = {}
    index = load_index(root, tasks, drop_overlap=data_cfg.drop_overlap, on_bad_sample=data_cfg.on_bad_sample,
                       index_dir=data_cfg.index_dir, stats=all_stats)
    if split not in index:
        raise DatasetError(f"{root}: no split {split!r} (the index has {sorted(index)})")
    names = {t.name for t in tasks}
    records = [r for r in index[split] if names & set(r["labels"])]
    if stats is not None:
        stats[split] = all_stats[split]
    limit = data_cfg.max_train_samples if split == data_cfg.train_split else data_cfg.max_val_samples
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DatasetError(f"{root}: split {split!r} has no images with labels for {sorted(names)}")
    return records


# ----------------------------------------------------------------------------- rows


def _lower_this_thread() -> None:
    """Idle CPU priority for the calling thread only (Linux: scheduling is per thread)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: the thread keeps its priority
        pass


_idle_thread: ThreadPoolExecutor | None = None


def run_at_idle_priority(fn, *args):
    """fn(*args) on this process's idle-priority thread; the caller waits (sleeping).

    The worker's own thread keeps its priority: Ray may later run other work, even an actor,
    in the same process, and an unprivileged thread cannot raise its priority again.
    """
    global _idle_thread
    if _idle_thread is None:
        _idle_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paf-decode",
                                          initializer=_lower_this_thread)
    return _idle_thread.submit(fn, *args).result()


class RecordTable:
    """The index records of a stage as two numpy arrays (JSON bytes and their offsets).

    Put in the object store once per stage: every decode task reads it from shared memory without
    a copy, so a stream of many epochs carries only row positions, not a record per row.
    """

    def __init__(self, records: list[Record]):
        encoded = [json.dumps(r).encode() for r in records]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Record:
        return json.loads(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The record order of one training epoch: a fresh permutation per (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class StreamPlan:
    """Row position k of a stream -> record index: epoch k // rows_per_epoch, and inside it the
    epoch's order (train) or the records in turn (val), repeated when an epoch asks for more rows
    than there are records."""

    n_records: int
    rows_per_epoch: int
    epochs: int
    shuffle: bool
    seed: int = 0

    @property
    def total_rows(self) -> int:
        return self.rows_per_epoch * self.epochs

    def record_indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(np.asarray(positions, np.int64), self.rows_per_epoch)
        within %= self.n_records
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for e in np.unique(epochs):
            pick = epochs == e
            out[pick] = epoch_order(self.seed, int(e), self.n_records)[within[pick]]
        return out


_tables: dict[str, RecordTable] = {}  # this process's view of each stage's table, by object id


def _table(ref) -> RecordTable:
    key = ref.hex()
    if key not in _tables:
        _tables.clear()  # one stage at a time per process
        _tables[key] = ray.get(ref)
    return _tables[key]


@dataclass(frozen=True)
class RowSettings:
    """What a decode task needs of ``data``: small, plain, torch-free (it travels with every map task)."""

    input_size: tuple[int, int]
    scale_range: tuple[float, float]
    hflip: float
    color_jitter: float
    on_bad_sample: str
    decode_priority: str
    max_image_pixels: int

    @classmethod
    def of(cls, data_cfg) -> "RowSettings":
        return cls(tuple(data_cfg.input_size), tuple(data_cfg.scale_range), data_cfg.hflip, data_cfg.color_jitter,
                   data_cfg.on_bad_sample, data_cfg.decode_priority, data_cfg.max_image_pixels)


def placeholder_row(name: str, error: str, tasks) -> dict:
    """A bad sample kept under on_bad_sample=skip: tiny arrays and the reason; the collate drops it."""
    geometry = Geometry.placeholder()
    row = {"image": np.zeros((1, 1, 3), np.uint8), "name": name, "scale": np.float32(0.0),
           "orig_size": np.zeros((2,), np.int64), "error": error}
    for task in tasks:
        row[has_column(task.name)] = False
        row.update(task.transform(None, geometry))
    return row


def load_row(record: Record, settings: RowSettings, tasks, train: bool) -> dict:
    """One index record -> one transformed row (or, with on_bad_sample: skip, a placeholder)."""
    try:
        sample = load_sample(record, tasks, settings.max_image_pixels)
    except DatasetError as e:
        if settings.on_bad_sample != "skip":
            raise
        return placeholder_row(record["name"], str(e), tasks)
    h, w = sample["image"].shape[:2]
    if train:
        rng = np.random.default_rng()
        geometry = train_geometry(w, h, settings.input_size, settings.scale_range, settings.hflip, rng)
        row = make_row(sample["image"], sample["targets"], tasks, geometry, settings.color_jitter, rng)
    else:
        row = make_row(sample["image"], sample["targets"], tasks, val_geometry(w, h, settings.input_size))
    row["name"] = record["name"]
    row["error"] = ""
    return row


class LoadRows:
    """The Ray Data map: a stream position (column "data") -> its record (``StreamPlan``) -> the transformed row."""

    def __init__(self, table_ref, plan: StreamPlan, settings: RowSettings, tasks, train: bool):
        self.table_ref, self.plan, self.settings, self.tasks, self.train = table_ref, plan, settings, list(tasks), train

    def __call__(self, item: dict) -> dict:
        index = int(self.plan.record_indices(np.asarray([item["data"]]))[0])
        record = _table(self.table_ref)[index]
        if self.settings.decode_priority == "idle":
            return run_at_idle_priority(load_row, record, self.settings, self.tasks, self.train)
        return load_row(record, self.settings, self.tasks, self.train)


def map_cpus(data_cfg) -> float:
    """CPUs per decode task: more tasks than CPUs, so the CPUs stay busy while a task waits for
    I/O, while the executor starts the next task, and at the end of a stream, where tasks finish
    at different times (with one task per CPU a 500-frame pass ended with 0.8 s on one CPU;
    docs/benchmarks.md). Two tasks share one CPU on small budgets, three share two from 2 CPUs up."""
    return 0.5 if data_cfg.cpus <= 1 else 0.65  # not 2/3: Ray keeps 4 decimals, and 3 x 0.6667 > 2


def decode_slots(data_cfg) -> int:
    """Decode tasks that run at once under the ``data.cpus`` cap."""
    return max(1, int(data_cfg.cpus / map_cpus(data_cfg) + 1e-6))


BLOCK_TARGET_BYTES = 20 << 20  # four batches of 4 rows at 640x384
# the first batch of a stream waits for one block (never under runtime.ray.MIN_BLOCK_BYTES, though)
MAX_BATCHES_PER_BLOCK = 4
# A block is at most this part of a node's object store: Ray Data keeps half the store for its
# rows, and a decode task that may not start while the blocks of the others fill that half
# leaves its CPU idle (20-MB blocks in an 80-MB store: 0.78x the rows/s of a store that holds
# the epoch; docs/benchmarks.md)
STORE_BLOCKS = 24


def block_rows(data_cfg, tasks, store_bytes: int | None = None) -> int:
    """Rows a decode task hands on at a time: whole batches, as many as make about
    BLOCK_TARGET_BYTES (and no more than 1/STORE_BLOCKS of `store_bytes`, the smallest node's
    object store), at most MAX_BATCHES_PER_BLOCK. A batch never spans two blocks, so it
    reaches the training loop without a copy to join pieces. Each block costs CPU beyond its
    rows (building and storing it, the executor and the ``SplitCoordinator`` handing it on, the
    consumer's get), outside the idle-priority decode thread: 4-batch blocks took less CPU per
    row than one-batch blocks at the demo's 320x192 (1-12%) and at 640x384 (6-12%, the
    coordinator 3.7-4.2 ms a row instead of 5.5-6.5; docs/benchmarks.md)."""
    batch = max(1, data_cfg.batch_size)
    target = BLOCK_TARGET_BYTES if store_bytes is None else min(BLOCK_TARGET_BYTES, store_bytes // STORE_BLOCKS)
    batches = round(target / (batch * row_bytes(data_cfg, tasks)))
    return batch * min(MAX_BATCHES_PER_BLOCK, max(1, batches))


def smallest_object_store() -> int | None:
    """Bytes of the smallest object store among the cluster's alive nodes (None without Ray)."""
    if not ray.is_initialized():
        return None
    stores = [n["Resources"].get("object_store_memory") for n in ray.nodes() if n.get("Alive")]
    stores = [int(b) for b in stores if b]
    return min(stores) if stores else None


def row_bytes(data_cfg, tasks) -> int:
    """Bytes of one transformed row at the input size: the uint8 image and the tasks' columns (a frame
    without labels has their full size too: empty masks are 255s)."""
    w, h = data_cfg.input_size
    geometry = val_geometry(w, h, (w, h))
    return w * h * 3 + sum(int(np.asarray(v).nbytes) for t in tasks for v in t.transform(None, geometry).values())


def read_blocks(plan: StreamPlan, data_cfg) -> int:
    """Read blocks of a stream: one per epoch and decode slot, so the tasks running at once
    read neighbouring parts of the stream and an epoch's rows arrive in that epoch. Each block
    is one decode task, and the executor takes 0.1-0.3 s to notice a finished task and start
    the next (Ray 2.60 polls its tasks every 0.1 s): 4 blocks per slot cost a 500-frame pass
    6% of its rows/s (docs/benchmarks.md). Rows leave a task in small output blocks regardless
    (``block_rows``), so the first batch waits for one of those, not a whole read block."""
    wanted = plan.epochs * decode_slots(data_cfg)
    return max(1, min(-(-plan.total_rows // data_cfg.batch_size), wanted))


def build_dataset(records: list[Record], data_cfg, tasks, train: bool, epochs: int = 1,
                  rows_per_epoch: int | None = None, seed: int = 0,
                  task_resources: dict[str, float] | None = None) -> ray.data.Dataset:
    """Records -> Dataset of transformed rows; Ray Data's CPU use is capped at ``data.cpus``.

    One dataset serves a whole stage: ``epochs`` epochs of ``rows_per_epoch`` rows each (default:
    every record once), in a fresh order per epoch when ``train``. The loop counts an epoch's
    steps itself, so the next epoch's rows are decoded while the previous one ends, and the
    pipeline is planned and started once per stage. ``task_resources``: custom resources every
    decode task also asks for (where it may run; ``cluster.pinned_resources``).
    """
    if not records:
        raise DatasetError("build_dataset: no records")
    configure_data_context(data_cfg.cpus,
                           block_bytes=block_rows(data_cfg, tasks, smallest_object_store()) * row_bytes(data_cfg, tasks))
    plan = StreamPlan(n_records=len(records), rows_per_epoch=rows_per_epoch or len(records), epochs=epochs,
                      shuffle=train, seed=seed)
    # Positions as blocks made here, not ray.data.range: a read task asks for a whole CPU and, where
    # the map asks for less, runs as its own operator that can hold the data budget (or wait for a
    # CPU training holds) while the map starves. Put from here, not ray.data.from_numpy, whose
    # conversion tasks ask for a CPU each: where the head has no CPU, the autoscaler starts a
    # worker node for them, of any type (a GPU node of a type the job does not use).
    positions = np.array_split(np.arange(plan.total_rows, dtype=np.int64), read_blocks(plan, data_cfg))
    ds = ray.data.from_blocks([pa.table({"data": p}) for p in positions])
    table = ray.put(RecordTable(records))
    return ds.map(LoadRows(table, plan, RowSettings.of(data_cfg), tasks, train), num_cpus=map_cpus(data_cfg),
                  **({"resources": task_resources} if task_resources else {}))


# ----------------------------------------------------------------------------- batches


class BatchCollate(NumpyBatchCollateFn):
    """Ray Data's collate: numpy columns -> the training batch (``collate.collate_rows``)."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = list(tasks)

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return collate_rows(batch, self.tasks)


def iter_train_batches(shard_or_dataset, tasks, batch_size: int, device="cpu", drop_last: bool = False,
                       local_shuffle_buffer_size: int | None = None):
    """Batches of §3 from a DataIterator (``get_dataset_shard``) or a Dataset, on `device`.

    Every batch is yielded, also one whose rows were all bad (zero images, `skipped` > 0):
    data-parallel ranks must see the same number of batches, and the training loop skips
    such a step on every rank together.
    """
    batches = shard_or_dataset.iter_torch_batches(
        batch_size=batch_size, collate_fn=BatchCollate(tasks), prefetch_batches=1, drop_last=drop_last, device="cpu",
        local_shuffle_buffer_size=local_shuffle_buffer_size)
    for batch in batches:
        yield batch_to_device(batch, device)
