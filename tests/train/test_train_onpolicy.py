"""--on-policy training: it learns, builds the right rows per loss, resumes bit-exactly, validates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dftkern.train.checkpoint import read_trainer_state
from dftkern.train.trainer import TrainConfig, train


def _cfg(workspace, out, **overrides) -> TrainConfig:
    base = dict(model=str(workspace.model), data=str(workspace.data), out=str(out), loss="rloo", on_policy=True,
                reward="dftkern.train.synthetic:addition_reward", samples_per_prompt=3, sample_max_new_tokens=4,
                batch_size=4, max_steps=2, lr=1e-3, device="cpu", progress=False, plot=False)
    return TrainConfig(**{**base, **overrides})


def test_rloo_on_policy_raises_the_reward(workspace, tmp_path):
    result = train(_cfg(workspace, tmp_path / "rl", reward="train_helpers:starts_with_one", samples_per_prompt=4,
                        sample_max_new_tokens=3, batch_size=8, max_steps=30, lr=3e-3))
    lines = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    rewards = [json.loads(line)["sample_reward"] for line in lines]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards  # about 0.1 -> 0.4 on this setup
    assert "sample_logp" in result.last_metrics and "pos_logp" not in result.last_metrics


@pytest.mark.parametrize("loss, rows", [("rloo", 3), ("dft", 4), ("dpo", 2)])
def test_each_loss_gets_its_rows_from_fresh_samples(workspace, tokenizer, tmp_path, loss, rows):
    result = train(_cfg(workspace, tmp_path / loss, loss=loss, refresh_every=2))
    window = read_trainer_state(result.final_checkpoint)["source"][0]["window"]
    assert len(window) == 8  # one window: the 2 steps x 4 prompts
    answers = {r["id"]: r["response"] for r in map(json.loads, workspace.data.read_text().splitlines())}
    for example in window.values():
        assert len(example.rows) == rows and len(example.rewards) == rows
        first = example.rows[0]
        first_text = tokenizer.decode(first.input_ids[first.prompt_len:], skip_special_tokens=True)
        if loss in ("dft", "dpo"):  # the random model never answers right: the data's answer leads
            assert first_text == answers[example.prompt_id] and example.rewards[0] == 1.0
            assert example.ref_logps is not None and len(example.ref_logps) == rows
        else:
            assert example.ref_logps is None
    assert "sample_reward" in result.last_metrics


def test_on_policy_run_stopped_mid_window_resumes_bit_exactly(workspace, tmp_path):
    common = dict(loss="dft", refresh_every=2, max_steps=4)
    full = train(_cfg(workspace, tmp_path / "full", **common))
    train(_cfg(workspace, tmp_path / "split", stop_after=3, **common))  # window of steps 3-4 half used
    resumed = train(_cfg(workspace, tmp_path / "split", resume="auto", **common))
    a, b = load_file(str(full.final_checkpoint / "model.safetensors")), \
        load_file(str(resumed.final_checkpoint / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_on_policy_settings_are_validated(workspace, tmp_path):
    with pytest.raises(ValueError, match="needs reward='module:function'"):
        _cfg(workspace, tmp_path, reward=None)
    with pytest.raises(ValueError, match="supports the losses .* not 'sft'"):
        _cfg(workspace, tmp_path, loss="sft")
    with pytest.raises(ValueError, match="drop negatives/ref_logps"):
        _cfg(workspace, tmp_path, negatives=str(workspace.negatives))
    with pytest.raises(ValueError, match="only used with on_policy"):
        _cfg(workspace, tmp_path, on_policy=False)
    with pytest.raises(ValueError, match="temperature > 0"):
        _cfg(workspace, tmp_path, sample_temperature=0.0)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        train(_cfg(workspace, tmp_path / "r", reward="no_such_module:f"))


def _window_scores(workspace, tokenizer, checkpoint):
    """The final window's examples, their stored ref_logps, and the initial model's sequence log-probs of their rows."""
    from dftkern.train.model import load_causal_lm
    from dftkern.train.ref_logps import score_examples

    window = list(read_trainer_state(checkpoint)["source"][0]["window"].values())
    base = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu", dtype=torch.float32)
    initial, _ = score_examples(base, window, pad_token_id=tokenizer.pad_token_id)
    return window, torch.tensor([e.ref_logps for e in window]), initial


@pytest.mark.parametrize("loss", ["dpo", "dft"])
def test_on_policy_reference_initial_scores_with_the_frozen_initial_model(workspace, tokenizer, tmp_path, loss):
    common = dict(loss=loss, max_steps=4, lr=3e-3)
    moving = train(_cfg(workspace, tmp_path / "sampler", **common))
    fixed = train(_cfg(workspace, tmp_path / "initial", on_policy_reference="initial", **common))
    _, stored, initial = _window_scores(workspace, tokenizer, fixed.final_checkpoint)
    assert torch.allclose(stored, initial, atol=1e-5, rtol=0)  # the last window (step 4) still has the initial model's
    _, stored, initial = _window_scores(workspace, tokenizer, moving.final_checkpoint)
    assert (stored - initial).abs().max() > 1e-3  # by default: the policy after 3 updates
    config = json.loads((tmp_path / "initial" / "train_config.json").read_text())
    assert config["on_policy_reference"] == "initial"
    if loss == "dpo":  # online DPO: one update per window, so a moving reference makes every margin 0
        margins = [json.loads(line)["margin_mean"] for line in (tmp_path / "sampler" / "metrics.jsonl").open()]
        assert all(abs(m) < 1e-4 for m in margins), margins
        margins = [json.loads(line)["margin_mean"] for line in (tmp_path / "initial" / "metrics.jsonl").open()]
        assert abs(margins[0]) < 1e-4 and all(abs(m) > 1e-3 for m in margins[1:]), margins


def test_on_policy_reference_is_validated(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"on_policy_reference='initial' \(--on-policy-reference\) chooses .* "
                                         r"loss='rloo' takes none$"):
        _cfg(workspace, tmp_path, loss="rloo", on_policy_reference="initial")
    with pytest.raises(ValueError, match=r"loss='grpo' takes none \(the policy losses' KL reference"):
        _cfg(workspace, tmp_path, loss="grpo", on_policy_reference="initial")
    with pytest.raises(ValueError, match=r"on_policy_reference \(--on-policy-reference\) must be one of \(.sampler., .initial.\), got .frozen."):
        _cfg(workspace, tmp_path, loss="dpo", on_policy_reference="frozen")
    with pytest.raises(ValueError, match=r"on_policy_reference='initial' \(--on-policy-reference\): only used with "
                                         r"on_policy"):
        _cfg(workspace, tmp_path, loss="dpo", on_policy=False, negatives=str(workspace.negatives),
             on_policy_reference="initial")
