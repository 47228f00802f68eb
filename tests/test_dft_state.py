""":class:`dftkern.DFTState`: construction, persistence, resume, devices, activation checkpointing.

The state holds DFT's per-example log-space moving average ``u``. A checkpoint must capture
everything that later steps depend on (two steps == one step, save, load, one step), and a
forward that activation checkpointing recomputes during backward must update ``u`` exactly once
and give the same gradients as without checkpointing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dftkern import DFTState, fused_dft_loss

IGNORE = -100
K = 2
VOCAB, HIDDEN, SEQ = 48, 8, 5


def make_step(n_groups: int, seed: int, *, k: int = K):
    """One step's DFT inputs: ``hidden [G*(1+K), T, H]``, ``labels`` (ragged prompts), ``ref_logps [G, K]``."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = n_groups * (1 + k)
    hidden = torch.randn(n_rows, SEQ, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (n_rows, SEQ), generator=gen)
    prompt = torch.randint(0, 3, (n_rows,), generator=gen)
    labels[torch.arange(SEQ)[None, :] < prompt[:, None]] = IGNORE
    ref_logps = torch.randn(n_groups, k, generator=gen) * 2 - 3 * math.log(VOCAB)
    return hidden, labels, ref_logps


def make_weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed)) / HIDDEN ** 0.5


def dft_step(state, ids, step_inputs, weight, *, variant: str = "dft", schedule: str = "auto"):
    """Run one DFT step (forward + backward); return ``(loss, grad_hidden, grad_weight)``."""
    hidden, labels, ref_logps = step_inputs
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fused_dft_loss(h, w, labels, num_negatives=K, ids=ids, state=state, variant=variant,
                          ref_logps=ref_logps if variant == "dft" else None, backend="torch", schedule=schedule)
    loss.backward()
    return loss.detach(), h.grad, w.grad


# ---------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------


def test_new_state_holds_init():
    state = DFTState(6, init=-2.5)
    assert state.num_examples == 6
    assert state.u.dtype == torch.float32 and tuple(state.u.shape) == (6,)
    assert bool((state.u == -2.5).all())
    assert state.num_updates.dtype == torch.int64 and int(state.num_updates.sum()) == 0
    assert state.device == torch.device("cpu")
    assert bool((DFTState(3).u == 0.0).all()), "default u_init is 0"
    assert "num_examples=6" in repr(state)


@pytest.mark.parametrize("num_examples", [0, -3, 2.0, True, "4", None])
def test_bad_num_examples(num_examples):
    with pytest.raises(ValueError, match="num_examples"):
        DFTState(num_examples)


@pytest.mark.parametrize("init", [float("nan"), float("inf"), -float("inf"), "0", True, None])
def test_bad_init(init):
    with pytest.raises(ValueError, match="init"):
        DFTState(4, init=init)


def test_to_returns_self_and_keeps_values():
    state = DFTState(5, init=1.5)
    state.u[2] = -4.0
    state.num_updates[2] = 3
    moved = state.to("cpu")
    assert moved is state
    assert state.to(torch.device("cpu")) is state
    assert state.u.tolist() == [1.5, 1.5, -4.0, 1.5, 1.5]
    assert state.num_updates.tolist() == [0, 0, 3, 0, 0]


# ---------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    weight = make_weight()
    state = DFTState(7, init=-1.0)
    dft_step(state, torch.tensor([6, 1]), make_step(2, seed=1), weight)
    saved = state.state_dict()
    assert set(saved) == {"u", "num_updates", "init", "num_examples"}
    assert saved["u"] is not state.u, "state_dict must hold a copy"
    torch.save(saved, tmp_path / "dft_state.pt")
    loaded = torch.load(tmp_path / "dft_state.pt")
    fresh = DFTState(7)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.u, state.u) and torch.equal(fresh.num_updates, state.num_updates)
    assert fresh.init == -1.0
    assert fresh.num_updates.tolist() == [0, 1, 0, 0, 0, 0, 1]
    # the saved dict is a snapshot: later updates of the state do not change it
    before = saved["u"].clone()
    dft_step(state, torch.tensor([0, 3]), make_step(2, seed=2), weight)
    assert torch.equal(saved["u"], before)


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_resume_equals_uninterrupted(variant):
    weight = make_weight()
    steps = [(torch.tensor([1, 4]), make_step(2, seed=10)), (torch.tensor([4, 0]), make_step(2, seed=11))]
    uninterrupted = DFTState(5, init=-0.5)
    first = dft_step(uninterrupted, *steps[0], weight, variant=variant)
    second = dft_step(uninterrupted, *steps[1], weight, variant=variant)

    interrupted = DFTState(5, init=-0.5)
    torch.testing.assert_close(dft_step(interrupted, *steps[0], weight, variant=variant)[0], first[0])
    checkpoint_dict = interrupted.state_dict()
    resumed = DFTState(5)  # a fresh process: default init, then the checkpoint
    resumed.load_state_dict(checkpoint_dict)
    again = dft_step(resumed, *steps[1], weight, variant=variant)
    for ours, expected in zip(again, second):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert torch.equal(resumed.u, uninterrupted.u)
    assert torch.equal(resumed.num_updates, uninterrupted.num_updates)
    assert resumed.num_updates.tolist() == [1, 1, 0, 0, 2]


