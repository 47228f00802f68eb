"""Compaction: ignored tokens enter no product, and results equal the uncompacted computation.

The uncompacted computation is the same schedule with every token taking part
(``ValidTokens.all``: ignored rows go through the products and are masked in the epilogue), the
way dftkern worked before compaction. Compared in float64 (equal to ~1e-12) and float32 (equal up
to fp32 rounding) for the three schedules (forward; backward by recomputation; gradients in the
forward), with entropy, padded and packed public ops, empty rows, all-ignored batches and odd
sizes. Also: ignored rows really are never multiplied (a spy on the products), ``valid_positions``
gives identical results, and the planning helpers of :class:`ValidTokens`.
"""

from __future__ import annotations

import pytest
import torch
from _reference import make_inputs, random_upstream, reference_token_logprobs, relative_error

import dftkern
from dftkern.chunking import ValidTokens, backward_logprobs, forward_logprobs, forward_with_grad
from dftkern.engines import LogitTransform, MatmulOps, TorchRowEngine, TritonRowEngine

TRANSFORM = LogitTransform(temperature=0.9, softcap=7.0)


def _engine(name):
    return TorchRowEngine() if name == "torch" else TritonRowEngine()


def _batch(n_tokens, dtype, seed, pattern):
    hidden, weight, labels, bias = make_inputs(n_tokens, 12, 97, seed=seed, dtype=dtype, with_bias=True,
                                               ignore_fraction=0.45)
    if pattern == "all-ignored":
        labels[:] = -100
    elif pattern == "first-and-last":
        labels[0] = labels[-1] = -100
    return hidden, weight, labels, bias


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


def _scatter(tokens, values):
    return tokens.scatter(values)


