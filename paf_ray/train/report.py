"""curves.png: loss and metric curves of a run, from rank 0's metrics.jsonl rows."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def plot_curves(rows: list[dict], metric_keys_shown) -> bytes | None:
    """Training losses (per task) and the validation metrics `metric_keys_shown` against the global
    step, as one PNG figure (None when there are no rows)."""
    if not rows:
        return None

    offsets, offset, last_stage, last_step = {}, 0, None, 0
    for row in rows:  # steps restart at 0 in each stage: lay the stages end to end
        if row["stage"] != last_stage:
            if last_stage is not None and row["stage"] not in offsets:
                offset += last_step
            offsets.setdefault(row["stage"], offset)
            last_stage = row["stage"]
        last_step = row.get("step", 0)
    loss_keys = sorted({k for r in rows for k in r if k.startswith("train/loss_")})
    metric_keys = [k for k in metric_keys_shown if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in loss_keys:
        pts = [(offsets[r["stage"]] + r["step"], r[key]) for r in rows if _finite(r.get(key))]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=key.replace("train/loss_", ""))
    axes[0].set_title("training loss (epoch mean)")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    for key in metric_keys:
        pts = [(offsets[r["stage"]] + r["step"], r[key]) for r in rows if _finite(r.get(key))]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    for stage, x in offsets.items():
        for ax in axes:
            ax.axvline(x, color="grey", lw=0.6, ls="--")
        axes[1].text(x, 1.0, f" {stage}", transform=axes[1].get_xaxis_transform(), fontsize=7, va="top")
    axes[1].set_title("validation metrics (%)")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
