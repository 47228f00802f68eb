"""Tests of the shared figure/table helper :mod:`dftkern.train.plotting` (used by the trainer's
curves, the bandit and the length study).

* the Student-t tail against tabulated two-sided 5 % / 1 % critical values and a float64
  numerical integration of the t density;
* the paired difference against a plain restatement, its edge cases and errors;
* mean ± sd formatting, markdown tables;
* figures: a grid with bands and a legend, and the trainer's ``plot_metrics``, written as PNGs.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from dftkern.train import plotting

# two-sided critical values t_{df, alpha} (standard tables): P(|T| >= t) = alpha
_T_TABLE = {
    0.05: {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045},
    0.01: {1: 63.657, 2: 9.925, 4: 4.604, 7: 3.499, 10: 3.169},
}


@pytest.mark.parametrize("alpha", sorted(_T_TABLE))
def test_student_t_tail_matches_tables(alpha):
    for df, t in _T_TABLE[alpha].items():
        # the tables round t to 3 decimals: allow the p-value change of +-0.0005 in t
        assert plotting.student_t_two_sided_p(t, df) == pytest.approx(alpha, rel=2e-3), df
        assert plotting.student_t_two_sided_p(-t, df) == plotting.student_t_two_sided_p(t, df)


def _t_density(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


@pytest.mark.parametrize("df", [1, 2, 3, 6, 11])
def test_student_t_tail_matches_numerical_integration(df):
    for t in (0.3, 1.0, 2.5):
        steps = 20000  # Simpson's rule on [0, t] for P(|T| < t) = 2 * integral
        h = t / steps
        total = _t_density(0, df) + _t_density(t, df)
        total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
        inside = 2 * total * h / 3
        assert plotting.student_t_two_sided_p(t, df) == pytest.approx(1 - inside, abs=1e-9)
    assert plotting.student_t_two_sided_p(0.0, df) == 1.0
    assert plotting.student_t_two_sided_p(math.inf, df) == 0.0


def test_student_t_rejects_bad_arguments():
    with pytest.raises(ValueError, match="df"):
        plotting.student_t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="df"):
        plotting.student_t_two_sided_p(1.0, 2.5)
    with pytest.raises(ValueError, match="NaN"):
        plotting.student_t_two_sided_p(math.nan, 3)


def test_paired_difference_matches_plain_restatement():
    a = [0.91, 0.88, 0.95, 0.90, 0.97]
    b = [0.85, 0.86, 0.90, 0.91, 0.89]
    d = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    out = plotting.paired_difference(a, b)
    assert out["n"] == 5 and out["wins"] == 4
    assert out["mean"] == pytest.approx(mean, abs=1e-15) and out["sd"] == pytest.approx(sd, abs=1e-15)
    assert out["t"] == pytest.approx(mean / (sd / math.sqrt(5)), rel=1e-12)
    assert out["p"] == pytest.approx(plotting.student_t_two_sided_p(out["t"], 4), rel=1e-12)
    assert 0.02 < out["p"] < 0.1  # t = 2.43 with 4 degrees of freedom
    json.dumps(out, allow_nan=False)  # plain JSON (results.json)


def test_paired_difference_edge_cases():
    one = plotting.paired_difference([1.0], [0.5])
    assert one["n"] == 1 and one["t"] is None and one["p"] is None and one["sd"] == 0.0
    same = plotting.paired_difference([1.0, 2.0], [1.0, 2.0])
    assert same["t"] == 0.0 and same["p"] == 1.0 and same["wins"] == 0
    shifted = plotting.paired_difference([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert shifted["p"] == 0.0 and shifted["t"] is None and shifted["wins"] == 3
    json.dumps(shifted, allow_nan=False)
    with pytest.raises(ValueError, match="same length"):
        plotting.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        plotting.paired_difference([], [])


def test_mean_sd_and_formatting():
    assert plotting.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert plotting.mean_sd([4.0]) == (4.0, 0.0)
    assert plotting.format_mean_sd([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert plotting.format_mean_sd(iter([0.5, 0.7]), digits=2, signed=True) == "+0.60 ± 0.14"
    assert plotting.format_mean_sd([-2.8204]) == "-2.820"
    with pytest.raises(ValueError, match="empty"):
        plotting.mean_sd([])


def test_markdown_table():
    text = plotting.markdown_table(["a", "b"], [[1, "x|y"], ["", 2.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "|  | 2.5 |"]
    with pytest.raises(ValueError, match="2 cells"):
        plotting.markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="header"):
        plotting.markdown_table([], [])


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    fig, axes = plotting.subplot_grid(1, 2, panel_size=(3.0, 2.0))
    assert len(axes) == 1 and len(axes[0]) == 2
    line = plotting.plot_mean_band(axes[0][0], [0, 1, 2], [0.1, 0.5, 0.9], [0.0, 0.4, 0.8], [0.2, 0.6, 1.0],
                                   label="band", style="--")
    assert line.get_linestyle() == "--"
    with pytest.raises(ValueError, match="same length"):
        plotting.plot_mean_band(axes[0][1], [0, 1], [0.0])
    with pytest.raises(ValueError, match="low and high"):
        plotting.plot_mean_band(axes[0][1], [0, 1], [0.0, 1.0], [0.0], [1.0])
    path = plotting.save_figure(fig, tmp_path / "grid.png", title="t", legend_from=axes[0][0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "pos_logp": -s, "neg_logp": -2 * s}) + "\n"
                               for s in range(1, 6)) + "\n")
    assert len(plotting.read_metrics(metrics)) == 5
    out = plotting.plot_metrics(metrics, tmp_path / "curves.png", title="run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match="no plottable metrics"):
        plotting.plot_metrics(empty, tmp_path / "none.png")
