"""``fused_token_loss`` (6nHV, gradients in the forward) against autograd through ``fused_linear_logprobs``.

The reference path computes ``logp, H = fused_linear_logprobs(..., return_entropy=True)`` (itself
checked against float64 in test_entropy.py), applies the same token loss to the valid tokens and
backpropagates (8nHV). Several token losses (a PPO-like clipped ratio, the k3 KL estimator, an
entropy bonus, per-token weights gathered by index), both engines, padded and packed layouts,
several chunks, given ``valid_positions``; plus a float64 end-to-end check and argument errors.
"""

from __future__ import annotations

import pytest
import torch
from _reference import make_inputs, reference_token_entropy, reference_token_logprobs, relative_error

from dftkern import fused_linear_logprobs, fused_token_loss
from dftkern.engines import TorchRowEngine


def _per_token(shape, seed, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def make_token_losses(n_tokens: int):
    """name -> token_loss(logp, entropy, index); constants are ``[N]`` tensors gathered by ``index``."""
    advantages = _per_token(n_tokens, 1)
    old_logp = _per_token(n_tokens, 2, 0.3, -5.0)
    ref_logp = _per_token(n_tokens, 3, 0.3, -5.0)
    weights = _per_token(n_tokens, 4).abs()

    def ppo_clip(logp, entropy, index):
        ratio = torch.exp(logp - old_logp.to(logp)[index])
        adv = advantages.to(logp)[index]
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)

    def k3_kl(logp, entropy, index):
        d = ref_logp.to(logp)[index] - logp
        return 0.05 * (torch.exp(d) - d - 1.0)

    def entropy_bonus(logp, entropy, index):
        return -logp - 0.01 * entropy

    def weighted_nll(logp, entropy, index):
        return -weights.to(logp)[index] * logp

    return {"ppo-clip": ppo_clip, "k3-kl": k3_kl, "entropy-bonus": entropy_bonus, "weighted-nll": weighted_nll}


LOSS_NAMES = ["ppo-clip", "k3-kl", "entropy-bonus", "weighted-nll"]


def _leaves(hidden, weight, bias):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]


def _autograd_reference(hidden, weight, labels, bias, token_loss, **kwargs):
    h, w, b = _leaves(hidden, weight, bias)
    logp, ent = fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, **kwargs)
    index = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    loss = token_loss(logp.reshape(-1)[index], ent.reshape(-1)[index], index).sum()
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


def _fused(hidden, weight, labels, bias, token_loss, scale=1.0, **kwargs):
    h, w, b = _leaves(hidden, weight, bias)
    loss = fused_token_loss(h, w, labels, bias=b, token_loss=token_loss, **kwargs)
    (loss * scale).backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one-chunk", "chunks-of-4"])
