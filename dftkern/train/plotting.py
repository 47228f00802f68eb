"""Training curves: ``metrics.jsonl`` -> one PNG (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_metrics", "plot_metrics"]

# (metric keys drawn together, panel title); panels whose keys never appear are skipped
_PANELS = (
    (("loss",), "loss"),
    (("pos_logp", "neg_logp", "sample_logp", "eval_pos_logp"), "sequence log-prob"),
    (("omega_mean", "omega_max"), "DFT weights omega"),
    (("u_mean",), "DFT state u (mean)"),
    (("margin_mean",), "pairwise margin"),
    (("reward_mean", "sample_reward"), "reward"),
    (("lr",), "learning rate"),
    (("grad_norm",), "grad norm (before clipping)"),
    (("tokens_per_s",), "tokens / s"),
    (("peak_mem_mb",), "peak memory (MiB)"),
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw every known metric present in ``metrics_path`` against ``step`` and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(keys, name) for keys, name in _PANELS if any(k in r for r in records for k in keys)]
    if not panels:
        raise ValueError(f"{metrics_path}: no plottable metrics")
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, (keys, name) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
