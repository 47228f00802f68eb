"""dftkern's token op against float64 references of the plain definition (PyTorch engine, CPU).

Definition checked: ``z = (h W^T + b) / temperature``, then ``softcap * tanh(z / softcap)``;
``logp = log_softmax(z)[label]``, 0 where ``label == ignore_index``.

Tolerances (max-norm relative error vs float64 truth, see ``_reference.relative_error``):
forward <= 1e-5 and gradients <= 1e-4 for fp32 inputs, with a random (not uniform) upstream
gradient; fp16/bf16 inputs must be no worse than the naive same-dtype PyTorch pipeline.
The Triton engine (under the interpreter) has its own module, test_logprobs_triton_interpreter.py
(plus the backward-tiling test at the end of this one, run for both engines).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _reference import (
    FWD_TOL,
    GRAD_TOL,
    LOGIT_TRANSFORMS,
    assert_matches_reference,
    assert_no_worse_than_naive,
    make_inputs,
    naive_same_dtype_logprobs,
    random_upstream,
    reference_sequence_logprobs,
    reference_token_grads,
    reference_token_logprobs,
    relative_error,
    split_transform,
    value_and_grads,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dftkern import fused_linear_logprobs, sequence_logprobs
from dftkern.engines import TorchRowEngine

# ---------------------------------------------------------------------------------------------
# fp32 / fp64 accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(LOGIT_TRANSFORMS.values()), ids=list(LOGIT_TRANSFORMS))
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["unit-logits", "large-logits-x30"])
def test_fp32_forward_and_grads_match_fp64(config, logit_scale):
    with_bias, kwargs = split_transform(config)
    hidden, weight, labels, bias = make_inputs(37, 48, 1000, seed=3, with_bias=with_bias,
                                               logit_scale=logit_scale, ignore_fraction=0.2)
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, **kwargs)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias,
                           backend="torch", **kwargs)
    assert ours["logp"].dtype == torch.float32 and ours["logp"].shape == labels.shape
    assert ours["hidden"].dtype == torch.float32 and ours["weight"].dtype == torch.float32
    assert_matches_reference(ours, ref)


def test_large_logits_are_really_large():
    """Guard for the x30 case above: the softmax there is far from uniform and logits reach O(100)."""
    hidden, weight, labels, _ = make_inputs(37, 48, 1000, seed=3, logit_scale=30.0)
    logits = hidden @ weight.t()
    assert logits.abs().max() > 80
    logp = reference_token_logprobs(hidden, weight, labels)
    assert logp.min() < -100


def test_fp64_inputs_give_fp64_outputs_at_fp64_accuracy():
    hidden, weight, labels, bias = make_inputs((3, 7), 16, 50, seed=4, dtype=torch.float64, with_bias=True,
                                               ignore_fraction=0.3)
    grad_out = random_upstream(labels.shape).double()
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, temperature=0.9, softcap=4.0)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, temperature=0.9,
                           softcap=4.0)
    assert ours["logp"].dtype == torch.float64
    assert ours["hidden"].dtype == torch.float64 and ours["bias"].dtype == torch.float64
    assert_matches_reference(ours, ref, fwd_tol=1e-12, grad_tol=1e-11)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    lead_shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    hidden_size=st.integers(1, 40),
    vocab_size=st.integers(1, 300),
    with_bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 2.3]),
    softcap=st.sampled_from([None, 1.5, 30.0]),
    ignore_fraction=st.sampled_from([0.0, 0.25]),
    chunk_rows=st.sampled_from([None, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_fp64(lead_shape, hidden_size, vocab_size, with_bias, temperature, softcap,
                                  ignore_fraction, chunk_rows, seed):
    hidden, weight, labels, bias = make_inputs(tuple(lead_shape), hidden_size, vocab_size, seed=seed,
                                               with_bias=with_bias, ignore_fraction=ignore_fraction)
    kwargs = {"temperature": temperature, "softcap": softcap}
    grad_out = random_upstream(labels.shape, seed=seed + 1)
    # chunk_rows rows of fp32 logits (plus the torch engine's temporaries: at most 3 rows' worth)
    chunk_bytes = None if chunk_rows is None else chunk_rows * vocab_size * 4
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, **kwargs)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, backend="torch",
                           chunk_bytes=chunk_bytes, **kwargs)
    assert ours["logp"].shape == labels.shape
    assert_matches_reference(ours, ref)


def test_vocab_of_one_gives_zero_logprob():
    hidden, weight, labels, bias = make_inputs(5, 8, 1, seed=0, with_bias=True)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, random_upstream(5), bias=bias)
    assert torch.equal(ours["logp"], torch.zeros(5))
    assert torch.count_nonzero(ours["hidden"]) == 0 and torch.count_nonzero(ours["weight"]) == 0


def test_empty_token_axis():
    hidden, weight, labels, bias = make_inputs(0, 8, 11, seed=0, with_bias=True)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, torch.zeros(0), bias=bias)
    assert ours["logp"].shape == (0,)
    assert ours["hidden"].shape == (0, 8)
    assert torch.equal(ours["weight"], torch.zeros_like(weight))
    assert torch.equal(ours["bias"], torch.zeros_like(bias))


# ---------------------------------------------------------------------------------------------
# fp16 / bf16: no worse than the naive same-dtype pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_transform", [False, True], ids=["plain", "bias+temperature+softcap"])
def test_half_precision_no_worse_than_naive_pipeline(dtype, grad_tol, with_transform):
    hidden, weight, labels, bias = make_inputs(64, 64, 1000, seed=11, dtype=dtype, with_bias=with_transform,
                                               logit_scale=2.0, ignore_fraction=0.1)
    kwargs = {"temperature": 0.9, "softcap": 8.0} if with_transform else {}
    op = functools.partial(fused_linear_logprobs, backend="torch")
    assert_no_worse_than_naive(op, hidden, weight, labels, bias, kwargs, grad_tol=grad_tol)


def test_naive_baseline_really_rounds_logits():
    """Guard: the naive bf16 pipeline is measurably worse than fp32 logits (else the test above is vacuous)."""
    hidden, weight, labels, _ = make_inputs(64, 64, 1000, seed=11, dtype=torch.bfloat16, logit_scale=2.0)
    ref = reference_token_logprobs(hidden, weight, labels)
    naive = naive_same_dtype_logprobs(hidden, weight, labels, softmax_dtype=torch.float32)
    assert relative_error(naive, ref) > 1e-4


# ---------------------------------------------------------------------------------------------
# ignore_index
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["first", "last", "first-and-last-of-each-row"])
def test_ignore_index_patterns(pattern):
    hidden, weight, labels, bias = make_inputs((3, 9), 24, 301, seed=5, with_bias=True)
    labels = labels.clone()
    if pattern == "first":
        labels[0, 0] = -100
    elif pattern == "last":
        labels[-1, -1] = -100
    else:
        labels[:, 0] = -100
        labels[:, -1] = -100
    ignored = labels == -100
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias)
    assert torch.equal(ours["logp"][ignored], torch.zeros(int(ignored.sum())))
    assert bool((ours["logp"][~ignored] < 0).all())
    # an ignored token's hidden state gets exactly zero gradient
    assert torch.count_nonzero(ours["hidden"][ignored]) == 0
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("ignore_index", [-100, 0, -1, 7])
def test_all_tokens_ignored_gives_zeros_and_zero_grads(ignore_index):
    hidden, weight, _, bias = make_inputs((2, 5), 16, 40, seed=6, with_bias=True)
    labels = torch.full((2, 5), ignore_index, dtype=torch.long)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, random_upstream(labels.shape),
                           bias=bias, ignore_index=ignore_index, temperature=0.5, softcap=2.0)
    assert torch.equal(ours["logp"], torch.zeros(2, 5))
    for name in ("hidden", "weight", "bias"):
        assert ours[name] is not None, name
        assert torch.count_nonzero(ours[name]) == 0, f"d{name} must be exactly zero"


@pytest.mark.parametrize("ignore_index", [0, -1, 1000 + 5], ids=["pad-id-0", "minus-1", "beyond-vocab"])
def test_custom_ignore_index(ignore_index):
    hidden, weight, labels, bias = make_inputs(40, 32, 1000, seed=8, with_bias=True)
    labels = labels.clone()
    labels[::3] = ignore_index
    if ignore_index != 0:
        labels[1] = 0  # a genuine token 0 must be scored normally
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, ignore_index=ignore_index)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias,
                           ignore_index=ignore_index)
    assert torch.equal(ours["logp"][::3], torch.zeros_like(ours["logp"][::3]))
    if ignore_index != 0:
        assert ours["logp"][1] < 0
    assert_matches_reference(ours, ref)


def test_minus_100_is_not_ignored_under_custom_ignore_index():
    hidden, weight, labels, _ = make_inputs(6, 8, 20, seed=0)
    labels = labels.clone()
    labels[2] = -100
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels, ignore_index=-1)


# ---------------------------------------------------------------------------------------------
# layouts: leading dims, non-contiguous hidden, int32 labels, frozen parameters
# ---------------------------------------------------------------------------------------------


def test_leading_dims_agree_with_flat_tokens():
    hidden, weight, labels, bias = make_inputs((2, 3, 7), 20, 97, seed=9, with_bias=True, ignore_fraction=0.2)
    grad_out = random_upstream(labels.shape)
    nd = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, softcap=4.0)
    flat = value_and_grads(fused_linear_logprobs, hidden.reshape(-1, 20), weight, labels.reshape(-1),
                           grad_out.reshape(-1), bias=bias, softcap=4.0)
    assert nd["logp"].shape == (2, 3, 7)
    torch.testing.assert_close(nd["logp"].reshape(-1), flat["logp"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nd["hidden"].reshape(-1, 20), flat["hidden"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(nd["weight"], flat["weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(nd["bias"], flat["bias"], rtol=1e-6, atol=1e-7)


def test_batch_time_hidden_layout_matches_reference():
    hidden, weight, labels, bias = make_inputs((4, 11), 32, 257, seed=10, with_bias=True, ignore_fraction=0.2)
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, temperature=1.3)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, temperature=1.3)
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("layout", ["transposed-2d", "strided-3d", "time-major-3d"])
def test_non_contiguous_hidden(layout):
    gen = torch.Generator().manual_seed(12)
    H, V = 24, 211
    if layout == "transposed-2d":
        base = torch.randn(H, 30, generator=gen).requires_grad_(True)   # hidden = base.T: [30, H], strides (1, 30)
        view = lambda b: b.t()  # noqa: E731
    elif layout == "strided-3d":
        base = torch.randn(3, 16, H, generator=gen).requires_grad_(True)  # every other time step
        view = lambda b: b[:, ::2, :]  # noqa: E731
    else:
        base = torch.randn(8, 3, H, generator=gen).requires_grad_(True)   # [T, B, H] -> [B, T, H]
        view = lambda b: b.transpose(0, 1)  # noqa: E731
    hidden = view(base)
    assert not hidden.is_contiguous()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, hidden.shape[:-1], generator=gen)
    grad_out = random_upstream(labels.shape)

    fused_linear_logprobs(hidden, weight, labels, softcap=6.0, chunk_bytes=4 * V * 4).backward(grad_out)
    ours_logp = fused_linear_logprobs(hidden.detach(), weight.detach(), labels, softcap=6.0)

    base64 = base.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    ref = reference_token_logprobs(view(base64), weight64, labels, softcap=6.0)
    ref.backward(grad_out.double())
    assert relative_error(ours_logp, ref) <= FWD_TOL
    assert relative_error(base.grad, base64.grad) <= GRAD_TOL
    assert relative_error(weight.grad, weight64.grad) <= GRAD_TOL


def test_int32_labels_equal_int64_labels():
    hidden, weight, labels, _ = make_inputs(20, 16, 100, seed=13, ignore_fraction=0.2)
    a = fused_linear_logprobs(hidden, weight, labels)
    b = fused_linear_logprobs(hidden, weight, labels.to(torch.int32))
    assert torch.equal(a, b)


@pytest.mark.parametrize("trainable", ["hidden-only", "weight-only", "bias-only", "none"])
def test_partial_requires_grad(trainable):
    hidden, weight, labels, bias = make_inputs(12, 16, 50, seed=14, with_bias=True)
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias)
    hidden.requires_grad_(trainable == "hidden-only")
    weight.requires_grad_(trainable == "weight-only")
    bias.requires_grad_(trainable == "bias-only")
    out = fused_linear_logprobs(hidden, weight, labels, bias=bias)
    if trainable == "none":
        assert not out.requires_grad
        assert relative_error(out, ref["logp"]) <= FWD_TOL
        return
    out.backward(grad_out)
    grads = {"hidden-only": (hidden, "hidden"), "weight-only": (weight, "weight"), "bias-only": (bias, "bias")}
    tensor, name = grads[trainable]
    assert relative_error(tensor.grad, ref[name]) <= GRAD_TOL
    for other in (hidden, weight, bias):
        if other is not tensor:
            assert other.grad is None


def test_no_grad_forward_matches():
    hidden, weight, labels, bias = make_inputs(25, 16, 77, seed=15, with_bias=True)
    hidden.requires_grad_(True)
    with torch.no_grad():
        out = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.8)
    assert not out.requires_grad
    ref = reference_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.8)
    assert relative_error(out, ref) <= FWD_TOL


def test_tied_input_embedding_and_head_weight_accumulate_gradients():
    """One Parameter is both the embedding table and the output head: both uses add to its grad."""
    torch.manual_seed(16)
    V, H, B, T = 150, 32, 3, 10
    embedding = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    input_ids = torch.randint(0, V, (B, T))
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    grad_out = random_upstream(labels.shape)

    def grads(logprob_fn):
        for p in (embedding.weight, proj.weight, proj.bias):
            p.grad = None
        hidden = torch.tanh(proj(embedding(input_ids)))
        logprob_fn(hidden, embedding.weight, labels).backward(grad_out.to(hidden.dtype))
        return [p.grad.clone() for p in (embedding.weight, proj.weight, proj.bias)]

    ours = grads(lambda h, w, y: fused_linear_logprobs(h, w, y, chunk_bytes=7 * V * 4))
    naive = grads(lambda h, w, y: naive_same_dtype_logprobs(h, w, y))
    embedding.double()
    proj.double()
    truth = grads(lambda h, w, y: reference_token_logprobs(h, w, y))
    for name, o, n, t in zip(("tied weight", "proj.weight", "proj.bias"), ours, naive, truth):
        assert relative_error(o, t) <= GRAD_TOL, name
        torch.testing.assert_close(o, n, rtol=1e-4, atol=1e-5, msg=name)
    # the head contributes gradient to every vocabulary row, the embedding only to looked-up rows:
    # with the tie, rows never looked up still receive (head) gradient, and looked-up rows get more
    head_only = embedding.weight.detach().double().requires_grad_(True)
    with torch.no_grad():
        hidden64 = torch.tanh(proj(embedding(input_ids)))
    reference_token_logprobs(hidden64, head_only, labels).backward(grad_out.double())
    assert not torch.allclose(truth[0], head_only.grad)  # the embedding path really contributed
    unused = torch.ones(V, dtype=torch.bool)
    unused[input_ids.unique()] = False
    torch.testing.assert_close(truth[0][unused], head_only.grad[unused])


# ---------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunk_sizes_give_the_same_answer(dtype, forward_chunk_rows, no_dftkern_env):
    N, H, V = 37, 24, 1000
    hidden, weight, labels, bias = make_inputs(N, H, V, seed=17, dtype=dtype, with_bias=True, ignore_fraction=0.2)
    grad_out = random_upstream(labels.shape)
    kwargs = {"bias": bias, "temperature": 0.8, "softcap": 5.0, "backend": "torch"}
    row_upper = 3 * V * 4  # per-row bytes never exceed 3 fp32 rows (logits + two temporaries)
    n_valid = int((labels != -100).sum())  # ignored tokens never reach the epilogue (compaction)
    assert 0 < n_valid < N
    baseline = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, **kwargs)
    assert forward_chunk_rows == [n_valid]  # the default budget holds everything in one chunk
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, temperature=0.8, softcap=5.0)
    for chunk_bytes, expect_rows in ((1, 1), (row_upper * 2, None), (row_upper * 5, None),
                                     ((n_valid - 1) * V * 4, None), (1 << 40, n_valid)):
        forward_chunk_rows.clear()
        ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, chunk_bytes=chunk_bytes,
                               **kwargs)
        # forward-pass chunks (the spy sees only the forward epilogue): they tile the n_valid valid
        # tokens in equal chunks (the last may be shorter), use at least a third of the budget and respect it
        assert sum(forward_chunk_rows) == n_valid
        assert len(set(forward_chunk_rows[:-1])) <= 1 and forward_chunk_rows[-1] <= forward_chunk_rows[0]
        assert forward_chunk_rows[0] >= min(n_valid, max(1, chunk_bytes // row_upper))
        if chunk_bytes >= V * 4:
            assert forward_chunk_rows[0] * V * 4 <= chunk_bytes, "a chunk's fp32 logits exceed the budget"
        if expect_rows is not None:
            assert forward_chunk_rows[0] == expect_rows
        if chunk_bytes < (1 << 40):
            assert len(forward_chunk_rows) > 1, f"chunk_bytes={chunk_bytes} should force several chunks"
        torch.testing.assert_close(ours["logp"], baseline["logp"], rtol=1e-6, atol=1e-6)
        for name in ("hidden", "weight", "bias"):
            assert ours[name].dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(ours[name], baseline[name], rtol=1e-5, atol=1e-6)
            else:  # per-chunk fp32 accumulation then one rounding: equal up to an ulp of the half type
                torch.testing.assert_close(ours[name], baseline[name], rtol=2e-3, atol=1e-4)
        if dtype == torch.float32:
            assert_matches_reference(ours, ref)
    assert forward_chunk_rows == [n_valid]
    forward_chunk_rows.clear()
    fused_linear_logprobs(hidden, weight, labels, chunk_bytes=1, **kwargs)
    assert forward_chunk_rows == [1] * n_valid, "chunk_bytes=1 must give one row per chunk"


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, torch engine)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "row-per-chunk"])
def test_gradcheck_token_logprobs(chunk_bytes):
    hidden, weight, labels, bias = make_inputs((2, 3), 5, 7, seed=18, dtype=torch.float64, with_bias=True)
    labels[0, 1] = -100
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))

    def fn(h, w, b):
        return fused_linear_logprobs(h, w, labels, bias=b, temperature=0.7, softcap=2.5, backend="torch",
                                     chunk_bytes=chunk_bytes)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_sequence_logprobs_packed_average():
    hidden, weight, labels, bias = make_inputs(9, 4, 6, seed=19, dtype=torch.float64, with_bias=True)
    labels[[0, 5]] = -100
    cu_seqlens = [0, 3, 3, 9]  # the middle row is empty
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))

    def fn(h, w, b):
        return sequence_logprobs(h, w, labels, bias=b, cu_seqlens=cu_seqlens, average=True, backend="torch",
                                 chunk_bytes=1)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------------------------


def _padded_batch(seed: int = 20):
    """[B=4, T=9] batch: row lengths 9, 5, 0 (all ignored), 1; prompt tokens ignored too."""
    hidden, weight, labels, bias = make_inputs((4, 9), 16, 301, seed=seed, with_bias=True)
    labels = labels.clone()
    lengths = [9, 5, 0, 1]
    for r, n in enumerate(lengths):
        labels[r, n:] = -100
    labels[0, :2] = -100  # prompt tokens in the middle of a packed sequence
    return hidden, weight, labels, bias, lengths


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logprobs_padded_matches_reference(average):
    hidden, weight, labels, bias, _ = _padded_batch()
    kwargs = {"bias": bias, "average": average, "softcap": 4.0}
    grad_out = random_upstream(4)
    ours = value_and_grads(sequence_logprobs, hidden, weight, labels, grad_out, **kwargs)
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    ref = reference_sequence_logprobs(h64, w64, labels, bias=b64, average=average, softcap=4.0)
    ref.backward(grad_out.double())
    assert ours["logp"].shape == (4,) and ours["logp"].dtype == torch.float32
    assert relative_error(ours["logp"], ref) <= FWD_TOL
    assert ours["logp"][2] == 0.0 and not math.isnan(float(ours["logp"][2]))
    assert torch.isfinite(ours["hidden"]).all() and torch.isfinite(ours["weight"]).all()
    assert torch.count_nonzero(ours["hidden"][2]) == 0  # the empty row gets no gradient
    assert relative_error(ours["hidden"], h64.grad) <= GRAD_TOL
    assert relative_error(ours["weight"], w64.grad) <= GRAD_TOL
    assert relative_error(ours["bias"], b64.grad) <= GRAD_TOL
    if average:  # the mean really divides by the number of scored tokens
        token = reference_token_logprobs(hidden, weight, labels, bias=bias, softcap=4.0)
        assert ours["logp"][0].item() == pytest.approx(token[0, 2:].sum().item() / 7, rel=1e-5)


@pytest.mark.parametrize("cu_kind", ["list", "int32-tensor", "int64-tensor"])
@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logprobs_packed_equals_padded(cu_kind, average):
    hidden, weight, labels, bias, lengths = _padded_batch()
    packed_hidden = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)])
    packed_labels = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = {"list": bounds, "int32-tensor": torch.tensor(bounds, dtype=torch.int32),
                  "int64-tensor": torch.tensor(bounds)}[cu_kind]
    grad_out = random_upstream(4)
    padded = value_and_grads(sequence_logprobs, hidden, weight, labels, grad_out, bias=bias, average=average,
                             temperature=1.2)
    packed = value_and_grads(sequence_logprobs, packed_hidden, weight, packed_labels, grad_out, bias=bias,
                             average=average, temperature=1.2, cu_seqlens=cu_seqlens)
    ref = reference_sequence_logprobs(packed_hidden, weight, packed_labels, bias=bias, average=average,
                                      temperature=1.2, cu_seqlens=bounds)
    assert packed["logp"].shape == (4,)
    assert relative_error(packed["logp"], ref) <= FWD_TOL
    torch.testing.assert_close(packed["logp"], padded["logp"], rtol=1e-6, atol=1e-6)
    padded_token_grads = torch.cat([padded["hidden"][r, :n] for r, n in enumerate(lengths)])
    torch.testing.assert_close(packed["hidden"], padded_token_grads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed["weight"], padded["weight"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed["bias"], padded["bias"], rtol=1e-5, atol=1e-7)


def test_sequence_logprobs_all_rows_empty_gives_zeros():
    hidden, weight, _, _ = make_inputs((3, 4), 8, 30, seed=21)
    labels = torch.full((3, 4), -100)
    for average in (False, True):
        out = sequence_logprobs(hidden, weight, labels, average=average)
        assert torch.equal(out, torch.zeros(3))
    out = sequence_logprobs(hidden.reshape(12, 8), weight, labels.reshape(12), cu_seqlens=[0, 0, 12, 12],
                            average=True)
    assert torch.equal(out, torch.zeros(3))


def test_sequence_logprobs_zero_length_padded_rows():
    hidden, weight, _, _ = make_inputs((3, 0), 8, 30, seed=22)
    labels = torch.zeros(3, 0, dtype=torch.long)
    for average in (False, True):
        out = sequence_logprobs(hidden, weight, labels, average=average)
        assert torch.equal(out, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# backward tiling over (tokens x vocabulary columns)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def grad_tile_spy(monkeypatch):
    """Records ``(rows, label_offset, columns)`` of every backward epilogue call, for both engines."""
    from dftkern.engines import TritonRowEngine

    tiles: list[tuple[int, int, int]] = []
    for cls in (TorchRowEngine, TritonRowEngine):
        original = cls.grad_logits

        def spy(self, logits, *args, _original=original, label_offset=0, **kwargs):
            tiles.append((int(logits.shape[0]), int(label_offset), int(logits.shape[1])))
            return _original(self, logits, *args, label_offset=label_offset, **kwargs)

        monkeypatch.setattr(cls, "grad_logits", spy)
    return tiles


def _assert_tiles_cover_grid(tiles, n_tokens: int, vocab_size: int) -> None:
    """The backward tiles cover every (token, column) pair exactly once (rows taken in order per column tile)."""
    covered = torch.zeros(n_tokens, vocab_size, dtype=torch.int32)
    rows_seen: dict[int, int] = {}
    for rows, v0, cols in tiles:
        t0 = rows_seen.get(v0, 0)
        covered[t0:t0 + rows, v0:v0 + cols] += 1
        rows_seen[v0] = t0 + rows
    assert bool((covered == 1).all()), "backward tiles must cover the [N, V] grid exactly once"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_vocab_column_tiles(backend, dtype, grad_tile_spy, request, no_dftkern_env):
    """V > 4096 with budgets that split the vocabulary (and the tokens) in the backward pass.

    Labels sit on both sides of every column-tile border; the bias slice and the label offset
    must follow each tile.
    """
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    N, H, V = 6, 16, 9001
    hidden, weight, labels, bias = make_inputs(N, H, V, seed=23, dtype=dtype, with_bias=True)
    labels = torch.tensor([0, 4095, 4096, 8191, V - 1, -100])
    grad_out = random_upstream(N)
    kwargs = {"bias": bias, "softcap": 7.0, "temperature": 1.1}
    ref = reference_token_grads(hidden, weight, labels, grad_out, **kwargs)
    # budgeted bytes per logit (chunking.py docstring): fp32 logits; both epilogues write the
    # gradient over them (the torch engine's row-block scratch is outside the budget)
    per_logit = 4
    n_valid = N - 1  # the ignored last token enters no tile (compaction)
    # single tile; columns split with all tokens; tokens and columns both split; one token per tile
    for chunk_bytes, min_col_tiles in ((None, 1), (n_valid * 5000 * per_logit, 2), (2 * 4096 * per_logit, 3),
                                       (1, 3)):
        grad_tile_spy.clear()
        ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, backend=backend,
                               chunk_bytes=chunk_bytes, **kwargs)
        _assert_tiles_cover_grid(grad_tile_spy, n_valid, V)
        assert len({v0 for _, v0, _ in grad_tile_spy}) >= min_col_tiles, grad_tile_spy
        if dtype == torch.float32:
            assert_matches_reference(ours, ref)
        else:
            assert relative_error(ours["logp"], ref["logp"]) <= FWD_TOL
            for name in ("hidden", "weight", "bias"):
                assert ours[name].dtype == dtype
                assert relative_error(ours[name], ref[name]) <= 2e-3, name
