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
