"""Triton engine on a real GPU: bf16/fp16/fp32 against float64 references (skipped without CUDA).

The interpreter cannot check bf16 (its ``tl.dot`` is wrong there, and the CPU path upcasts the
matmul), so this is where the bf16 CUDA path — cuBLAS bf16 x bf16 -> fp32 logits, Triton row
kernels, bf16 gradient products — is checked.
"""

import pytest
import torch

from dftkern import fused_dft_loss, fused_linear_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _reference(h, w, y, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    z = h.double() @ w.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z, -1)
    keep = y != ignore_index
    return torch.where(keep, lp.gather(-1, torch.where(keep, y, 0)[:, None])[:, 0], 0.0)


def _naive_same_dtype(h, w, y, ignore_index=-100):
    lp = torch.log_softmax(h @ w.T, -1)  # logits rounded to the input dtype
    keep = y != ignore_index
    return torch.where(keep, lp.gather(-1, torch.where(keep, y, 0)[:, None])[:, 0].float(), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(37, 48, 1000), (257, 128, 50257)])
@pytest.mark.parametrize("extras", [{}, {"temperature": 0.7, "softcap": 30.0, "with_bias": True}])
@pytest.mark.parametrize("tiles", ["vocab", "tokens"])
def test_matches_float64(dtype, n, h, v, extras, tiles):
    torch.manual_seed(0)
    dev = "cuda"
    extras = dict(extras)
    with_bias = extras.pop("with_bias", False)
    hid = (torch.randn(n, h, device=dev) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=dev) / h**0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, device=dev)).to(dtype).requires_grad_() if with_bias else None
    y = torch.randint(0, v, (n,), device=dev)
    y[::5] = -100
    g = torch.randn(n, device=dev)
    # "vocab": backward tiles over vocabulary columns only; "tokens": over tokens and columns
    budget = 64 * v * 6 if tiles == "vocab" else 16 * 4096 * 4
    out = fused_linear_logprobs(hid, w, y, bias=b, backend="triton", chunk_bytes=budget, **extras)
    (out * g).sum().backward()
    hd = hid.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    ref = _reference(hd, wd, y, bd, **extras)
    (ref * g.double()).sum().backward()
    if dtype == torch.float32:
        assert _rel(out, ref) <= 1e-5
        assert _rel(hid.grad, hd.grad) <= 1e-4 and _rel(w.grad, wd.grad) <= 1e-4
    else:
        assert _rel(out, ref) <= 1e-5  # logits are fp32 from exact products of the rounded inputs
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        assert _rel(hid.grad, hd.grad) <= tol and _rel(w.grad, wd.grad) <= tol
        if not extras and b is None:
            naive = _naive_same_dtype(hid.detach(), w.detach(), y)
            assert _rel(out, ref) <= _rel(naive, ref)


def test_out_of_range_label_gives_nan_without_validation():
    dev = "cuda"
    hid = torch.randn(4, 16, device=dev)
    w = torch.randn(10, 16, device=dev)
    y = torch.tensor([1, 2, 10, -100], device=dev)
    out = fused_linear_logprobs(hid, w, y, backend="triton")
    assert torch.isnan(out[2]) and out[3] == 0 and torch.isfinite(out[:2]).all()
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(hid, w, y, backend="triton", validate=True)


def test_dft_schedules_agree_bf16():
    torch.manual_seed(0)
    dev, g_, k, t, h, v = "cuda", 2, 3, 33, 64, 5003
    r = g_ * (1 + k)
    hid = torch.randn(r, t, h, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(v, h, device=dev) / 8).to(torch.bfloat16)
    y = torch.randint(0, v, (r, t), device=dev)
    y[:, :5] = -100
    ref = torch.randn(g_, k, device=dev) - 30
    grads = []
    for schedule in ("fused", "recompute"):
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_dft_loss(hh, ww, y, num_negatives=k, ref_logps=ref, schedule=schedule)
        loss.backward()
        grads.append((loss.detach(), hh.grad.float(), ww.grad.float()))
    (l1, h1, w1), (l2, h2, w2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert _rel(h1, h2) < 1e-2 and _rel(w1, w2) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_multi_chunk_matches_float64(dtype):
    """Several chunks: exercises the in-place fp32 dW accumulation of the 6NHV path."""
    from dftkern import fused_linear_cross_entropy

    torch.manual_seed(0)
    dev, n, h, v = "cuda", 300, 128, 50000
    hid = torch.randn(n, h, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=dev) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=dev)
    y[::3] = -100
    loss = fused_linear_cross_entropy(hid, w, y, chunk_bytes=40 * v * 4)  # 8 chunks
    loss.backward()
    hd, wd = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    keep = y != -100
    ref = -(torch.log_softmax(hd @ wd.T, -1).gather(-1, torch.where(keep, y, 0)[:, None])[:, 0] * keep).sum() / keep.sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(hid.grad, hd.grad) <= tol and _rel(w.grad, wd.grad) <= tol
