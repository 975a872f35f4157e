"""The keys of a per-epoch report, in one place: what the training loop reports (rank 0's row in
``metrics.jsonl``, TensorBoard, Tune's results, MLflow) and what ``tune.metric`` / ``tune.pick``
may name.

A report row holds ``stage``, ``epoch``, ``step``, ``global_step`` and these metrics:

    score                   the model-selection scalar (eval/evaluator.py)
    <task>/<metric>         each task's evaluation metrics, percent (tasks/<task>.py: compute)
    train/loss_<name>       the epoch's mean training losses
    train/img_s, train/epoch_s, data/skipped
    cost/trainable_params   parameters the stage trains
    cost/step_ms            the median training step of the epoch on one worker (rank 0), ms
    cost/peak_mem_mb        the worker's peak memory: CUDA max allocated, or on CPU the process's peak RSS
    cost/gflops             one eval forward of the model at data.input_size, batch 1 (models/inspect.py)
"""

from __future__ import annotations

from typing import Iterable

SCORE = "score"

TRAIN_LOSS_PREFIX = "train/loss_"
TRAIN_IMG_S = "train/img_s"
TRAIN_EPOCH_S = "train/epoch_s"
DATA_SKIPPED = "data/skipped"

COST_TRAINABLE_PARAMS = "cost/trainable_params"
COST_STEP_MS = "cost/step_ms"
COST_PEAK_MEM_MB = "cost/peak_mem_mb"
COST_GFLOPS = "cost/gflops"
COST_KEYS = (COST_TRAINABLE_PARAMS, COST_STEP_MS, COST_PEAK_MEM_MB, COST_GFLOPS)

# the report's fixed metric keys (besides the tasks' own and the per-loss keys)
REPORT_KEYS = (SCORE, *COST_KEYS, TRAIN_IMG_S, TRAIN_EPOCH_S, DATA_SKIPPED)


def is_report_key(key: str, task_names: Iterable[str]) -> bool:
    """Whether `key` is a metric a per-epoch report of a model with these tasks carries."""
    if key in REPORT_KEYS:
        return True
    if key.startswith(TRAIN_LOSS_PREFIX) and len(key) > len(TRAIN_LOSS_PREFIX):
        return True
    prefix, _, rest = key.partition("/")
    return bool(rest) and prefix in set(task_names)


def describe_report_keys(task_names: Iterable[str]) -> str:
    """The keys `is_report_key` accepts, in words (for error messages)."""
    return f"{', '.join(REPORT_KEYS)}, {TRAIN_LOSS_PREFIX}<loss>, or <task>/<metric> of {', '.join(task_names)}"
