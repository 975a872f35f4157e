"""The Pareto front of a multi-objective sweep (`tune.metric` lists several report keys).

A trial is on the front when no other trial is at least as good on every metric and better on
one. Only trials with a final value of every metric take part: completed trials (an early-stopped
trial's metrics are those of an earlier epoch), or, when none completed, the trials that reported
them. The front is ordered best first by the first metric. This module computes the front and
draws it; tune/search.py writes pareto.csv, pareto.md, pareto.png and one best-<k>.yaml per front
trial.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from paf_ray.tune import space  # noqa: E402


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _signed(row: dict, metrics: list[str], modes: list[str]) -> tuple[float, ...]:
    """The row's metrics, each turned so that larger is better."""
    return tuple(_value(row, m) * (1.0 if mode == "max" else -1.0) for m, mode in zip(metrics, modes))


def dominates(a: dict, b: dict, metrics: list[str], modes: list[str]) -> bool:
    """`a` is at least as good as `b` on every metric and better on one."""
    sa, sb = _signed(a, metrics, modes), _signed(b, metrics, modes)
    return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))


def candidates(rows: list[dict], metrics: list[str]) -> list[dict]:
    """The trials that take part: completed ones with every metric; if none, any non-error ones with every metric."""
    valued = [r for r in rows if r.get("status") != "error" and all(_value(r, m) is not None for m in metrics)]
    completed = [r for r in valued if r.get("status") == "completed"]
    return completed or valued


def pareto_front(rows: list[dict], metrics: list[str], modes: list[str]) -> list[dict]:
    """The non-dominated trials, best first by the first metric (then by the others)."""
    pool = candidates(rows, metrics)
    front = [r for r in pool if not any(dominates(o, r, metrics, modes) for o in pool if o is not r)]
    return sorted(front, key=lambda r: tuple(-v for v in _signed(r, metrics, modes)))


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest tail that no other key ends with (train.stages.0.lr -> 0.lr)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[key] = tail
    return out


def label_keys(front: list[dict], params: list[str]) -> list[str]:
    """The sampled values that tell the front's trials apart (all of them for a front of one)."""
    if len(front) < 2:
        return list(params)
    return [p for p in params if len({space.display_value(r.get(p)) for r in front}) > 1] or list(params)


def point_label(row: dict, keys: list[str], names: dict[str, str]) -> str:
    return ", ".join(f"{names[k]}={space.display_value(row.get(k))}" for k in keys)


def _log_scale(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20


def plot_front(rows: list[dict], front: list[dict], metrics: list[str], modes: list[str], params: list[str],
               title: str) -> bytes:
    """pareto.png: every trial with values of the first two metrics (the first up, the second across),
    the front highlighted and marked `best-<k>`, and under the plot each front trial's sampled values."""
    y_key, x_key = metrics[0], metrics[1]
    keys, names = label_keys(front, params), short_keys(params)
    captions = [f"best-{k}: {point_label(r, keys, names)}" for k, r in enumerate(front, start=1)]
    fig = plt.figure(figsize=(9, 5.5 + 0.2 * len(captions)))
    plot_share = 5.5 / (5.5 + 0.2 * len(captions))
    ax = fig.add_axes((0.1, 1 - plot_share * 0.9, 0.85, plot_share * 0.8))
    shown = [r for r in rows if _value(r, x_key) is not None and _value(r, y_key) is not None]
    on_front = {id(r) for r in front}
    for status, face in (("completed", "0.55"), ("stopped", "none")):
        pts = [(_value(r, x_key), _value(r, y_key)) for r in shown if r.get("status") == status and id(r) not in on_front]
        if pts:
            ax.scatter(*zip(*pts), s=40, facecolors=face, edgecolors="0.4",
                       label=f"{status} trials" + (" (metrics of an earlier epoch)" if status == "stopped" else ""))
    if front:
        line = sorted(front, key=lambda r: _value(r, x_key))
        ax.plot([_value(r, x_key) for r in line], [_value(r, y_key) for r in line], color="tab:red", lw=0.8, ls="--")
        ax.scatter([_value(r, x_key) for r in front], [_value(r, y_key) for r in front], s=70, color="tab:red",
                   zorder=3, label="Pareto front")
        for k, r in enumerate(front, start=1):
            ax.annotate(f"best-{k}", (_value(r, x_key), _value(r, y_key)), textcoords="offset points",
                        xytext=(6, 4), fontsize=8, color="tab:red")
    if _log_scale([_value(r, x_key) for r in shown]):
        ax.set_xscale("log")
    word = {"max": "higher is better", "min": "lower is better"}
    ax.set_xlabel(f"{x_key} ({word[modes[1]]})")
    ax.set_ylabel(f"{y_key} ({word[modes[0]]})")
    if len(metrics) > 2:
        title += f"\nfront over {len(metrics)} metrics ({', '.join(metrics)}); the axes show the first two"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.text(0.02, 0.02, "\n".join(captions), fontsize=8, family="monospace", va="bottom", color="tab:red")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def front_rows(front: list[dict], metrics: list[str], params: list[str], shown: list[str]) -> list[dict[str, Any]]:
    """pareto.csv / pareto.md rows: k, its job file, the trial, the objectives, the sampled values, the other shown metrics."""
    out = []
    for k, r in enumerate(front, start=1):
        row: dict[str, Any] = {"k": k, "config": f"best-{k}.yaml", "trial": r["trial"], "status": r["status"]}
        row.update({key: r.get(key) for key in metrics})
        row.update({key: r.get(key) for key in params})
        row.update({key: r.get(key) for key in shown if key not in row})
        out.append(row)
    return out
