"""Entropy, fused_token_loss, compaction and accum_dtype on a real GPU (skipped without CUDA).

The compiled Triton kernels (the interpreter runs them on CPU in tests/test_entropy.py and
tests/test_token_loss.py) in fp32/bf16 against float64, and the host-sync contract: with
``valid_positions`` given on the CPU a call makes no device synchronization; without, at most one
(the label mask copied to the host). Checked with ``torch.cuda.set_sync_debug_mode``.
"""

import warnings

import pytest
import torch

from dftkern import fused_linear_cross_entropy, fused_linear_logprobs, fused_preference_loss, fused_token_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(n, h, v, dtype, ignore_every=3, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hid = (torch.randn(n, h, device=DEV, generator=g) * 2).to(dtype)
    w = (torch.randn(v, h, device=DEV, generator=g) / h ** 0.5 * 3).to(dtype)
    y = torch.randint(0, v, (n,), device=DEV, generator=g)
    y[::ignore_every] = -100
    return hid, w, y


def _reference(hd, wd, y, temperature=1.0, softcap=None):
    z = (hd @ wd.T) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z, -1)
    keep = y != -100
    logp = torch.where(keep, logp_all.gather(-1, torch.where(keep, y, 0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1000, 50257])
def test_entropy_matches_float64(dtype, v):
    hid, w, y = _inputs(257, 128, v, dtype)
    h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    g1, g2 = torch.randn(257, device=DEV), torch.randn(257, device=DEV)
    logp, ent = fused_linear_logprobs(h_, w_, y, return_entropy=True, backend="triton", temperature=0.8, softcap=30.0,
                                      chunk_bytes=64 * v * 4)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    hd, wd = hid.double().requires_grad_(), w.double().requires_grad_()
    ref_logp, ref_ent = _reference(hd, wd, y, 0.8, 30.0)
    ((ref_logp * g1.double()).sum() + (ref_ent * g2.double()).sum()).backward()
    assert _rel(logp, ref_logp) <= 1e-5 and _rel(ent, ref_ent) <= 1e-5
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(h_.grad, hd.grad) <= tol and _rel(w_.grad, wd.grad) <= tol
    assert (h_.grad[y == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_loss_matches_float64(dtype):
    n, v = 300, 32000
    hid, w, y = _inputs(n, 128, v, dtype)
    adv = torch.randn(n, device=DEV)
    old = torch.randn(n, device=DEV) * 0.1 - 8

    def ppo(logp, ent, index):
        ratio = torch.exp(logp - old[index])
        return -torch.minimum(ratio * adv[index], ratio.clamp(0.8, 1.2) * adv[index]) - 0.01 * ent

    h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_token_loss(h_, w_, y, token_loss=ppo, chunk_bytes=50 * v * 4)  # several chunks
    loss.backward()
    hd, wd = hid.double().requires_grad_(), w.double().requires_grad_()
    logp, ent = _reference(hd, wd, y)
    keep = (y != -100).nonzero()[:, 0]
    ref = ppo(logp[keep], ent[keep], keep).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(h_.grad, hd.grad) <= tol and _rel(w_.grad, wd.grad) <= tol


@pytest.mark.parametrize("accum", ["fp32", "weight"])
def test_cross_entropy_bf16_accumulation(accum):
    hid, w, y = _inputs(600, 128, 50000, torch.bfloat16)
    w_ = w.clone().requires_grad_()
    fused_linear_cross_entropy(hid, w_, y, chunk_bytes=60 * 50000 * 4, accum_dtype=accum).backward()  # 7 chunks
    wd = w.double().requires_grad_()
    keep = y != -100
    ref = -(torch.log_softmax(hid.double() @ wd.T, -1).gather(-1, torch.where(keep, y, 0)[:, None])[:, 0]
            * keep).sum() / keep.sum()
    ref.backward()
    assert _rel(w_.grad, wd.grad) <= (1e-2 if accum == "fp32" else 2e-2)


def test_compaction_no_sync_with_valid_positions_and_at_most_one_without():
    hid, w, y = _inputs(512, 128, 32000, torch.bfloat16, ignore_every=2)
    positions = (y != -100).nonzero()[:, 0].cpu()
    h_ = hid.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logp = fused_linear_logprobs(h_, w, y, backend="triton", valid_positions=positions, validate=False)
        logp.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert (h_.grad[y == -100] == 0).all()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused_linear_cross_entropy(hid.clone().requires_grad_(), w, y, validate=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [c for c in caught if "synchroniz" in str(c.message).lower()]
    assert len(syncs) <= 1, [str(c.message) for c in syncs]


def test_dpo_with_half_prompt_matches_recompute_bf16():
    torch.manual_seed(0)
    r, t, h, v = 4, 256, 128, 32000
    hid = torch.randn(r, t, h, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(v, h, device=DEV) / 8).to(torch.bfloat16)
    y = torch.randint(0, v, (r, t), device=DEV)
    y[:, : t // 2] = -100
    ref_logps = torch.randn(r, device=DEV) - 300
    out = []
    for schedule in ("fused", "recompute"):
        hh, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_preference_loss(hh, ww, y, loss="dpo", ref_logps=ref_logps, schedule=schedule)
        loss.backward()
        out.append((loss.detach(), hh.grad.float(), ww.grad.float()))
        assert (hh.grad[:, : t // 2] == 0).all()
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5)
    assert _rel(out[0][1], out[1][1]) < 1e-2 and _rel(out[0][2], out[1][2]) < 1e-2
