"""The Triton row kernels, run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest.py).

Small odd shapes only (the interpreter executes one program per row in NumPy): ``V`` is never a
multiple of a block, and ``V = 4099 > 2048`` makes the vocabulary loop run several ``BLOCK_V``
tiles. Also here: agreement with Liger-Kernel's fused linear cross-entropy (its Triton kernel runs
under the same interpreter).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _reference import (
    FWD_TOL,
    GRAD_TOL,
    LOGIT_TRANSFORMS,
    assert_matches_reference,
    assert_no_worse_than_naive,
    make_inputs,
    random_upstream,
    reference_sequence_logprobs,
    reference_token_grads,
    relative_error,
    split_transform,
    transformed_logits,
    value_and_grads,
)

from dftkern import fused_linear_logprobs, sequence_logprobs
from dftkern.engines import TorchRowEngine, TritonRowEngine

pytestmark = pytest.mark.usefixtures("triton_cpu")

SHAPES = {"N37-H48-V1000": (37, 48, 1000), "N5-H16-V4099-multi-tile": (5, 16, 4099)}


@pytest.fixture
def engine_spy(monkeypatch):
    """Counts forward-epilogue calls per engine (proves which engine actually ran)."""
    calls = {"triton": 0, "torch": 0}
    for cls, key in ((TritonRowEngine, "triton"), (TorchRowEngine, "torch")):
        original = cls.lse_and_logp

        def spy(self, *args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "lse_and_logp", spy)
    return calls


@pytest.mark.parametrize("config", list(LOGIT_TRANSFORMS.values()), ids=list(LOGIT_TRANSFORMS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_fp32_matches_fp64(shape, config, engine_spy):
    with_bias, kwargs = split_transform(config)
    hidden, weight, labels, bias = make_inputs(shape[0], shape[1], shape[2], seed=30, with_bias=with_bias,
                                               ignore_fraction=0.2)
    labels[0] = -100
    labels[-1] = shape[2] - 1  # the very last vocabulary column, in the partial last tile
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, **kwargs)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, backend="triton",
                           **kwargs)
    assert engine_spy == {"triton": 1, "torch": 0}
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["no-softcap", "softcap"])
def test_triton_large_logits(softcap):
    hidden, weight, labels, bias = make_inputs(37, 48, 1000, seed=31, with_bias=True, logit_scale=30.0,
                                               ignore_fraction=0.1)
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, softcap=softcap)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, softcap=softcap,
                           backend="triton")
    assert_matches_reference(ours, ref)


def test_triton_agrees_with_torch_engine_multi_chunk():
    hidden, weight, labels, bias = make_inputs((3, 7), 40, 4099, seed=32, with_bias=True, ignore_fraction=0.2)
    kwargs = {"bias": bias, "temperature": 1.4, "softcap": 9.0}
    grad_out = random_upstream(labels.shape)
    torch_run = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, backend="torch", **kwargs)
    for chunk_bytes in (None, 1, 4 * 4099 * 4):
        triton_run = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, backend="triton",
                                     chunk_bytes=chunk_bytes, **kwargs)
        torch.testing.assert_close(triton_run["logp"], torch_run["logp"], rtol=1e-5, atol=1e-5)
        for name in ("hidden", "weight", "bias"):
            torch.testing.assert_close(triton_run[name], torch_run[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"])
def test_triton_half_precision_no_worse_than_naive_pipeline(dtype, grad_tol):
    # bf16 is included because it passes honestly: the kernels do no tl.dot (the interpreter's
    # weak spot for bf16); they only load bf16 bias and compute in fp32.
    hidden, weight, labels, bias = make_inputs(37, 48, 1000, seed=33, dtype=dtype, with_bias=True,
                                               logit_scale=2.0, ignore_fraction=0.1)
    op = functools.partial(fused_linear_logprobs, backend="triton")
    assert_no_worse_than_naive(op, hidden, weight, labels, bias, {"temperature": 0.9, "softcap": 8.0},
                               grad_tol=grad_tol)


@pytest.mark.parametrize("pattern", ["first", "last", "all"])
def test_triton_ignore_patterns(pattern):
    hidden, weight, labels, bias = make_inputs((2, 6), 16, 1000, seed=34, with_bias=True)
    labels = labels.clone()
    if pattern == "first":
        labels[0, 0] = -100
    elif pattern == "last":
        labels[-1, -1] = -100
    else:
        labels.fill_(-100)
    grad_out = random_upstream(labels.shape)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, bias=bias, softcap=3.0,
                           backend="triton")
    ignored = labels == -100
    assert torch.equal(ours["logp"][ignored], torch.zeros(int(ignored.sum())))
    assert torch.count_nonzero(ours["hidden"][ignored]) == 0
    if pattern == "all":
        assert torch.count_nonzero(ours["weight"]) == 0 and torch.count_nonzero(ours["bias"]) == 0
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, softcap=3.0)
    assert_matches_reference(ours, ref)


def test_triton_custom_ignore_index_inside_vocab():
    hidden, weight, labels, _ = make_inputs(21, 16, 1000, seed=35)
    labels = labels.clone()
    labels[::4] = 3
    grad_out = random_upstream(labels.shape)
    ref = reference_token_grads(hidden, weight, labels, grad_out, ignore_index=3)
    ours = value_and_grads(fused_linear_logprobs, hidden, weight, labels, grad_out, ignore_index=3, backend="triton")
    assert torch.equal(ours["logp"][::4], torch.zeros(6))
    assert_matches_reference(ours, ref)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_triton_sequence_logprobs_packed(average):
    hidden, weight, labels, bias = make_inputs(17, 16, 1000, seed=36, with_bias=True)
    labels = labels.clone()
    labels[[0, 1, 9]] = -100
    cu_seqlens = torch.tensor([0, 5, 5, 9, 10, 17], dtype=torch.int32)  # row 1 has no tokens, row 3 all ignored
    out = sequence_logprobs(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, average=average,
                            backend="triton")
    ref = reference_sequence_logprobs(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens, average=average)
    assert out.shape == (5,)
    assert out[1] == 0.0 and out[3] == 0.0
    assert relative_error(out, ref) <= FWD_TOL


def test_env_backend_triton_is_honoured(monkeypatch, engine_spy):
    hidden, weight, labels, _ = make_inputs(9, 8, 100, seed=37)
    monkeypatch.setenv("DFTKERN_BACKEND", "triton")
    via_env = fused_linear_logprobs(hidden, weight, labels)  # backend="auto" defers to the env
    assert engine_spy == {"triton": 1, "torch": 0}
    fused_linear_logprobs(hidden, weight, labels, backend="torch")  # an explicit backend beats the env
    assert engine_spy == {"triton": 1, "torch": 1}
    monkeypatch.delenv("DFTKERN_BACKEND")
    fused_linear_logprobs(hidden, weight, labels)  # auto on CPU: the torch engine
    assert engine_spy == {"triton": 1, "torch": 2}
    torch.testing.assert_close(via_env, fused_linear_logprobs(hidden, weight, labels), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the kernels directly (dftkern.kernels), including paths the CPU schedule does not take
# ---------------------------------------------------------------------------------------------


def _chunk_and_truth(n_rows: int, vocab_size: int, seed: int, *, bias_dtype=None, softcap=None, temperature=1.0):
    hidden, weight, labels, bias = make_inputs(n_rows, 16, vocab_size, seed=seed, with_bias=bias_dtype is not None)
    if bias is not None:
        bias = bias.to(bias_dtype)
    logits = hidden @ weight.t()
    z = transformed_logits(logits.double(), torch.eye(vocab_size, dtype=torch.float64),
                           bias=None if bias is None else bias.double(), temperature=temperature, softcap=softcap)
    return logits, bias, labels, z


def test_kernel_nan_for_out_of_range_label_and_zero_for_ignored():
    from dftkern.kernels import launch_row_lse_target

    logits, _, labels, z = _chunk_and_truth(6, 1000, seed=38)
    labels = labels.clone()
    labels[1], labels[2], labels[3] = 1000, -5, -100
    logp, lse = launch_row_lse_target(logits, None, labels, inv_temperature=1.0, softcap=None, ignore_index=-100)
    assert torch.isnan(logp[1]) and torch.isnan(logp[2]), "out-of-range labels must give NaN, never a clamped value"
    assert logp[3] == 0.0
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    ok = [0, 4, 5]
    expected = z[ok].gather(1, labels[ok].unsqueeze(1)).squeeze(1) - torch.logsumexp(z[ok], -1)
    torch.testing.assert_close(logp[ok].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab_size", [1000, 4099])
def test_kernel_grad_into_separate_output_dtype(out_dtype, vocab_size):
    """``launch_row_grad`` writing into a separate fp32/fp16/bf16 buffer (the CUDA half-precision path)."""
    from dftkern.kernels import launch_row_grad, launch_row_lse_target

    logits, bias, labels, z = _chunk_and_truth(4, vocab_size, seed=39, bias_dtype=torch.bfloat16, softcap=6.0,
                                               temperature=0.8)
    _, lse = launch_row_lse_target(logits, bias, labels, inv_temperature=1 / 0.8, softcap=6.0, ignore_index=-100)
    grad_logp = random_upstream(4)
    out = torch.full(logits.shape, float("nan"), dtype=out_dtype)
    result = launch_row_grad(logits, bias, labels, lse, grad_logp, out, inv_temperature=1 / 0.8, softcap=6.0)
    assert result is out and result.dtype == out_dtype
    raw = logits.double().requires_grad_(True)
    ref_z = transformed_logits(raw, torch.eye(vocab_size, dtype=torch.float64), bias=bias.double(),
                               temperature=0.8, softcap=6.0)
    ref_logp = torch.log_softmax(ref_z, -1).gather(1, labels.unsqueeze(1)).squeeze(1)
    (ref_logp * grad_logp.double()).sum().backward()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert not torch.isnan(out).any(), "every column of every row must be written"
    assert relative_error(out, raw.grad) <= tol


def _reference_logit_grad(logits, bias, labels, grad_logp, *, temperature=1.0, softcap=None):
    """float64 d(sum_r g_r * logp_r) / d(raw logits) ``[n, V]`` for a full-vocabulary chunk."""
    raw = logits.double().requires_grad_(True)
    z = transformed_logits(raw, torch.eye(logits.shape[1], dtype=torch.float64),
                           bias=None if bias is None else bias.double(), temperature=temperature, softcap=softcap)
    keep = labels != -100
    logp = torch.log_softmax(z, -1).gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    (torch.where(keep, logp, torch.zeros_like(logp)) * grad_logp.double()).sum().backward()
    return raw.grad


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_grad_half_precision_written_over_its_fp32_input(out_dtype):
    """The CUDA half-precision path: dX written into ``logits.view(half)[:, :V]`` (aliasing the input)."""
    from dftkern.kernels import launch_row_grad, launch_row_lse_target

    V = 4099  # several BLOCK_V tiles per row, so later tiles overwrite bytes already consumed
    logits, bias, labels, _ = _chunk_and_truth(3, V, seed=42, bias_dtype=out_dtype, softcap=5.0)
    _, lse = launch_row_lse_target(logits, bias, labels, inv_temperature=1.0, softcap=5.0, ignore_index=-100)
    grad_logp = random_upstream(3)
    expected = _reference_logit_grad(logits, bias, labels, grad_logp, softcap=5.0)
    out = logits.view(out_dtype)[:, :V]
    assert out.data_ptr() == logits.data_ptr() and out.stride(0) == 2 * V
    launch_row_grad(logits, bias, labels, lse, grad_logp, out, inv_temperature=1.0, softcap=5.0)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert relative_error(out, expected) <= tol


def test_kernel_grad_vocabulary_slice_with_label_offset():
    """A backward tile holding vocabulary columns v0:v1 (labels stay global ids, lse is over all of V)."""
    from dftkern.kernels import launch_row_grad, launch_row_lse_target

    V, v0, v1 = 3000, 1100, 2300
    logits, bias, labels, _ = _chunk_and_truth(5, V, seed=43, bias_dtype=torch.float32, temperature=0.6)
    labels = torch.tensor([v0 - 1, v0, 1700, v1 - 1, v1])  # two labels just outside the slice
    _, lse = launch_row_lse_target(logits, bias, labels, inv_temperature=1 / 0.6, softcap=None, ignore_index=-100)
    grad_logp = random_upstream(5)
    expected = _reference_logit_grad(logits, bias, labels, grad_logp, temperature=0.6)[:, v0:v1]
    tile = logits[:, v0:v1].contiguous()
    launch_row_grad(tile, bias[v0:v1], labels, lse, grad_logp, tile, inv_temperature=1 / 0.6, softcap=None,
                    label_offset=v0)
    assert relative_error(tile, expected) <= 1e-5
    # the +g one-hot term landed exactly on the in-slice labels
    assert (tile[1, 0] > 0) == (grad_logp[1] > 0) and (tile[3, -1] > 0) == (grad_logp[3] > 0)


def test_kernel_strided_rows_and_in_place():
    """Rows with a stride larger than V (a slice of a wider buffer), gradient written in place."""
    from dftkern.kernels import launch_row_grad, launch_row_lse_target

    logits, _, labels, z = _chunk_and_truth(3, 1000, seed=40)
    wide = torch.full((3, 1000 + 37), 1e4)  # poison outside the slice
    wide[:, :1000] = logits
    view = wide[:, :1000]
    assert view.stride(0) == 1037
    logp, lse = launch_row_lse_target(view, None, labels, inv_temperature=1.0, softcap=None, ignore_index=-100)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    grad_logp = random_upstream(3)
    launch_row_grad(view, None, labels, lse, grad_logp, view, inv_temperature=1.0, softcap=None)
    probs = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(labels, 1000).double()
    expected = grad_logp.double().unsqueeze(1) * (onehot - probs)
    assert relative_error(view, expected) <= 1e-5
    assert torch.equal(wide[:, 1000:], torch.full((3, 37), 1e4)), "the kernel wrote outside its rows"


# ---------------------------------------------------------------------------------------------
# Liger-Kernel's fused linear cross-entropy
# ---------------------------------------------------------------------------------------------


def _liger_fused_linear_ce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"liger_kernel is not importable: {exc!r}")
    return liger_fused_linear_cross_entropy


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_bias,softcap", [(False, None), (True, None), (True, 5.0)],
                         ids=["no-bias", "bias", "bias+softcap"])
def test_agrees_with_liger_fused_linear_cross_entropy(backend, with_bias, softcap):
    """sum(-logp) equals Liger's reduction='sum' loss, and the gradients agree.

    Liger has no temperature argument. With a softcap its kernel calls ``softcap.to(tl.float32)`` on
    a Python float, which the Triton interpreter rejects (liger-kernel 0.8.5): that case skips on CPU
    with Liger's error as the reason and runs where Liger's kernel compiles (GPU).
    """
    liger_flce = _liger_fused_linear_ce()
    hidden, weight, labels, bias = make_inputs(37, 48, 1000, seed=41, with_bias=with_bias, ignore_fraction=0.2)
    labels[0] = -100

    def liger_loss(h, w, y, bias=None):
        return liger_flce(h, w, y, bias=bias, ignore_index=-100, reduction="sum", softcap=softcap)

    def ours_loss(h, w, y, bias=None):
        return -fused_linear_logprobs(h, w, y, bias=bias, softcap=softcap, backend=backend).sum()

    try:
        liger = value_and_grads(liger_loss, hidden, weight, labels, torch.tensor(1.0), bias=bias)
    except Exception as exc:  # depends on the liger/triton versions and the device
        pytest.skip(f"Liger's fused linear cross-entropy cannot run on CPU here: {exc!r}")
    ours = value_and_grads(ours_loss, hidden, weight, labels, torch.tensor(1.0), bias=bias)
    ref = reference_token_grads(hidden, weight, labels, -torch.ones(37), bias=bias, softcap=softcap)
    assert abs(ours["logp"].item() - liger["logp"].item()) <= 1e-5 * abs(liger["logp"].item())
    assert abs(ours["logp"].item() + ref["logp"].sum().item()) <= 1e-5 * abs(ref["logp"].sum().item())
    for name in ("hidden", "weight", "bias"):
        if bias is None and name == "bias":
            continue
        torch.testing.assert_close(ours[name], liger[name], rtol=1e-4, atol=1e-6, msg=name)
        assert relative_error(ours[name], ref[name]) <= GRAD_TOL
