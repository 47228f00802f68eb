"""``train --on-policy --loss ppo|grpo|dapo|dr_grpo``: the token-level policy losses in the trainer.

* the trainer's loss on a batch equals a direct :func:`dftkern.fused_policy_loss` call and the
  float64 definition (full logits, group advantages, ratio, clip, k3 KL, entropy, aggregation),
  padded and prompt-shared, with ratios on both sides of both clip bounds;
* runs log the clip fractions, ratio, entropy (and KL with ``kl_beta > 0``); on fresh samples with
  one update per window the ratio is 1 and nothing is clipped; ``--ppo-epochs`` reuses a window
  (old log-probs fixed) so the ratio moves; PPO and GRPO raise the reward of a learnable toy task;
* a run stopped mid-window resumes bit-exactly (the window with its per-token log-probs is saved);
* the settings are validated with messages naming the option.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import dftkern
from dftkern.losses.formulas import group_advantages
from dftkern.train.batching import Row, TrainExample, attach_token_values, collate
from dftkern.train.checkpoint import read_trainer_state
from dftkern.train.cli import build_parser
from dftkern.train.data import build_examples, read_prompt_records, read_sample_records
from dftkern.train.model import PolicyWithLoss, backbone_hidden, lm_head_params, load_causal_lm
from dftkern.train.objectives import Objective, ObjectiveConfig
from dftkern.train.onpolicy import OnPolicyConfig, RowScorer
from dftkern.train.prefix_sharing import collate_shared
from dftkern.train.serialization import load_state, save_state
from dftkern.train.trainer import TrainConfig, train

POLICY_LOSSES = ["ppo", "grpo", "dapo", "dr_grpo"]
MAX_TOKENS = 8


def _cfg(workspace, out, **overrides) -> TrainConfig:
    base = dict(model=str(workspace.model), data=str(workspace.data), out=str(out), loss="ppo", on_policy=True,
                reward="train_helpers:starts_with_one", samples_per_prompt=3, sample_max_new_tokens=4,
                batch_size=4, max_steps=3, lr=1e-3, device="cpu", progress=False, plot=False)
    return TrainConfig(**{**base, **overrides})


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the loss on one batch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(workspace):
    torch.manual_seed(0)
    m = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu")
    with torch.no_grad():  # a non-uniform model: distinct log-probs and entropies
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def policy_examples(workspace, tokenizer, model):
    """4 prompts x 3 samples (the data's answer and two sampled negatives) with rewards, the current
    per-token log-probs shifted by U(-0.6, 0.6) as the sampler's (ratios on both sides of both clip
    bounds) and by U(-1, 1) as the reference's."""
    examples = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(workspace.negatives))
    examples = examples[:4]
    for e, rewards in zip(examples, ([1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.3, 0.3, 0.9], [1.0, 0.2, 0.0])):
        e.rewards = rewards
    scorer = RowScorer(PolicyWithLoss(model, None), pad_token_id=tokenizer.pad_token_id, device="cpu", batch_size=64,
                       packed=False)
    gen = torch.Generator().manual_seed(7)
    for e, rows in zip(examples, scorer.token_logps(examples)):
        e.old_token_logps = [r + (torch.rand(r.shape, generator=gen) - 0.5) * 1.2 for r in rows]
        e.ref_token_logps = [r + (torch.rand(r.shape, generator=gen) - 0.5) * 2.0 for r in rows]
    return examples


