"""Figures and result tables shared by the trainer and the experiments.

* the trainer's curves: ``metrics.jsonl`` -> one PNG (:func:`plot_metrics`);
* building blocks the experiments (``dftkern.experiments.bandit``, ``.length_study``) draw with:
  :func:`pyplot` (matplotlib on the Agg backend, no display needed), :func:`subplot_grid`,
  :func:`plot_mean_band`, :func:`save_figure`;
* numbers over seeds: :func:`mean_sd`, :func:`format_mean_sd`, :func:`paired_difference` (paired
  t-test, exact Student-t tail), and :func:`markdown_table`.

matplotlib is imported only when a figure is drawn (it is part of the ``train`` extra).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "read_metrics",
    "plot_metrics",
    "pyplot",
    "subplot_grid",
    "plot_mean_band",
    "save_figure",
    "mean_sd",
    "format_mean_sd",
    "student_t_two_sided_p",
    "paired_difference",
    "markdown_table",
]

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


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplot_grid(rows: int, columns: int, *, panel_size: tuple[float, float] = (4.2, 3.0), **kwargs):
    """A ``rows x columns`` grid of panels of ``panel_size`` inches each.

    Returns:
        ``(figure, axes)`` with ``axes[i][j]`` always two-dimensional (``squeeze=False``).
    """
    if rows < 1 or columns < 1:
        raise ValueError(f"rows and columns must be >= 1, got {rows} x {columns}")
    width, height = panel_size
    return pyplot().subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, **kwargs)


def plot_mean_band(ax, x: Sequence[float], mean: Sequence[float], low: Sequence[float] | None = None,
                   high: Sequence[float] | None = None, *, label: str | None = None, color=None,
                   style: str = "-", marker: str | None = None, linewidth: float = 1.6, alpha: float = 0.15):
    """A mean curve and, when ``low``/``high`` are given, a shaded band between them (same colour).

    ``x``, ``mean``, ``low``, ``high``: equal-length sequences of numbers (or 1-D tensors/arrays).
    Returns the line drawn.
    """
    x, mean = [float(v) for v in x], [float(v) for v in mean]
    if len(x) != len(mean):
        raise ValueError(f"x and mean must have the same length, got {len(x)} and {len(mean)}")
    (line,) = ax.plot(x, mean, style, color=color, label=label, marker=marker, lw=linewidth)
    if low is not None and high is not None:
        low, high = [float(v) for v in low], [float(v) for v in high]
        if not len(low) == len(high) == len(x):
            raise ValueError(f"low and high must have the length of x ({len(x)}), got {len(low)} and {len(high)}")
        ax.fill_between(x, low, high, color=line.get_color(), alpha=alpha, lw=0)
    return line


def save_figure(fig, path: str | os.PathLike, *, title: str | None = None, title_size: float = 10,
                legend_from=None, legend_columns: int | None = None, dpi: int = 110) -> Path:
    """Lay out, save as PNG and close ``fig``.

    Args:
        title: figure-level title.
        legend_from: an axes whose legend entries are drawn once, below all panels.
        legend_columns: columns of that legend (default: one row).
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    bottom = 0.0
    if legend_from is not None:
        handles, labels = legend_from.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=legend_columns or len(labels), fontsize=8,
                       frameon=False)
            bottom = 0.04 * math.ceil(len(labels) / (legend_columns or len(labels)))
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the trainer's curves
# ----------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw every known metric present in ``metrics_path`` against ``step`` and save a PNG."""
    records = read_metrics(metrics_path)
    panels = [(keys, name) for keys, name in _PANELS if any(k in r for r in records for k in keys)]
    if not panels:
        raise ValueError(f"{metrics_path}: no plottable metrics")
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = subplot_grid(rows, columns)
    for ax, (keys, name) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                steps, values = zip(*points)
                plot_mean_band(ax, steps, values, label=key, marker="." if len(points) < 30 else None,
                               linewidth=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, out_path, title=title, title_size=12)


# ----------------------------------------------------------------------------------------------
# numbers over seeds
# ----------------------------------------------------------------------------------------------


def _floats(values, what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0.0 for one value)."""
    values = _floats(values, "values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_sd(values, digits: int = 3, *, signed: bool = False) -> str:
    """``"mean ± sd"`` (just ``"mean"`` for a single value), ``digits`` decimals, ``+`` sign if ``signed``."""
    values = _floats(values, "values")
    mean, sd = mean_sd(values)
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {sd:.{digits}f}"


def student_t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df >= 1`` degrees of freedom.

    Uses the closed forms for integer ``df`` (Abramowitz & Stegun 26.7.3-26.7.4): with
    ``theta = atan(|t| / sqrt(df))`` and ``c = cos(theta)^2``, ``P(|T| < |t|)`` is
    ``sin(theta) * sum_{k=0}^{(df-2)/2} c^k prod_{i=1}^k (2i-1)/(2i)`` for even ``df`` and
    ``(2/pi) (theta + sin(theta) cos(theta) sum_{k=0}^{(df-3)/2} c^k prod_{i=1}^k (2i)/(2i+1))``
    for odd ``df`` (just ``2 theta / pi`` for ``df = 1``).
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= c * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    else:
        total = 0.0
        if df > 1:
            term, total = 1.0, 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c * (2 * k) / (2 * k + 1)
                total += term
        inside = 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return min(1.0, max(0.0, 1.0 - inside))


def paired_difference(a, b) -> dict:
    """Paired comparison of ``a[i]`` and ``b[i]`` (e.g. two methods on the same seeds).

    Returns:
        ``{"n", "mean", "sd", "wins"}`` of ``d = a - b`` (``wins``: how many ``d > 0``), plus ``"t"``
        and the two-sided paired t-test ``"p"`` (both ``None`` when ``n < 2``; a non-zero mean with
        zero spread gives ``t = None, p = 0``; all differences 0 give ``t = 0, p = 1``).
    """
    a, b = _floats(a, "a"), _floats(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up (same length), got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    out = {"n": len(diffs), "mean": mean, "sd": sd, "wins": sum(d > 0 for d in diffs), "t": None, "p": None}
    if len(diffs) > 1:
        if sd == 0.0:
            out["t"], out["p"] = (0.0, 1.0) if mean == 0.0 else (None, 0.0)
        else:
            out["t"] = mean / (sd / math.sqrt(len(diffs)))
            out["p"] = student_t_two_sided_p(out["t"], len(diffs) - 1)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (cells converted with ``str``; ``|`` inside a cell escaped)."""
    if not header:
        raise ValueError("header is empty")

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"every row needs {len(header)} cells, got {len(row)}: {row!r}")
        out.append(line(row))
    return "\n".join(out)
