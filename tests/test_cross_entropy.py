"""fused_linear_cross_entropy (6NHV, gradients in the forward) against float64 and the token op."""

import pytest
import torch

from dftkern import fused_linear_cross_entropy, fused_linear_logprobs


def _inputs(n=37, h=24, v=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=dtype)
    w = (torch.randn(v, h, generator=g, dtype=dtype) * 0.4)
    b = torch.randn(v, generator=g, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    return hid, w, b, y


def _reference(hid, w, b, y, reduction, temperature=1.0, softcap=None):
    z = (hid.double() @ w.double().T + b.double()) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = y != -100
    nll = -torch.log_softmax(z, -1).gather(-1, torch.where(keep, y, 0)[:, None])[:, 0] * keep
    return nll.sum() / keep.sum().clamp_min(1) if reduction == "mean" else nll.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_matches_float64(backend, reduction, chunk_rows):
    hid, w, b, y = _inputs()
    leaves = [t.clone().requires_grad_() for t in (hid, w, b)]
    ref_leaves = [t.double().requires_grad_() for t in (hid, w, b)]
    budget = None if chunk_rows is None else chunk_rows * w.shape[0] * 12
    loss = fused_linear_cross_entropy(*leaves[:2], y, bias=leaves[2], reduction=reduction, backend=backend,
                                      temperature=0.8, softcap=4.0, chunk_bytes=budget)
    (loss * 1.7).backward()
    ref = _reference(*ref_leaves, y, reduction, temperature=0.8, softcap=4.0)
    (ref * 1.7).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for ours, theirs in zip(leaves, ref_leaves):
        assert ((ours.grad.double() - theirs.grad).norm() / theirs.grad.norm()).item() <= 1e-4


def test_equals_token_op_and_reduction_none():
    hid, w, b, y = _inputs(seed=3)
    a = [t.clone().requires_grad_() for t in (hid, w)]
    c = [t.clone().requires_grad_() for t in (hid, w)]
    fused_linear_cross_entropy(*a, y).backward()
    (-fused_linear_logprobs(*c, y).sum() / (y != -100).sum()).backward()
    for x, z in zip(a, c):
        torch.testing.assert_close(x.grad, z.grad, rtol=1e-5, atol=1e-7)
    none = fused_linear_cross_entropy(hid, w, y, reduction="none")
    torch.testing.assert_close(none, -fused_linear_logprobs(hid, w, y))


def test_all_ignored_gives_zero_and_no_nan():
    hid, w, _, y = _inputs()
    y[:] = -100
    h = hid.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_no_grad_and_bad_reduction():
    hid, w, _, y = _inputs()
    with torch.no_grad():
        a = fused_linear_cross_entropy(hid, w, y)
    b = fused_linear_cross_entropy(hid.requires_grad_(), w, y)
    torch.testing.assert_close(a, b.detach())
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hid, w, y, reduction="avg")
