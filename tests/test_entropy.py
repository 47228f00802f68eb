"""Token entropy from ``fused_linear_logprobs(..., return_entropy=True)`` against float64 references.

The entropy is ``H = -sum_v p_v log p_v`` of ``p = softmax(z)`` after temperature/softcap. Checked:
values and gradients (for independent upstream gradients of logp and H, of H alone, of logp
alone) on both engines, fp64 gradcheck on the torch engine, fp16 inputs, the Triton kernel's
one-sweep entropy directly (several vocabulary tiles), ignored tokens, extreme logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from _reference import (
    LOGIT_TRANSFORMS,
    make_inputs,
    random_upstream,
    reference_token_entropy,
    reference_token_logprobs,
    relative_error,
    split_transform,
    transformed_logits,
)

from dftkern import fused_linear_logprobs


def _fp64_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def _run(hidden, weight, labels, bias, g_logp, g_ent, **kwargs):
    """Values and gradients of ``sum(g_logp * logp + g_ent * H)`` (either upstream may be None)."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    logp, ent = fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, **kwargs)
    total = 0.0
    if g_logp is not None:
        total = total + (logp * g_logp.to(logp.dtype)).sum()
    if g_ent is not None:
        total = total + (ent * g_ent.to(ent.dtype)).sum()
    total.backward()
    return logp.detach(), ent.detach(), {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def _reference(hidden, weight, labels, bias, g_logp, g_ent, **transform):
    h, w, b = _fp64_leaves(hidden, weight, bias)
    logp = reference_token_logprobs(h, w, labels, bias=b, **transform)
    ent = reference_token_entropy(h, w, labels, bias=b, **transform)
    total = 0.0
    if g_logp is not None:
        total = total + (logp * g_logp.double()).sum()
    if g_ent is not None:
        total = total + (ent * g_ent.double()).sum()
    total.backward()
    return logp.detach(), ent.detach(), {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


@pytest.mark.parametrize("config", list(LOGIT_TRANSFORMS.values()), ids=list(LOGIT_TRANSFORMS))
@pytest.mark.parametrize("upstream", ["both", "entropy-only", "logp-only"])
def test_entropy_values_and_grads_match_fp64(backend, config, upstream):
    with_bias, transform = split_transform(config)
    hidden, weight, labels, bias = make_inputs((3, 7), 16, 300, seed=5, with_bias=with_bias, logit_scale=2.0,
                                               ignore_fraction=0.25)
    g_logp = None if upstream == "entropy-only" else random_upstream(labels.shape, seed=2)
    g_ent = None if upstream == "logp-only" else random_upstream(labels.shape, seed=3)
    # several chunks in the forward and several (token x column) tiles in the backward
    logp, ent, grads = _run(hidden, weight, labels, bias, g_logp, g_ent, backend=backend, chunk_bytes=4 * 300 * 4,
                            **transform)
    ref_logp, ref_ent, ref_grads = _reference(hidden, weight, labels, bias, g_logp, g_ent, **transform)
    assert logp.dtype == ent.dtype == torch.float32 and ent.shape == labels.shape
    assert relative_error(logp, ref_logp) <= 1e-5
    assert relative_error(ent, ref_ent) <= 1e-5
    ignored = labels == -100
    assert bool((ent[ignored] == 0).all()) and bool((logp[ignored] == 0).all())
    for name, ref in ref_grads.items():
        if ref is None:
            continue
        assert relative_error(grads[name], ref) <= 1e-4, name
    assert bool((grads["hidden"][ignored] == 0).all()), "ignored tokens get no gradient"


def test_entropy_of_uniform_and_peaked_rows():
    """Uniform logits: H = log V; a row with one huge logit: H ~ 0 (no NaN, no negative)."""
    V = 257
    weight = torch.zeros(V, 4)
    weight[0, 0] = 1.0
    hidden = torch.tensor([[0.0, 1.0, 0.0, 0.0], [200.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([3, 0])
    _, ent = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend="torch")
    assert abs(ent[0].item() - math.log(V)) <= 1e-5
    assert 0.0 <= ent[1].item() <= 1e-30 * V + 1e-6


def test_entropy_large_logits(backend):
    hidden, weight, labels, _ = make_inputs(9, 16, 500, seed=8, logit_scale=30.0)
    _, ent = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    ref = reference_token_entropy(hidden, weight, labels)
    assert torch.isfinite(ent).all() and bool((ent >= -1e-6).all())
    assert (ent.double() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "row-per-chunk"])
def test_gradcheck_entropy_fp64(chunk_bytes):
    hidden, weight, labels, bias = make_inputs(5, 6, 11, seed=9, dtype=torch.float64, with_bias=True,
                                               ignore_fraction=0.2)
    labels[1] = -100

    def fn(h, w, b):
        logp, ent = fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend="torch",
                                          temperature=0.8, softcap=3.0, chunk_bytes=chunk_bytes)
        return logp, ent

    inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3)], ids=["fp16"])