def test_matches_autograd_through_token_op(backend, loss_name, layout, chunk_rows):
    V = 211
    hidden, weight, labels, bias = make_inputs((3, 9), 16, V, seed=21, with_bias=True, logit_scale=1.5,
                                               ignore_fraction=0.3)
    labels[1] = -100  # an empty row
    kwargs = dict(backend=backend, temperature=0.9, softcap=6.0)
    if layout == "packed":
        hidden, labels = hidden.reshape(-1, 16), labels.reshape(-1)
        kwargs["cu_seqlens"] = [0, 9, 18, 27]
    token_loss = make_token_losses(labels.numel())[loss_name]
    chunk_bytes = None if chunk_rows is None else chunk_rows * V * 4
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "cu_seqlens"}
    ref_loss, ref_grads = _autograd_reference(hidden, weight, labels, bias, token_loss, **ref_kwargs)
    loss, grads = _fused(hidden, weight, labels, bias, token_loss, chunk_bytes=chunk_bytes, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    for name, got, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert relative_error(got, ref) <= 1e-5, name


def test_float64_end_to_end_and_grad_output_scaling():
    """fp64 inputs against the plain float64 definition, with a non-unit upstream gradient."""
    hidden, weight, labels, bias = make_inputs(13, 8, 50, seed=22, dtype=torch.float64, with_bias=True,
                                               ignore_fraction=0.3)
    token_loss = make_token_losses(13)["entropy-bonus"]
    loss, grads = _fused(hidden, weight, labels, bias, token_loss, scale=-2.5, backend="torch", chunk_bytes=3 * 50 * 8)
    h, w, b = _leaves(hidden, weight, bias)
    keep = labels != -100
    logp = reference_token_logprobs(h, w, labels, bias=b)
    ent = reference_token_entropy(h, w, labels, bias=b)
    ref = torch.where(keep, -logp - 0.01 * ent, torch.zeros_like(logp)).sum()
    (ref * -2.5).backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-12 * abs(ref.item())
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        assert relative_error(got, want) <= 1e-12


def test_entropy_free_loss_takes_the_plain_epilogue(monkeypatch):
    """A loss without an entropy term: the gradient epilogue gets grad_entropy=None."""
    seen = []
    original = TorchRowEngine.grad_logits

    def spy(self, *args, grad_entropy=None, **kwargs):
        seen.append(grad_entropy is None)
        return original(self, *args, grad_entropy=grad_entropy, **kwargs)

    monkeypatch.setattr(TorchRowEngine, "grad_logits", spy)
    hidden, weight, labels, _ = make_inputs(10, 8, 40, seed=23)
    losses = make_token_losses(10)
    _fused(hidden, weight, labels, None, losses["k3-kl"], backend="torch")
    _fused(hidden, weight, labels, None, losses["entropy-bonus"], backend="torch")
    assert seen == [True, False]


def test_valid_positions_and_token_values(backend):
    hidden, weight, labels, bias = make_inputs((2, 11), 8, 64, seed=24, with_bias=True, ignore_fraction=0.4)
    token_loss = make_token_losses(22)["ppo-clip"]
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    a_loss, a_grads = _fused(hidden, weight, labels, bias, token_loss, backend=backend)
    b_loss, b_grads = _fused(hidden, weight, labels, bias, token_loss, backend=backend, valid_positions=positions)
    assert a_loss.item() == b_loss.item()
    for x, y in zip(a_grads, b_grads):
        assert torch.equal(x, y)
    loss, logp, ent = fused_token_loss(hidden, weight, labels, bias=bias, token_loss=token_loss, backend=backend,
                                       return_token_values=True)
    ref_logp, ref_ent = fused_linear_logprobs(hidden, weight, labels, bias=bias, backend=backend, return_entropy=True)
    assert logp.shape == ent.shape == labels.shape and not logp.requires_grad
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-6)
    with torch.no_grad():
        no_grad_loss = fused_token_loss(hidden, weight, labels, bias=bias, token_loss=token_loss, backend=backend)
    assert abs(no_grad_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())


def test_all_ignored_and_empty():
    hidden, weight, labels, _ = make_inputs(6, 8, 30, seed=25)
    labels[:] = -100
    calls = []

    def token_loss(logp, entropy, index):
        calls.append(int(logp.numel()))
        return -logp

    loss, (gh, gw, _) = _fused(hidden, weight, labels, None, token_loss, backend="torch")
    assert loss.item() == 0.0 and calls == [0]
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_accum_dtype_weight_equals_fp32_for_fp32_weights():
    hidden, weight, labels, _ = make_inputs(30, 8, 40, seed=26, ignore_fraction=0.2)
    token_loss = make_token_losses(30)["weighted-nll"]
    _, a = _fused(hidden, weight, labels, None, token_loss, backend="torch", chunk_bytes=5 * 40 * 4)
    _, b = _fused(hidden, weight, labels, None, token_loss, backend="torch", chunk_bytes=5 * 40 * 4,
                  accum_dtype="weight")
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-7)


def test_backward_twice_raises():
    hidden, weight, labels, _ = make_inputs(5, 8, 20, seed=27)
    w = weight.clone().requires_grad_(True)
    loss = fused_token_loss(hidden, w, labels, token_loss=lambda lp, en, ix: -lp, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_argument_errors():
    hidden, weight, labels, _ = make_inputs((2, 3), 8, 20, seed=28)
    with pytest.raises(TypeError, match="token_loss"):
        fused_token_loss(hidden, weight, labels, token_loss=None)
    with pytest.raises(TypeError, match="token_loss"):
        fused_token_loss(hidden, weight.requires_grad_(True), labels, token_loss=lambda lp, en, ix: 1.0)
    with pytest.raises(ValueError, match="packed"):
        fused_token_loss(hidden, weight, labels, token_loss=lambda lp, en, ix: -lp, cu_seqlens=[0, 3, 6])
    with pytest.raises(ValueError, match="accum_dtype"):
        fused_token_loss(hidden, weight, labels, token_loss=lambda lp, en, ix: -lp, accum_dtype="fp8")
    with pytest.raises(TypeError, match="return_token_values"):
        fused_token_loss(hidden, weight, labels, token_loss=lambda lp, en, ix: -lp, return_token_values=1)