def test_load_state_dict_rejects_wrong_size_and_missing_keys():
    state = DFTState(4, init=0.5)
    with pytest.raises(ValueError, match="examples"):
        state.load_state_dict(DFTState(5).state_dict())
    bad = DFTState(4).state_dict()
    bad["u"] = torch.zeros(3)
    with pytest.raises(ValueError, match="examples"):
        state.load_state_dict(bad)
    incomplete = DFTState(4).state_dict()
    del incomplete["num_updates"]
    with pytest.raises(ValueError, match="num_updates"):
        state.load_state_dict(incomplete)
    assert bool((state.u == 0.5).all()) and state.init == 0.5, "a rejected load changes nothing"


# ---------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------


def _grads_with_optional_checkpoint(batches, weight, *, use_checkpoint: bool, variant: str, schedule: str,
                                    num_examples: int = 8):
    """Sum the DFT losses of ``batches`` (each ``(ids, inputs)``), then one backward."""
    state = DFTState(num_examples, init=-1.0)
    w = weight.clone().requires_grad_(True)
    leaves, total = [], 0.0
    for ids, (hidden, labels, ref_logps) in batches:
        h = hidden.clone().requires_grad_(True)
        leaves.append(h)

        def loss_fn(h_, w_, labels=labels, ref_logps=ref_logps, ids=ids):
            return fused_dft_loss(h_, w_, labels, num_negatives=K, ids=ids, state=state, variant=variant,
                                  ref_logps=ref_logps if variant == "dft" else None, backend="torch",
                                  schedule=schedule)

        loss = checkpoint(loss_fn, h, w, use_reentrant=False) if use_checkpoint else loss_fn(h, w)
        total = total + loss
    total.backward()
    return total.detach(), [h.grad for h in leaves], w.grad, state


@pytest.mark.parametrize("schedule", ["fused", "recompute"])
@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_checkpoint_updates_state_once(variant, schedule):
    weight = make_weight(3)
    batches = [(torch.tensor([5, 2]), make_step(2, seed=20))]
    plain = _grads_with_optional_checkpoint(batches, weight, use_checkpoint=False, variant=variant,
                                            schedule=schedule)
    ckpt = _grads_with_optional_checkpoint(batches, weight, use_checkpoint=True, variant=variant, schedule=schedule)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[1][0], plain[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ckpt[2], plain[2], rtol=1e-6, atol=1e-7)
    assert torch.equal(ckpt[3].u, plain[3].u)
    assert ckpt[3].num_updates.tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("schedule", ["fused", "recompute"])
def test_checkpoint_two_calls_before_one_backward(schedule):
    """Two checkpointed losses (e.g. two micro-batches) summed, then a single backward.

    The backward recomputes the second call first and then the first one; each recomputation
    must reuse the ``u`` its own forward wrote (not the already-updated state, and not the
    other call's values).
    """
    weight = make_weight(4)
    batches = [(torch.tensor([0, 1]), make_step(2, seed=30)), (torch.tensor([2, 3]), make_step(2, seed=31))]
    plain = _grads_with_optional_checkpoint(batches, weight, use_checkpoint=False, variant="dft", schedule=schedule)
    ckpt = _grads_with_optional_checkpoint(batches, weight, use_checkpoint=True, variant="dft", schedule=schedule)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    assert torch.equal(ckpt[3].u, plain[3].u)
    assert ckpt[3].num_updates.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    torch.testing.assert_close(ckpt[2], plain[2], rtol=1e-6, atol=1e-7, msg="weight gradient")
    for i in range(2):
        torch.testing.assert_close(ckpt[1][i], plain[1][i], rtol=1e-6, atol=1e-7, msg=f"hidden gradient {i}")
