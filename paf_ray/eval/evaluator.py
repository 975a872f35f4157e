"""Evaluation during training and after: each task's evaluator, gathered over workers, and `score`.

``Evaluator(tasks, heads)`` accumulates one worker's outputs per batch (``update``); its
``state()`` is picklable, ``merge_states`` combines every worker's, and ``compute_metrics``
returns the flat metrics: each task's own keys (``<task>/...``, percent; tasks/base.py) and

    score = the mean over the tasks of their headline metric (negated where lower is better)

the one scalar model selection and Tune rank on. The metric keys tables and logs show come from
the tasks too (``table_metrics``): this module names no task.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from paf_ray.eval.keys import SCORE


class Evaluator:
    """One worker's evaluation of `tasks` (Task objects); `heads` = the model config's head sections."""

    def __init__(self, tasks: Sequence, heads: dict | None = None):
        self.tasks = list(tasks)
        self.evaluators = {t.name: t.evaluator((heads or {}).get(t.name)) for t in self.tasks}

    def update(self, outputs: dict, batch: dict) -> None:
        for name, evaluator in self.evaluators.items():
            if name in outputs:
                evaluator.update(outputs[name], batch)

    def state(self) -> dict[str, Any]:
        return {name: e.state() for name, e in self.evaluators.items()}


def merge_states(tasks: Sequence, states: Sequence[dict]) -> dict[str, Any]:
    """Every worker's Evaluator.state() combined, task by task."""
    return {t.name: t.merge([s[t.name] for s in states]) for t in tasks}


def compute_metrics(tasks: Sequence, state: dict) -> dict[str, float]:
    """Flat, JSON-safe metrics (percent) of a merged state, with `score`; undefined values are left out."""
    flat: dict[str, float] = {}
    for t in tasks:
        flat.update(t.compute(state[t.name]))
    flat[SCORE] = score(flat, tasks)
    return flat


def score(flat: dict[str, float], tasks: Iterable) -> float:
    """Model-selection scalar: the mean of the tasks' headline metrics present in `flat` (0.0 if none)."""
    values = [flat[t.headline] * (1 if t.higher_is_better else -1) for t in tasks if _finite(flat.get(t.headline))]
    return float(sum(values) / len(values)) if values else 0.0


def headline_metrics(tasks: Iterable) -> tuple[str, ...]:
    """The metrics tables, logs, curves and Tune results show: each task's table_metrics, then `score`."""
    return tuple(k for t in tasks for k in t.table_metrics) + (SCORE,)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (recursively) so the result is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