def test_half_precision_inputs(backend, dtype, grad_tol):
    """fp16 inputs: logits and entropy are fp32 (never rounded), gradients come back in fp16."""
    hidden, weight, labels, bias = make_inputs(20, 32, 700, seed=12, dtype=dtype, with_bias=True, logit_scale=2.0,
                                               ignore_fraction=0.1)
    g_logp, g_ent = random_upstream(labels.shape, seed=4), random_upstream(labels.shape, seed=5)
    logp, ent, grads = _run(hidden, weight, labels, bias, g_logp, g_ent, backend=backend, softcap=6.0)
    ref_logp, ref_ent, ref_grads = _reference(hidden, weight, labels, bias, g_logp, g_ent, softcap=6.0)
    assert ent.dtype == torch.float32
    assert relative_error(ent, ref_ent) <= 1e-5 and relative_error(logp, ref_logp) <= 1e-5
    for name, ref in ref_grads.items():
        assert grads[name].dtype == dtype
        assert relative_error(grads[name], ref) <= grad_tol, name


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_kernel_one_sweep_entropy_multi_tile(softcap):
    """The Triton forward kernel's online (m, s, t) entropy over V = 4099 (three BLOCK_V tiles)."""
    from dftkern.kernels import launch_row_grad, launch_row_lse_target

    V = 4099
    hidden, weight, labels, bias = make_inputs(4, 16, V, seed=13, with_bias=True, logit_scale=3.0)
    labels[2] = -100
    logits = hidden @ weight.t()
    logp, lse, ent = launch_row_lse_target(logits, bias, labels, inv_temperature=1 / 0.9, softcap=softcap,
                                           ignore_index=-100, return_entropy=True)
    raw = logits.double().requires_grad_(True)
    z = transformed_logits(raw, torch.eye(V, dtype=torch.float64), bias=bias.double(), temperature=0.9,
                           softcap=softcap)
    logp_all = torch.log_softmax(z, -1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    keep = labels != -100
    assert relative_error(ent[keep], ref_ent[keep]) <= 1e-5 and ent[2] == 0
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-5)
    # gradient kernel with both upstreams, written in place
    g, gh = random_upstream(4, seed=6) * keep, random_upstream(4, seed=7) * keep
    ref_logp = logp_all.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    ((ref_logp * g.double()).sum() + (ref_ent * gh.double()).sum()).backward()
    out = launch_row_grad(logits, bias, labels, lse, g, logits, inv_temperature=1 / 0.9, softcap=softcap,
                          entropy=ent, grad_entropy=gh)
    assert relative_error(out, raw.grad) <= 1e-5
    with pytest.raises(ValueError, match="entropy"):
        launch_row_grad(logits, bias, labels, lse, g, logits, inv_temperature=1.0, softcap=None, entropy=ent)


def test_return_entropy_must_be_bool():
    hidden, weight, labels, _ = make_inputs(3, 4, 10, seed=1)
    with pytest.raises(TypeError, match="return_entropy"):
        fused_linear_logprobs(hidden, weight, labels, return_entropy="yes")


def test_entropy_with_masked_vocabulary_entries(backend):
    """A -inf bias entry (a masked token) has p = 0 and adds nothing to H or its gradient; before, the
    term 0 * (-inf) made the entropy NaN on both engines while the log-probs were right."""
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton engine takes fp32/fp16/bf16
    hidden, weight, labels, _ = make_inputs(5, 6, 11, seed=12, dtype=dtype)
    bias = torch.zeros(11, dtype=dtype)
    bias[[3, 7]] = -math.inf
    labels = torch.tensor([0, 1, 2, 4, 10])
    h = hidden.clone().requires_grad_(True)
    logp, ent = fused_linear_logprobs(h, weight, labels, bias=bias, return_entropy=True, backend=backend)
    (logp.sum() + 0.7 * ent.sum()).backward()
    keep = [v for v in range(11) if v not in (3, 7)]
    h_ref = hidden.double().requires_grad_(True)
    logp_all = (h_ref @ weight[keep].double().T).log_softmax(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    ref_logp = logp_all.gather(1, torch.tensor([keep.index(int(y)) for y in labels]).unsqueeze(1)).squeeze(1)
    (ref_logp.sum() + 0.7 * ref_ent.sum()).backward()
    tol = 1e-12 if backend == "torch" else 1e-5
    assert torch.isfinite(ent).all() and torch.isfinite(h.grad).all()
    assert relative_error(ent, ref_ent) <= tol and relative_error(logp, ref_logp) <= tol
    assert relative_error(h.grad, h_ref.grad) <= 10 * tol
