"""``valid_positions=`` and ``accum_dtype=`` reach the engine from every fused loss entry point.

:func:`dftkern.fused_dft_loss`, :func:`dftkern.fused_preference_loss` and
:func:`dftkern.fused_policy_loss` pass both keywords through unchanged (the trainer's collator
computes the valid positions on the CPU so the CUDA path has no host sync):

* the correct positions give exactly the loss and gradients of the call without them;
* wrong positions, or an unknown ``accum_dtype``, are refused by the engine (so they did reach it);
* ``accum_dtype="weight"`` with bfloat16 weights and several chunks accumulates ``dW`` in bfloat16:
  a different rounding from the fp32 default, both close to the float32 result.
"""

from __future__ import annotations

import pytest
import torch

import dftkern

IGNORE = -100
R, T, H, V = 6, 7, 16, 40  # 2 DFT groups of 1 + 2 rows; 3 pairs; 2 groups of 3 samples


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, H, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(V, H, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (R, T), generator=gen)
    for r in range(R):  # a prompt of 1-3 tokens, then padding after 5-7 tokens
        labels[r, : 1 + r % 3] = IGNORE
        labels[r, 5 + r % 3:] = IGNORE
    return hidden, weight, labels


def _call(name: str, hidden, weight, labels, **extra):
    if name == "dft":
        return dftkern.fused_dft_loss(hidden, weight, labels, num_negatives=2, variant="dft2", **extra)
    if name == "dpo":
        return dftkern.fused_preference_loss(hidden, weight, labels, loss="dpo",
                                             ref_logps=torch.linspace(-9, -4, R), **extra)
    if name == "rloo":
        return dftkern.fused_preference_loss(hidden, weight, labels, loss="rloo",
                                             rewards=torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.0]]), **extra)
    advantages = torch.linspace(-1.0, 1.0, R)
    old = torch.where(labels != IGNORE, -3.0 + 0.1 * torch.arange(R * T).view(R, T) % 1.0, 0.0)
    return dftkern.fused_policy_loss(hidden, weight, labels, advantages=advantages, old_logps=old, **extra)


def _loss_and_grads(name, hidden, weight, labels, **extra):
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    loss = _call(name, hidden, weight, labels, **extra)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


NAMES = ["dft", "dpo", "rloo", "policy"]


@pytest.mark.parametrize("name", NAMES)
def test_valid_positions_give_exactly_the_same_loss_and_gradients(name):
    hidden, weight, labels = _inputs()
    positions = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    plain = _loss_and_grads(name, hidden, weight, labels)
    given = _loss_and_grads(name, hidden, weight, labels, valid_positions=positions)
    for a, b in zip(plain, given):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_valid_positions_and_accum_dtype_reach_the_engine(name):
    hidden, weight, labels = _inputs()
    positions = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    with pytest.raises(ValueError, match="valid_positions .* must be exactly the positions"):
        _call(name, hidden, weight, labels, valid_positions=positions[1:])
    with pytest.raises(ValueError, match="accum_dtype must be 'fp32', 'weight'"):
        _call(name, hidden, weight, labels, accum_dtype="fp8")


@pytest.mark.parametrize("name", NAMES)
def test_accum_dtype_weight_accumulates_in_bfloat16(name):
    hidden, weight, labels = _inputs(torch.bfloat16, seed=1)
    chunk = dict(chunk_bytes=4 * V * 4, backend="torch")  # 4 tokens per chunk: many dW partial sums
    if name != "policy":
        chunk["schedule"] = "recompute"  # token chunks, not whole groups
    exact = _loss_and_grads(name, hidden.float(), weight.float(), labels)[2]
    fp32 = _loss_and_grads(name, hidden, weight, labels, **chunk)[2]
    low = _loss_and_grads(name, hidden, weight, labels, accum_dtype="weight", **chunk)[2]
    assert fp32.dtype == low.dtype == torch.bfloat16
    assert not torch.equal(fp32, low)  # another rounding: the keyword changed the accumulation
    scale = exact.abs().max()
    assert (fp32.float() - exact).abs().max() <= 0.02 * scale
    assert (low.float() - exact).abs().max() <= 0.05 * scale
