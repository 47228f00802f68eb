"""The trainer's curves: the policy losses' and the negative pool's metrics get their own panels."""

from __future__ import annotations

import json

import pytest

from dftkern.train.plotting import metric_panels, plot_metrics


def test_policy_and_negative_metrics_have_panels(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": s, "loss": 1.0 / s, "clip_fraction_low": 0.01 * s, "clip_fraction_high": 0.02 * s,
                "ratio_mean": 1.0 + 0.001 * s, "kl_mean": 0.01 * s, "entropy_mean": 2.0 - 0.1 * s,
                "neg_frac_correct": 0.5, "neg_frac_equal_positive": 0.25} for s in range(1, 6)]
    assert [name for _, name in metric_panels(records)] == [
        "loss", "PPO clip fraction", "importance ratio", "KL to initial model (k3)", "token entropy",
        "negatives: fraction correct / equal to the answer"]
    assert dict((name, keys) for keys, name in metric_panels(records))["PPO clip fraction"] == \
        ("clip_fraction_low", "clip_fraction_high")
    assert [name for _, name in metric_panels([{"step": 1, "loss": 0.5}])] == ["loss"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_metrics(metrics, tmp_path / "curves.png", title="grpo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# statistics shared by the experiments (the DFT study's among them)
# --------------------------------------------------------------------------------------


def test_paired_difference_confidence_interval_follows_its_definition():
    import math
    import statistics

    from dftkern.train.plotting import paired_difference, student_t_quantile, student_t_two_sided_p

    a = [0.91, 0.88, 0.95, 0.90, 0.97]
    b = [0.85, 0.86, 0.90, 0.91, 0.89]
    d = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    plain = paired_difference(a, b)
    out = paired_difference(a, b, confidence=0.95)
    assert "ci" not in plain and {k: out[k] for k in plain} == plain  # the interval only adds a key
    half = 2.7764451051977987 * sd / math.sqrt(5)  # the textbook t_{0.975, 4}
    assert out["ci"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    narrow = paired_difference(a, b, confidence=0.5)["ci"]
    assert out["ci"][0] < narrow[0] < mean < narrow[1] < out["ci"][1]
    # the interval's edge is where the two-sided test of that mean has p = 1 - confidence
    assert student_t_two_sided_p((mean - out["ci"][0]) / (sd / math.sqrt(5)), 4) == pytest.approx(0.05, rel=1e-9)
    assert student_t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-10)
    assert paired_difference([1.0], [0.5], confidence=0.95)["ci"] is None
    assert paired_difference([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], confidence=0.95)["ci"] == [0.5, 0.5]
    for bad in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="confidence must be in"):
            paired_difference(a, b, confidence=bad)
    with pytest.raises(ValueError, match="df must be an integer"):
        student_t_quantile(0.9, 2.5)
    with pytest.raises(ValueError, match="p must be in"):
        student_t_quantile(1.0, 3)


def test_sign_test_is_the_exact_binomial_tail_of_a_minus_b():
    from math import comb

    from dftkern.train.plotting import sign_test

    # d = a - b: 4 positive, 1 negative, 1 tie
    out = sign_test([2, 1, 3, 4, 5, 7], [1, 2, 1, 1, 5, 0])
    assert (out["n_pos"], out["n_neg"], out["n_ties"]) == (4, 1, 1)
    assert out["p"] == pytest.approx(2 * (comb(5, 0) + comb(5, 1)) / 2 ** 5, rel=1e-15)
    assert sign_test([1] * 5, [0] * 5) == {"n_pos": 5, "n_neg": 0, "n_ties": 0, "p": 0.0625}
    assert sign_test([1, 2], [1, 2]) == {"n_pos": 0, "n_neg": 0, "n_ties": 2, "p": 1.0}
    assert sign_test([0, 1, 0, 1], [1, 0, 1, 0])["p"] == 1.0  # 2 vs 2: capped at 1
    with pytest.raises(ValueError, match="same length"):
        sign_test([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        sign_test([], [])
