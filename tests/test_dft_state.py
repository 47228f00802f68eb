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


# ---------------------------------------------------------------------------------------------
# non-finite inputs and empty groups never reach the state (issue 9)
# ---------------------------------------------------------------------------------------------


def _dft_call(state, ids, hidden, labels, ref_logps, weight, **kwargs):
    h = hidden.clone().requires_grad_(True)
    loss, stats = fused_dft_loss(h, weight, labels, num_negatives=K, ids=ids, state=state, ref_logps=ref_logps,
                                 backend="torch", return_stats=True, **kwargs)
    loss.backward()
    return loss.detach(), stats


def _expected_u(u_prev: torch.Tensor, d: torch.Tensor, gamma: float = 0.85) -> torch.Tensor:
    """The documented recursion in float64, linear space."""
    return torch.log((1 - gamma) * torch.exp(u_prev.double()) + gamma * torch.exp(d.double()).mean(1))


@pytest.mark.parametrize("schedule", ["fused", "recompute"])
@pytest.mark.parametrize("bad_row", [4, 3], ids=["nan-negative", "nan-positive"])
def test_nan_group_is_not_written_and_next_clean_call_is_finite(bad_row, schedule):
    weight = make_weight()
    state = DFTState(6, init=-1.0)
    state.u[4] = 2.5
    ids = torch.tensor([0, 4])  # group 1 (rows 3..5) is id 4
    hidden, labels, ref_logps = make_step(2, seed=40)
    poisoned = hidden.clone()
    poisoned[bad_row] = float("nan")
    loss, stats = _dft_call(state, ids, poisoned, labels, ref_logps, weight, schedule=schedule)
    assert not bool(torch.isfinite(loss)), "the loss may be non-finite: the trainer skips such a step"
    assert int(stats["skipped_groups"]) == 1
    assert bool(torch.isfinite(state.u).all())
    assert state.u[4].item() == 2.5 and state.num_updates[4].item() == 0, "the NaN group keeps its u"
    torch.testing.assert_close(state.u[0].double(), _expected_u(torch.tensor([-1.0]), stats["d"][:1])[0],
                               rtol=0, atol=1e-5)
    assert state.num_updates[0].item() == 1, "the clean group is written"
    # the next clean call on the same ids: finite, and it starts from the unchanged u
    clean_hidden, clean_labels, clean_ref = make_step(2, seed=41)
    u_before = state.u[ids].clone()
    loss2, stats2 = _dft_call(state, ids, clean_hidden, clean_labels, clean_ref, weight, schedule=schedule)
    assert bool(torch.isfinite(loss2)) and int(stats2["skipped_groups"]) == 0
    torch.testing.assert_close(state.u[ids].double(), _expected_u(u_before, stats2["d"]), rtol=0, atol=1e-5)
    assert state.num_updates.tolist() == [2, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_group_without_response_tokens_does_not_move_u(variant):
    weight = make_weight()
    state = DFTState(4, init=0.0)
    hidden, labels, ref_logps = make_step(2, seed=43)
    labels = labels.clone()
    labels[3:6] = IGNORE  # group 1 (id 2): every row all-ignored
    ref = ref_logps if variant == "dft" else None
    h = hidden.clone().requires_grad_(True)
    loss, stats = fused_dft_loss(h, weight, labels, num_negatives=K, ids=torch.tensor([1, 2]), state=state,
                                 ref_logps=ref, variant=variant, backend="torch", return_stats=True)
    loss.backward()
    assert bool(torch.isfinite(loss))
    assert int(stats["skipped_groups"]) == 1
    assert state.u[2].item() == 0.0 and state.num_updates.tolist() == [0, 1, 0, 0]
    assert bool(torch.isfinite(stats["weights"]).all())
    assert bool((h.grad[3:6] == 0).all())
    # only the negatives empty (the positive has tokens): still nothing to estimate u from
    labels[3] = make_step(2, seed=43)[1][3]
    fused_dft_loss(hidden, weight, labels, num_negatives=K, ids=torch.tensor([1, 2]), state=state, ref_logps=ref,
                   variant=variant, backend="torch")
    assert state.u[2].item() == 0.0 and state.num_updates.tolist() == [0, 2, 0, 0]


@pytest.mark.parametrize("layout", ["all-ignored", "T=0", "packed-empty"])
def test_batch_without_response_tokens_leaves_the_state(layout):
    weight = make_weight()
    state = DFTState(3, init=0.0)
    hidden, labels, ref_logps = make_step(2, seed=44)
    cu_seqlens = None
    if layout == "all-ignored":
        labels = torch.full_like(labels, IGNORE)
    elif layout == "T=0":
        hidden, labels = hidden[:, :0], labels[:, :0]
    else:
        hidden, labels, cu_seqlens = hidden.reshape(-1, HIDDEN)[:0], labels.reshape(-1)[:0], [0] * 7
    loss, stats = fused_dft_loss(hidden.clone().requires_grad_(True), weight, labels, num_negatives=K,
                                 ids=torch.tensor([0, 2]), state=state, ref_logps=ref_logps, backend="torch",
                                 return_stats=True, cu_seqlens=cu_seqlens)
    assert loss.item() == 0.0
    assert int(stats["skipped_groups"]) == 2
    assert state.u.tolist() == [0.0, 0.0, 0.0] and int(state.num_updates.sum()) == 0


def test_write_never_stores_non_finite_values():
    state = DFTState(3, init=1.0)
    state.write(torch.tensor([0, 1, 2]), torch.tensor([float("nan"), 2.0, float("inf")]))
    assert state.u.tolist() == [1.0, 2.0, 1.0] and state.num_updates.tolist() == [0, 1, 0]
    state.write(torch.tensor([0, 2]), torch.tensor([5.0, 6.0]), update=torch.tensor([False, True]))
    assert state.u.tolist() == [1.0, 2.0, 6.0] and state.num_updates.tolist() == [0, 1, 1]


LOAD_ERRORS = {
    "u-nan": (lambda d: d.__setitem__("u", torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, "non-finite"),
    "u-inf": (lambda d: d.__setitem__("u", torch.tensor([0.0, 0.0, -float("inf"), 0.0])), ValueError, "non-finite"),
    "u-int": (lambda d: d.__setitem__("u", torch.zeros(4, dtype=torch.int64)), TypeError, "u must be a float"),
    "u-list": (lambda d: d.__setitem__("u", [0.0] * 4), TypeError, "u must be a float"),
    "u-2d": (lambda d: d.__setitem__("u", torch.zeros(4, 1)), ValueError, "examples"),
    "num_updates-float": (lambda d: d.__setitem__("num_updates", torch.zeros(4)), TypeError, "num_updates"),
    "num_updates-shape": (lambda d: d.__setitem__("num_updates", torch.zeros(5, dtype=torch.int64)), ValueError,
                          "num_updates"),
    "num_updates-negative": (lambda d: d.__setitem__("num_updates", torch.tensor([0, -1, 0, 0])), ValueError,
                             "num_updates"),
    "init-nan": (lambda d: d.__setitem__("init", float("nan")), ValueError, "init"),
    "num_examples-str": (lambda d: d.__setitem__("num_examples", "4"), TypeError, "num_examples"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS.values()), ids=list(LOAD_ERRORS))
def test_load_state_dict_rejects_bad_values_and_changes_nothing(case):
    corrupt, exc, match = case
    state = DFTState(4, init=0.5)
    state.u[1] = -2.0
    state.num_updates[1] = 3
    saved = DFTState(4, init=1.0).state_dict()
    corrupt(saved)
    with pytest.raises(exc, match=match):
        state.load_state_dict(saved)
    assert state.u.tolist() == [0.5, -2.0, 0.5, 0.5] and state.num_updates.tolist() == [0, 3, 0, 0]
    assert state.init == 0.5
    with pytest.raises(TypeError, match="dict"):
        state.load_state_dict([("u", state.u)])


@pytest.mark.parametrize("args,exc", [((True,), TypeError), ((2.0,), TypeError), (("3",), TypeError),
                                      ((0,), ValueError), ((3, float("nan")), ValueError), ((3, "0"), TypeError)])
def test_constructor_argument_errors(args, exc):
    with pytest.raises(exc):
        DFTState(*args)


def test_load_refuses_values_that_overflow_float32():
    state = DFTState(3)
    bad = {"u": torch.tensor([1e39, 0.0, 0.0], dtype=torch.float64), "num_updates": torch.zeros(3, dtype=torch.int64),
           "init": 0.0, "num_examples": 3}
    with pytest.raises(ValueError, match="non-finite value.*in float32"):
        state.load_state_dict(bad)
    assert torch.equal(state.u, torch.zeros(3))
