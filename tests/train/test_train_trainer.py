"""Train stage: outputs, bit-exact resume, accumulation, checkpointing option, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_jsonl

from dftkern.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
)
from dftkern.train.trainer import TrainConfig, train, warmup_cosine


def _cfg(workspace, out, **overrides) -> TrainConfig:
    base = dict(model=str(workspace.model), data=str(workspace.data), negatives=str(workspace.negatives),
                out=str(out), loss="dft", batch_size=4, max_steps=3, lr=1e-3, device="cpu", progress=False,
                plot=False)
    return TrainConfig(**{**base, **overrides})


def _weights(checkpoint) -> dict:
    return load_file(str(checkpoint / "model.safetensors"))


def test_dft_run_writes_metrics_checkpoint_plot_and_state(workspace, tmp_path):
    result = train(_cfg(workspace, tmp_path / "run", plot=True, eval_data=str(workspace.heldout), eval_every=2))
    assert result.steps == 3 and result.final_checkpoint == latest_checkpoint(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "pos_logp", "neg_logp", "omega_mean", "omega_max", "u_mean", "lr", "grad_norm",
                "tokens_per_s", "peak_mem_mb"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert "eval_pos_logp" in records[1] and "eval_pos_logp" in records[2] and "eval_pos_logp" not in records[0]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    state = read_trainer_state(result.final_checkpoint)
    assert state["step"] == 3 and state["micro_batch"] == 3
    assert int(state["dft_state"]["num_updates"].sum()) == 12  # 3 steps x 4 examples
    assert set(state) >= {"optimizer", "scheduler", "rng", "config"}
    # the checkpoint is a regular HF model directory, and training changed the weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(result.final_checkpoint))
    AutoTokenizer.from_pretrained(str(result.final_checkpoint))
    base = AutoModelForCausalLM.from_pretrained(str(workspace.model))
    assert not torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


class _Crash(RuntimeError):
    pass


def test_killed_and_resumed_run_ends_with_identical_weights(workspace, tmp_path):
    common = dict(max_steps=7, grad_accum=2, save_every=2, keep_checkpoints=1, lr=3e-3)  # 14 micro-batches: 2+ epochs
    full = train(_cfg(workspace, tmp_path / "full", **common))

    def crash_after_step_5(step, metrics):
        if step == 5:
            raise _Crash()

    with pytest.raises(_Crash):  # dies after step 5; the newest checkpoint is step 4
        train(_cfg(workspace, tmp_path / "resumed", **common), on_step_end=crash_after_step_5)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000004"]
    resumed = train(_cfg(workspace, tmp_path / "resumed", resume="auto", **common))
    assert resumed.steps == 7
    a, b = _weights(full.final_checkpoint), _weights(resumed.final_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = read_trainer_state(full.final_checkpoint), read_trainer_state(resumed.final_checkpoint)
    assert torch.equal(sa["dft_state"]["u"], sb["dft_state"]["u"])
    exp_avg = [s["exp_avg"] for s in sa["optimizer"]["state"].values()]
    assert all(torch.equal(x, s["exp_avg"]) for x, s in zip(exp_avg, sb["optimizer"]["state"].values()))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line)["loss"]
                      for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed_losses == losses  # the step-5 line of the killed run was dropped and redone


def test_gradient_accumulation_equals_one_big_batch(workspace, tmp_path):
    common = dict(loss="sft", negatives=None, max_steps=1, shuffle=False, lr=1e-2, warmup_steps=0)
    big = train(_cfg(workspace, tmp_path / "big", batch_size=8, grad_accum=1, **common))
    small = train(_cfg(workspace, tmp_path / "small", batch_size=4, grad_accum=2, **common))
    a, b = _weights(big.final_checkpoint), _weights(small.final_checkpoint)
    for name in a:  # Adam's first update is ~lr * sign(grad): 1e-5 is 0.1% of a step of lr=1e-2
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert big.last_metrics["loss"] == pytest.approx(small.last_metrics["loss"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_training(workspace, tmp_path, monkeypatch):
    import transformers.modeling_utils as hf_modeling

    calls = []
    real_checkpoint = hf_modeling.checkpoint
    monkeypatch.setattr(hf_modeling, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    common = dict(max_steps=2)
    plain = train(_cfg(workspace, tmp_path / "plain", **common))
    assert not calls
    ckpt = train(_cfg(workspace, tmp_path / "ckpt", gradient_checkpointing=True, **common))
    assert len(calls) == 2 * 2  # 2 steps x 2 decoder layers
    a, b = _weights(plain.final_checkpoint), _weights(ckpt.final_checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_missing_inputs_give_actionable_errors(workspace, tmp_path):
    with pytest.raises(ValueError, match="loss 'dft' needs sampled negatives: pass --negatives"):
        train(_cfg(workspace, tmp_path / "a", negatives=None))
    with pytest.raises(FileNotFoundError, match="needs reference log-probs.*ref-logps"):
        train(_cfg(workspace, tmp_path / "b", ref_logps=str(tmp_path)))
    lines = [json.loads(line) for line in workspace.negatives.read_text().splitlines()]
    for line in lines:
        del line["rewards"], line["positive_reward"]
    no_rewards = write_jsonl(tmp_path / "neg_no_rewards.jsonl", lines)
    with pytest.raises(ValueError, match="needs rewards: generate the negatives with --reward"):
        train(_cfg(workspace, tmp_path / "c", loss="rloo", negatives=str(no_rewards)))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _cfg(workspace, tmp_path / "d", batch_size=0)
    with pytest.raises(ValueError, match="loss must be one of"):
        _cfg(workspace, tmp_path / "e", loss="ppo")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        train(_cfg(workspace, tmp_path / "f", resume=str(tmp_path)))


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
