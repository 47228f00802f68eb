"""Built-in rewards (``--reward NAME``) and the offline mix of on-policy training (``--offline-mix``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dftkern.train import onpolicy
from dftkern.train.checkpoint import read_trainer_state
from dftkern.train.cli import build_parser, main
from dftkern.train.rewards import LengthPeakReward, resolve_reward
from dftkern.train.synthetic import addition_reward
from dftkern.train.trainer import TrainConfig, train

# -- rewards registry -------------------------------------------------------------------------------


def test_builtin_rewards_score_as_documented():
    exact = resolve_reward("exact_match")
    assert exact("1+1=", " 2 ", "2") == 1.0 and exact("1+1=", "3", "2") == 0.0
    assert resolve_reward("addition") is addition_reward
    assert resolve_reward("addition")("12+30=", "42", "wrong reference ignored") == 1.0
    neg = resolve_reward("neg_length")
    assert neg("p", "", "r") == 0.0 and neg("p", "1234", "r") == -4.0
    peak = resolve_reward("length_peak:3")
    assert isinstance(peak, LengthPeakReward) and (peak.mu, peak.width) == (3.0, 2.0)
    assert peak("p", "abc", "r") == 1.0
    assert peak("p", "abcde", "r") == pytest.approx(math.exp(-1.0))  # (5 - 3) / 2 = 1
    narrow = resolve_reward("length_peak:3:0.5")
    assert narrow("p", "abcd", "r") == pytest.approx(math.exp(-4.0))
    assert resolve_reward("  neg_length ")("p", "ab", "r") == -2.0  # surrounding spaces tolerated


def test_module_function_rewards_still_load():
    fn = resolve_reward("train_helpers:starts_with_one")
    assert fn("p", "12", "r") == 1.0 and fn("p", "21", "r") == 0.0
    assert resolve_reward("dftkern.train.synthetic:addition_reward") is addition_reward


@pytest.mark.parametrize("spec, message", [
    ("exact", "not a built-in reward"),
    ("", "must be a built-in reward"),
    ("length_peak", "expected length_peak:MU or length_peak:MU:WIDTH"),
    ("length_peak:", "expected length_peak:MU or length_peak:MU:WIDTH"),
    ("length_peak:1:2:3", "expected length_peak:MU or length_peak:MU:WIDTH"),
    ("length_peak:three", "MU must be a number, got 'three'"),
    ("length_peak:3:wide", "WIDTH must be a number, got 'wide'"),
    ("length_peak:inf", "MU must be finite"),
    ("length_peak:-1", "MU must be >= 0"),
    ("length_peak:3:0", "WIDTH must be > 0"),
    ("no_such_module:f", "cannot import module 'no_such_module'"),
    ("dftkern.train.rewards:missing", "has no callable 'missing'"),
    ("a:b:c", "must look like 'package.module:function'"),
])
def test_bad_reward_names_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


# -- offline mix: configuration ---------------------------------------------------------------------


def _cfg(workspace, out, **overrides) -> TrainConfig:
    base = dict(model=str(workspace.model), data=str(workspace.data), out=str(out), loss="dft", on_policy=True,
                reward="addition", samples_per_prompt=2, sample_max_new_tokens=4, batch_size=4, max_steps=4,
                refresh_every=2, lr=1e-3, device="cpu", progress=False, plot=False,
                negatives=str(workspace.negatives), ref_logps=str(workspace.ref_cache), offline_mix=0.5)
    return TrainConfig(**{**base, **overrides})


def test_offline_mix_settings_are_validated(workspace, tmp_path):
    with pytest.raises(ValueError, match="no offline source: pass negatives"):
        _cfg(workspace, tmp_path, negatives=None, ref_logps=None)
    with pytest.raises(ValueError, match="only used with on_policy"):
        _cfg(workspace, tmp_path, on_policy=False, reward=None)
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="offline_mix .* must be a number in \\[0, 1\\)"):
            _cfg(workspace, tmp_path, offline_mix=bad)
    with pytest.raises(ValueError, match="rounds down to 0 offline examples"):
        _cfg(workspace, tmp_path, offline_mix=0.2)  # floor(0.2 * 4) == 0
    with pytest.raises(ValueError, match="drop negatives/ref_logps"):
        _cfg(workspace, tmp_path, offline_mix=0.0)  # negatives without a mix stay an error
    with pytest.raises(ValueError, match="not a built-in reward"):
        _cfg(workspace, tmp_path, reward="exactmatch")
    with pytest.raises(ValueError, match="needs 3 negatives per prompt"):  # the file has K=2
        train(_cfg(workspace, tmp_path / "k", samples_per_prompt=3))


def test_cli_parses_reward_names_and_offline_mix(capsys):
    base = ["train", "--model", "m", "--data", "d", "--out", "o", "--on-policy"]
    args = build_parser().parse_args(base + ["--reward", "length_peak:3:1.5", "--offline-mix", "0.25"])
    assert args.reward == "length_peak:3:1.5" and args.offline_mix == 0.25
    assert build_parser().parse_args(base).offline_mix == 0.0
    for bad in ("1", "-0.5", "half"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--offline-mix", bad])
        assert "must be a number in [0, 1)" in capsys.readouterr().err


def test_cli_reports_an_unknown_reward_as_one_error_line(workspace, tmp_path, capsys):
    status = main(["train", "--model", str(workspace.model), "--data", str(workspace.data), "--out",
                   str(tmp_path / "o"), "--loss", "rloo", "--on-policy", "--reward", "length_peak:x",
                   "--device", "cpu", "--no-progress", "--no-plot"])
    assert status == 2
    assert "MU must be a number, got 'x'" in capsys.readouterr().err


# -- offline mix: training --------------------------------------------------------------------------


def _record_sources(monkeypatch) -> list[tuple[int, int]]:
    """Patch OnPolicyExamples.examples to log (#offline, #on-policy) examples of every micro-batch."""
    seen = []
    original = onpolicy.OnPolicyExamples.examples

    def spy(self, indices):
        examples = original(self, indices)
        offline = sum(any(e is o for o in self.offline or ()) for e in examples)
        seen.append((offline, len(examples) - offline))
        return examples

    monkeypatch.setattr(onpolicy.OnPolicyExamples, "examples", spy)
    return seen


def test_dft_offline_mix_uses_both_sources_and_resumes_bit_exactly(workspace, tmp_path, monkeypatch):
    seen = _record_sources(monkeypatch)
    full = train(_cfg(workspace, tmp_path / "full"))
    assert seen == [(2, 2)] * 4  # floor(0.5 * 4) offline examples in each of the 4 micro-batches
    state = read_trainer_state(full.final_checkpoint)
    window = state["source"][0]["window"]
    assert len(window) <= 4  # only the on-policy half of the last window (2 steps x 2) was sampled
    for example in window.values():
        assert len(example.rows) == 3 and len(example.ref_logps) == 3  # good answer + 2 fresh samples
    assert "sample_reward" in full.last_metrics and "omega_mean" in full.last_metrics

    seen.clear()
    train(_cfg(workspace, tmp_path / "split", stop_after=3))  # stopped inside the window of steps 3-4
    resumed = train(_cfg(workspace, tmp_path / "split", resume="auto"))
    assert len(seen) == 4 and resumed.steps == 4
    a = load_file(str(full.final_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.final_checkpoint / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    split_log = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in full_log] == [json.loads(line)["loss"] for line in split_log]


def test_offline_mix_changes_the_run(workspace, tmp_path):
    """The mix is not a no-op: mixed and purely on-policy runs end with different weights."""
    mixed = train(_cfg(workspace, tmp_path / "mixed", max_steps=1))
    pure = train(_cfg(workspace, tmp_path / "pure", max_steps=1, offline_mix=0.0, negatives=None, ref_logps=None))
    a = load_file(str(mixed.final_checkpoint / "model.safetensors"))
    b = load_file(str(pure.final_checkpoint / "model.safetensors"))
    assert any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("loss, rows", [("rloo", 2), ("dpo", 2)])
def test_offline_examples_take_the_on_policy_layout(workspace, tokenizer, tmp_path, monkeypatch, loss, rows):
    seen = _record_sources(monkeypatch)
    captured = []
    original = onpolicy.OnPolicyExamples.examples

    def keep(self, indices):
        examples = original(self, indices)
        captured.append((examples, self.offline))
        return examples

    monkeypatch.setattr(onpolicy.OnPolicyExamples, "examples", keep)
    result = train(_cfg(workspace, tmp_path / loss, loss=loss, max_steps=1, refresh_every=1,
                        offline_mix=0.75))  # floor(0.75 * 4) = 3 offline, 1 fresh
    assert seen == [(3, 1)]
    examples, offline = captured[0]
    samples = {r["prompt_id"]: r for r in map(json.loads, workspace.negatives.read_text().splitlines())}
    for example in examples:
        assert len(example.rows) == rows
        if not any(example is o for o in offline):
            continue
        sample = samples[example.prompt_id]
        texts = [tokenizer.decode(r.input_ids[r.prompt_len:], skip_special_tokens=True) for r in example.rows]
        if loss == "rloo":  # the two offline negatives with their stored rewards, no good answer
            assert example.rewards == sample["rewards"][:2]
            assert texts == sample["responses"][:2]
        else:  # (good answer, first negative) with the cached reference log-probs
            assert texts[1] == sample["responses"][0] and len(example.ref_logps) == 2
    assert math.isfinite(result.last_metrics["loss"])
