"""Figures and result tables shared by the trainer and the experiments.

* the trainer's curves: ``metrics.jsonl`` -> one PNG (:func:`plot_metrics`);
* building blocks the experiments (``dftkern.experiments.bandit``, ``.length_study``, ``.dft_study``) draw with:
  :func:`pyplot` (matplotlib on the Agg backend, no display needed), :func:`subplot_grid`,
  :func:`plot_mean_band`, :func:`save_figure`;
* numbers over seeds (plain float64 Python, no SciPy): :func:`mean_sd`, :func:`format_mean_sd`,
  :func:`paired_difference` (paired t-test, optionally with a confidence interval), :func:`sign_test`
  (exact binomial), Student's t by :func:`student_t_two_sided_p` / :func:`student_t_quantile` on
  :func:`regularized_incomplete_beta`, and :func:`markdown_table`. Every experiment
  (``bandit``, ``length_study``, ``dft_study``) takes its statistics from here.

matplotlib is imported only when a figure is drawn (it is part of the ``train`` extra).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "read_metrics",
    "plot_metrics",
    "metric_panels",
    "pyplot",
    "subplot_grid",
    "plot_mean_band",
    "save_figure",
    "mean_sd",
    "format_mean_sd",
    "regularized_incomplete_beta",
    "student_t_two_sided_p",
    "student_t_quantile",
    "paired_difference",
    "sign_test",
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
    (("clip_fraction_low", "clip_fraction_high"), "PPO clip fraction"),
    (("ratio_mean",), "importance ratio"),
    (("kl_mean",), "KL to initial model (k3)"),
    (("entropy_mean",), "token entropy"),
    (("neg_frac_correct", "neg_frac_equal_positive"), "negatives: fraction correct / equal to the answer"),
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


def metric_panels(records: list[dict]) -> list[tuple[tuple[str, ...], str]]:
    """The ``(metric keys, panel title)`` of :func:`plot_metrics`'s panels for these records: every
    known panel with at least one of its keys in some record, in a fixed order."""
    return [(keys, name) for keys, name in _PANELS if any(k in r for r in records for k in keys)]


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw every known metric present in ``metrics_path`` against ``step`` and save a PNG."""
    records = read_metrics(metrics_path)
    panels = metric_panels(records)
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
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0.0 for one value).

    float64: ``mean = fsum(v) / n``, ``sd = sqrt(fsum((v - mean)^2) / (n - 1))`` (``math.fsum``: exactly
    rounded sums).
    """
    values = _floats(values, "values")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_sd(values, digits: int = 3, *, signed: bool = False) -> str:
    """``"mean ± sd"`` (just ``"mean"`` for a single value), ``digits`` decimals, ``+`` sign if ``signed``."""
    values = _floats(values, "values")
    mean, sd = mean_sd(values)
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {sd:.{digits}f}"


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``0 <= x <= 1`` and ``a, b > 0`` (float64, ~1e-14 relative).

    The continued fraction of DLMF 8.17.22, evaluated with the modified Lentz method; above
    ``x = (a + 1) / (a + b + 2)``, where it converges slowly, through ``I_x(a, b) = 1 - I_{1-x}(b, a)``.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a * _lentz(x, a, b)


def _lentz(x: float, a: float, b: float) -> float:
    """``1 / (1 + d1/(1 + d2/(1 + ...)))`` with DLMF 8.17.22's coefficients, by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-16
    # evaluate the fraction b0 + a1/(b1 + a2/(b2 + ...)) with b0 = 0, a1 = 1, b_n = 1, a_{n+1} = d_n
    f = tiny
    c, d = f, 0.0
    for n in range(1, 20_000):
        if n == 1:
            coef = 1.0
        else:
            k = n - 1  # d_k
            m = k // 2
            if k % 2:  # d_{2m+1}
                coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:      # d_{2m}
                coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + coef / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = c * d
        f *= delta
        if n > 1 and abs(delta - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})")


def _check_df(df) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")


def student_t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df >= 1`` degrees of freedom.

    ``= I_{df/(df+t^2)}(df/2, 1/2)`` (:func:`regularized_incomplete_beta`); 1.0 at ``t = 0``, 0.0 at ``|t| = inf``.
    """
    _check_df(df)
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def student_t_quantile(p: float, df: int) -> float:
    """``q`` with ``P(T <= q) = p`` (``0 < p < 1``) for Student's t with integer ``df >= 1``: bisection
    on :func:`student_t_two_sided_p` to ``1e-12`` relative in ``q``."""
    _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    tail = 2.0 * min(p, 1.0 - p)  # two-sided tail of |q|
    lo, hi = 0.0, 1.0
    while student_t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


def _paired_diffs(a, b) -> list[float]:
    a, b = _floats(a, "a"), _floats(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up (same length), got {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b)]


def paired_difference(a, b, *, confidence: float | None = None) -> dict:
    """Paired comparison of ``a[i]`` and ``b[i]`` (e.g. two methods on the same seeds).

    Args:
        confidence: when given (e.g. ``0.95``), also the two-sided t confidence interval of the mean
            difference, ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)``.
    Returns:
        ``{"n", "mean", "sd", "wins"}`` of ``d = a - b`` (``wins``: how many ``d > 0``), plus ``"t"``
        and the two-sided paired t-test ``"p"`` (both ``None`` when ``n < 2``; a non-zero mean with
        zero spread gives ``t = None, p = 0``; all differences 0 give ``t = 0, p = 1``); with
        ``confidence``, ``"ci": [low, high]`` (``None`` when ``n < 2``; ``[mean, mean]`` at zero spread).
    """
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = _paired_diffs(a, b)
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    out = {"n": n, "mean": mean, "sd": sd, "wins": sum(d > 0 for d in diffs), "t": None, "p": None}
    ci = None
    if n > 1:
        if sd == 0.0:
            out["t"], out["p"] = (0.0, 1.0) if mean == 0.0 else (None, 0.0)
            ci = [mean, mean]
        else:
            se = sd / math.sqrt(n)
            out["t"] = mean / se
            out["p"] = student_t_two_sided_p(out["t"], n - 1)
            if confidence is not None:
                half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * se
                ci = [mean - half, mean + half]
    if confidence is not None:
        out["ci"] = ci
    return out


def sign_test(a, b) -> dict:
    """Exact two-sided sign test of ``d = a - b`` (ties dropped).

    Returns:
        ``{"n_pos", "n_neg", "n_ties", "p"}``: ``p = min(1, 2 P(X <= min(n_pos, n_neg)))`` with
        ``X ~ Binomial(n_pos + n_neg, 1/2)``; 1.0 when every pair is a tie.
    """
    diffs = _paired_diffs(a, b)
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return {"n_pos": 0, "n_neg": 0, "n_ties": len(diffs), "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2.0 ** n
    return {"n_pos": pos, "n_neg": neg, "n_ties": len(diffs) - n, "p": min(1.0, 2.0 * tail)}


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
