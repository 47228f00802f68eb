"""The trainer's loss wiring against plain full-logit computations on a real (tiny) HF model.

Covers: reference log-probs, masking (prompt tokens never reach a loss), packed == padded batches,
and each loss family's row layout (DFT groups, DPO pairs, RLOO groups, SFT positives).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dftkern
from dftkern.train.data import (
    IGNORE_INDEX,
    build_examples,
    collate,
    examples_fingerprint,
    read_prompt_records,
    read_sample_records,
)
from dftkern.train.model import PolicyWithLoss, load_causal_lm
from dftkern.train.objectives import LOSS_NAMES, Objective, ObjectiveConfig
from dftkern.train.ref_logps import attach_ref_logps, cache_path


@pytest.fixture(scope="module")
def model(workspace):
    torch.manual_seed(0)
    m = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu")
    # perturb the random init so answers have distinct, non-uniform log-probs
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def examples(workspace, tokenizer):
    ex = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(workspace.negatives))
    attach_ref_logps(ex, workspace.ref_cache)
    return ex


def full_logit_seq_logps(model, batch) -> torch.Tensor:
    """Independent reference: per-row sums of log_softmax(full logits)[label] over non-ignored labels."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, -1)
    mask = batch.labels != IGNORE_INDEX
    token = logp.gather(-1, batch.labels.clamp_min(0)[..., None])[..., 0]
    return (token * mask).sum(1)


def test_reference_cache_matches_full_logits(workspace, tokenizer, examples):
    base = load_causal_lm(str(workspace.model), attn="sdpa", device="cpu")
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = full_logit_seq_logps(base, batch).view(len(examples), -1)
    cached = torch.tensor([e.ref_logps for e in examples])
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-4)
    assert workspace.ref_cache == cache_path(workspace.negatives.parent, examples_fingerprint(examples))
    fewer = build_examples(tokenizer, read_prompt_records(workspace.data), read_sample_records(workspace.negatives),
                           num_negatives=1)
    with pytest.raises(ValueError, match="holds reference log-probs for other rows"):
        attach_ref_logps(fewer, workspace.ref_cache)


def _batch(examples, objective, packed, pad_id=0):
    spec = objective.spec
    return collate(examples, pad_token_id=pad_id, packed=packed, rows=objective.rows,
                   with_ref_logps=spec.needs_ref_logps, with_rewards=spec.needs_rewards)