def _float64_definition(model, batch, loss: str, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy loss by its definition, float64 throughout (full logits, plain loops), and its
    gradient with respect to the LM-head weight."""
    m64 = copy.deepcopy(model).double()
    logits = m64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp_all = torch.log_softmax(logits, -1)
    entropy_all = -(logp_all.exp() * logp_all).sum(-1)
    rewards = batch.rewards.double()
    centered = rewards - rewards.mean(1, keepdim=True)
    if loss == "dr_grpo":  # Dr. GRPO: no std
        advantages = centered
    else:  # (R - mean) / (unbiased std + 1e-4)
        std = torch.tensor([[math.sqrt(sum((x - sum(row) / len(row)) ** 2 for x in row) / (len(row) - 1))]
                            for row in rewards.tolist()], dtype=torch.float64)
        advantages = centered / (std + 1e-4)
    advantages = advantages.reshape(-1)
    eps_low, eps_high = hp["clip_eps"], hp["clip_eps_high"] if hp["clip_eps_high"] is not None else hp["clip_eps"]
    row_terms = []
    for r in range(batch.labels.shape[0]):
        terms = []
        for t in range(batch.labels.shape[1]):
            y = int(batch.labels[r, t])
            if y == -100:
                continue
            lp = logp_all[r, t, y]
            ratio = torch.exp(lp - batch.old_logps[r, t].double())
            a = advantages[r]
            surr = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
            x = batch.ref_token_logps[r, t].double() - lp
            kl = torch.exp(x) - x - 1
            terms.append(surr + hp["kl_beta"] * kl - hp["entropy_coef"] * entropy_all[r, t])
        row_terms.append(terms)
    if hp["aggregation"] == "token_mean":
        value = sum(sum(t) for t in row_terms) / sum(len(t) for t in row_terms)
    elif hp["aggregation"] == "sequence_mean":
        rows = [sum(t) / len(t) for t in row_terms if t]
        value = sum(rows) / len(rows)
    else:
        value = sum(sum(t) for t in row_terms) / (len(row_terms) * MAX_TOKENS)
    head_grad = torch.autograd.grad(value, lm_head_params(m64)[0])[0]
    return value.detach(), head_grad


@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_trainer_loss_equals_direct_call_and_float64_definition(model, tokenizer, policy_examples, loss):
    config = ObjectiveConfig(loss=loss, kl_beta=0.1, entropy_coef=0.01)
    objective = Objective(config, positive_first=False, max_tokens=MAX_TOKENS)
    hp = config.policy_hparams()
    batch = collate(policy_examples, pad_token_id=tokenizer.pad_token_id, with_rewards=True, with_old_logps=True,
                    with_ref_token_logps=True)
    model.zero_grad(set_to_none=True)
    value, stats = PolicyWithLoss(model, objective)(batch)
    value.backward()
    head_grad = lm_head_params(model)[0].grad.clone()
    model.zero_grad(set_to_none=True)
    assert 0 < float(stats["clip_fraction_low"]) and 0 < float(stats["clip_fraction_high"])  # both bounds bite
    assert set(stats) == {"clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy_mean", "kl_mean",
                          "reward_mean"}

    with torch.no_grad():  # a direct call on the same hidden states
        hidden = backbone_hidden(model, batch)
        scale = "none" if loss == "dr_grpo" else "std"
        direct = dftkern.fused_policy_loss(
            hidden, lm_head_params(model)[0], batch.labels,
            advantages=group_advantages(batch.rewards, scale=scale).reshape(-1), old_logps=batch.old_logps,
            ref_logps=batch.ref_token_logps, max_tokens=MAX_TOKENS if loss == "dr_grpo" else None, **hp)
    torch.testing.assert_close(value.detach(), direct, rtol=0, atol=1e-7)

    reference, reference_grad = _float64_definition(model, batch, loss, hp)
    torch.testing.assert_close(value.detach().double(), reference, rtol=1e-5, atol=1e-6)
    err = (head_grad.double() - reference_grad).abs().max() / reference_grad.abs().max()
    assert err < 1e-4, float(err)


@pytest.mark.parametrize("loss", ["ppo", "grpo"])
def test_prompt_shared_batch_gives_the_same_loss(model, tokenizer, policy_examples, loss):
    objective = Objective(ObjectiveConfig(loss=loss, kl_beta=0.1, entropy_coef=0.01), positive_first=False)
    padded = collate(policy_examples, pad_token_id=tokenizer.pad_token_id, with_rewards=True, with_old_logps=True,
                     with_ref_token_logps=True)
    shared = collate_shared(policy_examples, pad_token_id=tokenizer.pad_token_id, with_rewards=True)
    attach_token_values(shared.loss_batch, policy_examples, None, old_logps=True, ref_token_logps=True)
    with torch.no_grad():
        a, stats_a = PolicyWithLoss(model, objective)(padded)
        b, stats_b = PolicyWithLoss(model, objective)(shared)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_b[key], rtol=1e-5, atol=1e-6)


def test_per_token_values_must_fit_the_rows(tokenizer):
    row = Row((5, 6, 7, 8), 2)  # labels at positions 1, 2: two values
    example = TrainExample(0, "a", [row, row], rewards=[0.0, 1.0],
                           old_token_logps=[torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="example 'a' row 1: 3 values in old_token_logps for 2 label positions"):
        collate([example], pad_token_id=0, with_old_logps=True)
    with pytest.raises(ValueError, match="example 'a' has no ref_token_logps"):
        collate([example], pad_token_id=0, with_ref_token_logps=True)


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------

POLICY_METRICS = ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy_mean", "reward_mean",
                  "sample_reward", "loss", "grad_norm")


def test_fresh_samples_give_ratio_one_and_no_clipping(workspace, tmp_path):
    """One update per fresh window: the sampler's log-probs are the policy's at update time."""
    train(_cfg(workspace, tmp_path / "ppo", loss="ppo", clip_eps=0.01))  # even a tight clip range stays idle
    records = _records(tmp_path / "ppo")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for key in POLICY_METRICS), r
        assert abs(r["ratio_mean"] - 1.0) < 1e-5
        assert r["clip_fraction_low"] == 0.0 and r["clip_fraction_high"] == 0.0
        assert "kl_mean" not in r  # ppo's kl_beta is 0: no reference model
    train(_cfg(workspace, tmp_path / "grpo", loss="grpo"))  # kl_beta 0.04: the initial model scores the samples
    records = _records(tmp_path / "grpo")
    assert abs(records[0]["kl_mean"]) < 1e-6  # step 1: the policy is still the initial model
    assert records[-1]["kl_mean"] > 1e-6 and all(r["kl_mean"] >= 0 for r in records)  # k3 >= 0
    info = json.loads((tmp_path / "grpo" / "train_config.json").read_text())
    assert info["kl_beta"] is None and info["loss"] == "grpo"


def test_ppo_epochs_reuse_each_window_and_move_the_ratio(workspace, tmp_path):
    result = train(_cfg(workspace, tmp_path / "run", ppo_epochs=3, max_steps=6, lr=3e-3))
    records = _records(tmp_path / "run")
    assert len(records) == 6
    for window in (records[:3], records[3:]):  # the same samples and micro-batches three times
        assert len({r["sample_reward"] for r in window}) == 1 and len({r["epoch"] for r in window}) == 1
        assert abs(window[0]["ratio_mean"] - 1.0) < 1e-5  # first pass: fresh samples
        assert all(abs(r["ratio_mean"] - 1.0) > 1e-4 for r in window[1:])  # later passes: the policy moved
    assert records[3]["epoch"] > records[0]["epoch"]
    window = read_trainer_state(result.final_checkpoint)["source"][0]["window"]
    assert len(window) == 4
    for example in window.values():
        assert example.ref_token_logps is None and len(example.old_token_logps) == 3
        for row, values in zip(example.rows, example.old_token_logps):
            assert values.dtype == torch.float32 and values.numel() == row.num_label_positions
            assert bool((values <= 0).all())


@pytest.mark.parametrize("loss, ppo_epochs", [("ppo", 1), ("grpo", 2)])
def test_policy_losses_raise_the_reward(workspace, tmp_path, loss, ppo_epochs):
    train(_cfg(workspace, tmp_path / loss, loss=loss, ppo_epochs=ppo_epochs, samples_per_prompt=4,
               sample_max_new_tokens=3, batch_size=8, max_steps=30, lr=3e-3))
    rewards = [r["sample_reward"] for r in _records(tmp_path / loss)]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.15, rewards  # about 0.05-0.1 -> 0.35-0.45 on this setup


def test_a_policy_run_stopped_mid_window_resumes_bit_exactly(workspace, tmp_path):
    common = dict(loss="grpo", ppo_epochs=2, max_steps=4, lr=3e-3)  # windows: steps 1-2, 3-4
    full = train(_cfg(workspace, tmp_path / "full", **common))
    train(_cfg(workspace, tmp_path / "split", stop_after=3, **common))  # the second window half used
    window = read_trainer_state(tmp_path / "split" / "checkpoints" / "step-00000003")["source"][0]["window"]
    assert all(e.old_token_logps is not None and e.ref_token_logps is not None for e in window.values())
    resumed = train(_cfg(workspace, tmp_path / "split", resume="auto", **common))
    a = load_file(str(full.final_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.final_checkpoint / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _records(tmp_path / "full") == [
        {**r, "tokens_per_s": f["tokens_per_s"], "peak_mem_mb": f["peak_mem_mb"]}
        for r, f in zip(_records(tmp_path / "split"), _records(tmp_path / "full"))]


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def test_first_micro_batch_repeats_each_window_ppo_epochs_times():
    cfg = OnPolicyConfig(reward="addition", refresh_every=2, ppo_epochs=3)
    assert [cfg.first_micro_batch(s, grad_accum=2) for s in range(8)] == [0, 2, 0, 2, 0, 2, 4, 6]
    plain = OnPolicyConfig(reward="addition")
    assert [plain.first_micro_batch(s, grad_accum=3) for s in range(4)] == [0, 3, 6, 9]


ON_POLICY = dict(on_policy=True, reward="addition")


@pytest.mark.parametrize("settings, message", [
    (dict(), r"loss='ppo' \(--loss\) is an on-policy RL loss.*offline, loss must be one of"),
    (dict(ON_POLICY, samples_per_prompt=1), "loss 'ppo' needs at least 2 samples per prompt, got samples_per_prompt=1"),
    (dict(ON_POLICY, loss="rloo", ppo_epochs=2), r"ppo_epochs=2 \(--ppo-epochs\) reuses each window.*not loss='rloo'"),
    (dict(ON_POLICY, offline_mix=0.5), r"offline_mix=0.5 \(--offline-mix\) is not supported with the policy loss"),
    (dict(ON_POLICY, loss="dpo", kl_beta=0.1), r"kl_beta=0.1 \(--kl-beta\): only used by the policy losses"),
    (dict(ON_POLICY, clip_eps=0.0), r"clip_eps must be in \(0, 1e\+06\] \(a number\), got 0.0"),
    (dict(ON_POLICY, clip_eps_high=-0.1), r"clip_eps_high must be in \[0, 1e\+06\] \(a number\) \(or None\), got -0.1"),
    (dict(ON_POLICY, kl_beta=float("nan")), r"kl_beta must be in \[0, 1e\+06\] \(a number\) \(or None\), got nan"),
    (dict(ON_POLICY, entropy_coef=2e6), r"entropy_coef must be in \[-1e\+06, 1e\+06\] \(a number\), got 2000000.0"),
    (dict(ON_POLICY, ppo_epochs=0), r"ppo_epochs must be >= 1 \(an integer\), got 0"),
])
def test_policy_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**dict(model="m", data="d", out="o", loss="ppo"), **settings})


def test_policy_options_on_the_command_line():
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--out", "o", "--on-policy", "--reward", "addition"]
    args = vars(parser.parse_args([*base, "--loss", "dapo", "--clip-eps", "0.1", "--clip-eps-high", "0.3",
                                   "--kl-beta", "0.05", "--entropy-coef", "0.001", "--ppo-epochs", "4"]))
    assert (args["loss"], args["clip_eps"], args["clip_eps_high"], args["kl_beta"], args["entropy_coef"],
            args["ppo_epochs"]) == ("dapo", 0.1, 0.3, 0.05, 0.001, 4)
    defaults = vars(parser.parse_args(base))
    assert (defaults["clip_eps"], defaults["clip_eps_high"], defaults["kl_beta"], defaults["entropy_coef"],
            defaults["ppo_epochs"]) == (0.2, None, None, 0.0, 1)
    help_text = " ".join(parser.format_help().split())
    assert "0.04 (grpo)" in help_text and "0.28 (dapo)" in help_text  # per-loss defaults from the registry
    names = {k: v for k, v in args.items() if k in ("loss", "clip_eps", "clip_eps_high", "kl_beta", "entropy_coef")}
    assert ObjectiveConfig(**names).policy_hparams() == dict(clip_eps=0.1, clip_eps_high=0.3, kl_beta=0.05,
                                                             entropy_coef=0.001, aggregation="token_mean")


def test_windows_saved_before_per_token_log_probs_still_load(tmp_path):
    example = TrainExample(0, "a", [Row((1, 2, 3), 1)], rewards=[1.0])
    stem = tmp_path / "state"
    save_state(stem, {"window": {0: example}})
    json_path = tmp_path / "state.json"
    text = json_path.read_text().replace(', "old_token_logps": null, "ref_token_logps": null', "")
    assert "old_token_logps" not in text
    json_path.write_text(text)  # the record as written before the fields existed
    loaded = load_state(stem)["window"][0]
    assert loaded == example and loaded.old_token_logps is None


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_with_double_batch(workspace, tmp_path):
    """GRPO under torchrun (2 processes x 2 prompts, FSDP2, gloo): the sampler's per-token log-probs
    are scored through the sharded wrapper in lockstep, the reference by each rank's frozen copy;
    the same weights as 1 process x 4 prompts (sample seeds depend on the prompt, not the rank)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from train_helpers import subprocess_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--model", str(workspace.model), "--data", str(workspace.data), "--loss", "grpo", "--on-policy",
            "--reward", "train_helpers:starts_with_one", "--samples-per-prompt", "3", "--sample-max-new-tokens", "4",
            "--ppo-epochs", "2", "--max-steps", "3", "--lr", "3e-3", "--device", "cpu", "--no-progress", "--no-plot"]
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])  # the reward's module
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "dftkern.train", "train", *args, "--batch-size", "2",
               "--out", str(tmp_path / "fsdp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = train(_cfg(workspace, tmp_path / "single", loss="grpo", ppo_epochs=2, lr=3e-3))
    a = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = load_file(str(single.final_checkpoint / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)
    fsdp, one = _records(tmp_path / "fsdp"), _records(tmp_path / "single")  # the same samples
    assert [r["sample_reward"] for r in fsdp] == pytest.approx([r["sample_reward"] for r in one], abs=1e-9)
    # (token means such as ratio_mean are per-rank means averaged over ranks, so they differ slightly)