PATTERNS = ["random", "first-and-last", "all-ignored"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens", [1, 23])
@pytest.mark.parametrize("budget_rows", [1, 5, 1000])
def test_schedules_compacted_equal_uncompacted(backend, dtype, pattern, n_tokens, budget_rows):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton engine takes fp32/fp16/bf16")
    engine = _engine(backend)
    hidden, weight, labels, bias = _batch(n_tokens, dtype, 3, pattern)
    budget = budget_rows * 97 * MatmulOps(weight).acc_dtype.itemsize
    dense, sparse = ValidTokens.all(n_tokens), ValidTokens.find(labels, -100)
    keep = labels != -100
    assert sparse.num_valid == int(keep.sum())
    tol = _tol(dtype)

    # forward (with entropy)
    d_logp, d_lse, d_ent = forward_logprobs(hidden, weight, bias, labels, TRANSFORM, engine, budget, dense, entropy=True)
    s_logp, s_lse, s_ent = forward_logprobs(hidden, weight, bias, labels, TRANSFORM, engine, budget, sparse,
                                            entropy=True)
    assert relative_error(_scatter(sparse, s_logp), d_logp) <= tol
    assert relative_error(_scatter(sparse, s_ent), d_ent) <= tol

    # backward by recomputation, logp and entropy upstreams (0 at ignored tokens in the dense run)
    g = random_upstream(n_tokens, seed=4).to(d_logp.dtype) * keep
    gh = random_upstream(n_tokens, seed=5).to(d_logp.dtype) * keep
    dense_grads = backward_logprobs(hidden, weight, bias, labels, d_lse, g, TRANSFORM, engine, budget, dense,
                                    entropy=d_ent, grad_entropy=gh)
    sparse_grads = backward_logprobs(hidden, weight, bias, labels, s_lse, sparse.gather(g), TRANSFORM, engine, budget,
                                     sparse, entropy=s_ent, grad_entropy=sparse.gather(gh))
    for name, a, b in zip(("hidden", "weight", "bias"), sparse_grads, dense_grads):
        assert a.dtype == b.dtype and relative_error(a, b) <= tol, name
    assert bool((sparse_grads[0][~keep] == 0).all())

    # gradients in the forward: sum(g * logp + gh * H) with the chunk's constants gathered by position
    def chunk_gradient(c, logp, ent, positions):
        return g[positions], gh[positions]

    rows = max(1, budget_rows)
    ranges_dense = [(t, min(t + rows, n_tokens)) for t in range(0, n_tokens, rows)] or [(0, 0)]
    fused_dense = forward_with_grad(hidden, weight, bias, labels, TRANSFORM, engine, ranges_dense, chunk_gradient,
                                    tokens=dense, entropy=True)
    fused_sparse = forward_with_grad(hidden, weight, bias, labels, TRANSFORM, engine, sparse.chunk_bounds(rows),
                                     chunk_gradient, tokens=sparse, entropy=True)
    assert relative_error(_scatter(sparse, fused_sparse.logp), fused_dense.logp) <= tol
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        a, b = getattr(fused_sparse, name), getattr(fused_dense, name)
        assert relative_error(a, b) <= tol, name
        assert relative_error(a, dict(zip(("grad_hidden", "grad_weight", "grad_bias"), dense_grads))[name]) <= \
            (1e-10 if dtype == torch.float64 else 2e-5), f"{name}: in-forward vs recompute"


def test_ignored_rows_never_reach_a_product(monkeypatch):
    """Every logits product of every public op sees only valid rows."""
    rows_seen = []
    original = MatmulOps.logits

    def spy(self, hidden, *args, **kwargs):
        rows_seen.append(int(hidden.shape[0]))
        return original(self, hidden, *args, **kwargs)

    monkeypatch.setattr(MatmulOps, "logits", spy)
    hidden, weight, labels, _ = make_inputs((4, 9), 8, 50, seed=7, ignore_fraction=0.6)
    n = int((labels != -100).sum())
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    calls = {
        "token": lambda: dftkern.fused_linear_logprobs(h, w, labels).sum().backward(),
        "ce": lambda: dftkern.fused_linear_cross_entropy(h, w, labels).backward(),
        "token_loss": lambda: dftkern.fused_token_loss(h, w, labels, token_loss=lambda lp, en, ix: en - lp).backward(),
        "sequence": lambda: dftkern.sequence_logprobs(h, w, labels).sum().backward(),
        "dpo-fused": lambda: dftkern.fused_preference_loss(h, w, labels, loss="dpo", ref_logps=torch.zeros(4),
                                                           schedule="fused").backward(),
        "dpo-recompute": lambda: dftkern.fused_preference_loss(h, w, labels, loss="dpo", ref_logps=torch.zeros(4),
                                                               schedule="recompute").backward(),
    }
    for name, call in calls.items():
        rows_seen.clear()
        call()
        assert sum(rows_seen) in (n, 2 * n), f"{name}: products saw {rows_seen} rows, {n} are valid"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_public_ops_with_empty_rows_and_odd_sizes_match_fp64(backend, layout):
    hidden, weight, labels, bias = make_inputs((5, 7), 9, 61, seed=8, with_bias=True, ignore_fraction=0.5)
    labels[1] = -100
    labels[4] = -100
    kwargs = dict(bias=bias, backend=backend, chunk_bytes=3 * 61 * 4)
    if layout == "packed":
        hidden, labels, kwargs["cu_seqlens"] = hidden.reshape(35, 9), labels.reshape(35), [0, 7, 14, 21, 28, 35]
    seq = dftkern.sequence_logprobs(hidden, weight, labels, average=True, **kwargs)
    token = reference_token_logprobs(hidden, weight, labels, bias=bias).reshape(5, 7)
    counts = (labels.reshape(5, 7) != -100).sum(-1)
    ref = torch.where(counts > 0, token.sum(-1) / counts.clamp_min(1), torch.zeros(5, dtype=torch.float64))
    assert relative_error(seq, ref) <= 1e-5 and seq[1] == 0 and seq[4] == 0


def test_all_ignored_grouped_loss_is_zero_with_zero_grads(backend):
    hidden, weight, labels, _ = make_inputs((4, 6), 8, 30, seed=9)
    labels[:] = -100
    for schedule in ("fused", "recompute"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = dftkern.fused_preference_loss(h, w, labels, loss="sft", schedule=schedule, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_valid_positions_give_identical_results():
    hidden, weight, labels, bias = make_inputs((3, 8), 8, 40, seed=10, with_bias=True, ignore_fraction=0.4)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    for op in (dftkern.fused_linear_cross_entropy, dftkern.fused_linear_logprobs):
        outs = []
        for vp in (None, positions):
            h = hidden.clone().requires_grad_(True)
            out = op(h, weight, labels, bias=bias, valid_positions=vp)
            out.sum().backward()
            outs.append((out.detach(), h.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_valid_tokens_planning_helpers():
    labels = torch.tensor([-100, 3, 4, -100, -100, 5, 6, 7, -100, 8])
    tokens = ValidTokens.find(labels, -100)
    assert tokens.num_valid == 6 and tokens.positions.tolist() == [1, 2, 5, 6, 7, 9]
    assert tokens.compact_offsets([0, 3, 5, 10]) == [0, 2, 2, 6]
    assert tokens.chunk_bounds(4) == [(0, 7), (7, 10)]
    assert tokens.chunk_bounds(100) == [(0, 10)]
    scattered = tokens.scatter(torch.arange(1.0, 7.0))
    assert scattered.tolist() == [0, 1, 2, 0, 0, 3, 4, 5, 0, 6]
    dense = ValidTokens.find(torch.tensor([1, 2, 3]), -100)
    assert dense.all_valid and dense.chunk_bounds(2) == [(0, 2), (2, 3)]
    empty = ValidTokens.find(torch.full((4,), -100), -100)
    assert empty.num_valid == 0 and empty.chunk_bounds(2) == [(0, 4)]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_nan_row_does_not_leak_into_the_other_rows(backend, layout):
    """Row sums over the compacted tokens: a NaN/inf in one row leaves every other row's value and
    gradient as the uncompacted path gives them (before, a prefix sum carried the NaN forward)."""
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton engine takes fp32/fp16/bf16
    hidden, weight, labels, _ = make_inputs((4, 5), 6, 7, seed=13, dtype=dtype)
    hidden[0, 4] = float("nan")
    hidden[2, 1] = float("inf")
    labels[:, 0] = -100  # some ignored tokens: the compacted (packed) row layout is used
    kwargs = {} if layout == "padded" else {"cu_seqlens": [0, 5, 10, 15, 20]}
    if layout == "packed":
        hidden, labels = hidden.reshape(20, 6), labels.reshape(20)
    h = hidden.clone().requires_grad_(True)
    seq = dftkern.sequence_logprobs(h, weight, labels, backend=backend, **kwargs)
    assert seq[0].isnan() and not torch.isfinite(seq[2])
    seq[[1, 3]].sum().backward()
    token = reference_token_logprobs(hidden.reshape(20, 6)[5:10], weight, labels.reshape(20)[5:10])
    assert relative_error(seq[1], token.sum()) <= 1e-5
    rows = h.grad.reshape(4, 5, 6)
    assert torch.isfinite(rows[1]).all() and torch.isfinite(rows[3]).all()


def test_dft_skips_only_the_group_with_a_nan():
    """One NaN in a negative of group 0: only that group is skipped (its u kept), group 1 updates."""
    torch.manual_seed(0)
    G, K, T, H, V = 2, 2, 4, 6, 9
    hidden = torch.randn(G * (K + 1), T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (G * (K + 1), T))
    labels[:, 0] = -100
    hidden[1, 3] = float("nan")  # group 0, first negative
    ref = torch.randn(G, K, dtype=torch.float64)
    state = dftkern.DFTState(G)
    loss, stats = dftkern.fused_dft_loss(hidden, weight, labels, ref_logps=ref, state=state, ids=torch.arange(G),
                                         num_negatives=K, return_stats=True)
    assert int(stats["skipped_groups"]) == 1
    assert state.u[0] == 0 and state.u[1] != 0 and torch.isfinite(state.u).all()


def test_row_gradients_do_not_leak_between_rows(backend):
    """Backward of the compacted row sums: each row's tokens get only their own row's upstream gradient
    (before, a prefix-sum backward let a NaN or a huge upstream value of one row reach earlier rows)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden, weight, labels, _ = make_inputs((3, 4), 8, 11, seed=14, dtype=dtype)
    labels[:, 0] = -100
    h = hidden.clone().requires_grad_(True)
    dftkern.sequence_logprobs(h, weight, labels, backend=backend).backward(
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float32))
    reference = h.grad.clone()
    for upstream in (float("nan"), 1e17):
        h.grad = None
        dftkern.sequence_logprobs(h, weight, labels, backend=backend).backward(
            torch.tensor([1.0, upstream, 1.0], dtype=torch.float32))
        for row in (0, 2):
            torch.testing.assert_close(h.grad[row], reference[row], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["logprobs", "cross_entropy", "policy"])
def test_double_backward_is_refused_clearly(op):
    hidden, weight, labels, _ = make_inputs((2, 3), 4, 5, seed=15, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    if op == "logprobs":
        out = dftkern.fused_linear_logprobs(h, weight, labels).sum()
    elif op == "cross_entropy":
        out = dftkern.fused_linear_cross_entropy(h, weight, labels)
    else:
        out = dftkern.fused_policy_loss(h, weight, labels, advantages=torch.tensor([1.0, -1.0]))
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out, h, create_graph=True)