@pytest.mark.parametrize("loss", ["dft", "dft2", "sft", "dpo", "ipo", "simpo", "unlikelihood", "rloo", "rwr"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(model, examples, loss):
    objective = Objective(ObjectiveConfig(loss=loss))
    wrapper = PolicyWithLoss(model, objective)
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        state = dftkern.DFTState(len(examples)) if objective.spec.family == "dft" else None
        value, _ = wrapper(_batch(examples[:5], objective, packed), state=state)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((value.detach(), grads, state.u.clone() if state else None))
    (v0, g0, u0), (v1, g1, u1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    if u0 is not None:
        torch.testing.assert_close(u1, u0)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("loss", ["sft", "dft", "dpo", "rloo"])
def test_prompt_tokens_never_reach_the_loss(model, examples, loss):
    """d loss / d hidden is exactly zero at every position whose target is a prompt token or padding."""
    objective = Objective(ObjectiveConfig(loss=loss))
    batch = _batch(examples[:4], objective, packed=False)
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = hidden.detach().requires_grad_(True)
    state = dftkern.DFTState(len(examples)) if loss == "dft" else None
    value, _ = objective(hidden, model.lm_head.weight, None, batch, state=state)
    value.backward()
    grad_norm = hidden.grad.norm(dim=-1)
    ignored = batch.labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert (grad_norm[ignored] == 0).all()
    assert (grad_norm[~ignored] > 0).float().mean() > 0.9
    # and the ignored positions are exactly: the prompt minus its last token, the last token, padding
    for r, row in enumerate([e.rows[i] for e in examples[:4] for i in (objective.rows or range(len(e.rows)))]):
        n = len(row.input_ids)
        assert ignored[r, :row.prompt_len - 1].all() and not ignored[r, row.prompt_len - 1:n - 1].any()
        assert ignored[r, n - 1:].all()


def test_dft_objective_matches_the_paper_formula(model, examples):
    k, tau, gamma = 2, 1.0, 0.85
    objective = Objective(ObjectiveConfig(loss="dft"))
    batch = _batch(examples[:4], objective, packed=False)
    state = dftkern.DFTState(len(examples), init=0.0)
    state.u[batch.example_ids] = torch.tensor([0.5, -0.5, 0.0, 1.0])
    u_prev = state.u[batch.example_ids].clone()
    value, stats = PolicyWithLoss(model, objective)(batch, state=state)
    with torch.no_grad():
        s = full_logit_seq_logps(model, batch).view(4, 1 + k)
    ref = batch.ref_logps.view(4, 1 + k)[:, 1:]
    d = s[:, 1:] / tau - ref
    u = torch.logaddexp(math.log(1 - gamma) + u_prev, math.log(gamma) + torch.logsumexp(d, 1) - math.log(k))
    omega = torch.exp(d - u[:, None])
    expected = (-s[:, 0] + (omega * s[:, 1:]).mean(1)).mean()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.u[batch.example_ids], u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["pos_logp"], s[:, 0].mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["omega_mean"], omega.mean(), rtol=1e-4, atol=1e-5)


def test_dpo_objective_pairs_the_positive_with_every_negative(model, examples):
    beta = 0.1
    objective = Objective(ObjectiveConfig(loss="dpo", beta=beta))
    batch = _batch(examples[:3], objective, packed=True)
    value, stats = PolicyWithLoss(model, objective)(batch)
    with torch.no_grad():
        s = full_logit_seq_logps(model, _batch(examples[:3], objective, packed=False)).view(3, 3)
    r = batch.ref_logps.view(3, 3)
    margins = (s[:, :1] - r[:, :1]) - (s[:, 1:] - r[:, 1:])  # [G, K]: positive vs each negative
    torch.testing.assert_close(value.detach(), -F.logsigmoid(beta * margins).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["margin_mean"], margins.mean(), rtol=1e-4, atol=1e-4)


def test_rloo_objective_uses_stored_rewards(model, examples):
    objective = Objective(ObjectiveConfig(loss="rloo"))
    batch = _batch(examples[:3], objective, packed=False)
    value, _ = PolicyWithLoss(model, objective)(batch)
    with torch.no_grad():
        s = full_logit_seq_logps(model, batch).view(3, 3)
    rewards = torch.tensor([e.rewards for e in examples[:3]])
    advantage = rewards - (rewards.sum(1, keepdim=True) - rewards) / 2
    torch.testing.assert_close(value.detach(), -(advantage * s).mean(1).mean(), rtol=1e-4, atol=1e-5)


def test_reinforce_with_a_constant_baseline(model, examples):
    objective = Objective(ObjectiveConfig(loss="reinforce", baseline=0.25))
    batch = _batch(examples[:3], objective, packed=False)
    value, _ = PolicyWithLoss(model, objective)(batch)
    with torch.no_grad():
        s = full_logit_seq_logps(model, batch).view(3, 3)
    rewards = torch.tensor([e.rewards for e in examples[:3]])
    torch.testing.assert_close(value.detach(), -((rewards - 0.25) * s).mean(1).mean(), rtol=1e-4, atol=1e-5)


def test_objective_config_rejects_unknown_losses():
    assert set(LOSS_NAMES) >= {"dft", "dft2", "sft", "dpo", "ipo", "simpo", "rwr", "reinforce", "rloo"}
    with pytest.raises(ValueError, match="loss must be one of"):
        ObjectiveConfig(loss="ppo2")  # was "ppo", a trainer loss since issue 13 (on-policy only: TrainConfig refuses
    assert ObjectiveConfig(loss="ppo").spec.family == "policy"  # it offline with the same message)
    with pytest.raises(ValueError, match="baseline must be 'mean', 'none' or a number"):
        ObjectiveConfig(loss="reinforce", baseline="avg")
    assert ObjectiveConfig(loss="dft2").dft_hparams() == (0.3, 0.9)
    assert ObjectiveConfig(loss="dft", tau=2.0).dft_hparams() == (2.0, 0.85)
