"""Every public op inside ``torch.autocast`` (TRL's trainers and HF's Trainer run the model under it).

Inside an autocast region the ops cast ``hidden``/``weight``/``bias`` to the autocast dtype, as
autocast does for a linear layer, and run with autocast off (their logit buffers stay fp32). So:

* each op gives exactly what it gives on explicitly cast inputs outside autocast (loss and
  gradients), and gradients reach float32 leaves in float32;
* float64 inputs are left alone (autocast does not lower float64);
* a backward called while autocast is still on gives the same gradients.

Before, autocast turned the fp32 logit chunk into bfloat16 and the backward's in-place half
view failed ("self.size(-1) must be divisible by 2", or a shape mismatch for even V).
"""

from __future__ import annotations

import pytest
import torch

import dftkern

R, T, H = 6, 5, 8
IGNORE = -100


def _inputs(vocab: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, H, generator=gen).to(dtype)
    weight = (0.4 * torch.randn(vocab, H, generator=gen)).to(dtype)
    bias = (0.1 * torch.randn(vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (R, T), generator=gen)
    labels[:, 0] = IGNORE
    return hidden, weight, bias, labels


def _ops(labels):
    ref = torch.linspace(-9.0, -4.0, R)
    old = torch.full((R, T), -2.0)
    return {
        "logprobs": lambda h, w, b: dftkern.fused_linear_logprobs(h, w, labels, bias=b).sum(),
        "logprobs+entropy": lambda h, w, b: sum(t.sum() for t in dftkern.fused_linear_logprobs(
            h, w, labels, bias=b, return_entropy=True)),
        "cross_entropy": lambda h, w, b: dftkern.fused_linear_cross_entropy(h, w, labels, bias=b),
        "sequence_logprobs": lambda h, w, b: dftkern.sequence_logprobs(h, w, labels, bias=b).sum(),
        "token_loss": lambda h, w, b: dftkern.fused_token_loss(h, w, labels, bias=b,
                                                               token_loss=lambda lp, ent, idx: -lp.sum()),
        "dft2": lambda h, w, b: dftkern.fused_dft_loss(h, w, labels, bias=b, num_negatives=2, variant="dft2"),
        "dpo": lambda h, w, b: dftkern.fused_preference_loss(h, w, labels, bias=b, loss="dpo", ref_logps=ref),
        "policy": lambda h, w, b: dftkern.fused_policy_loss(h, w, labels, bias=b, advantages=torch.linspace(-1, 1, R),
                                                            old_logps=old),
    }


def _run(op, hidden, weight, bias, *, autocast_dtype=None, backward_inside=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    if autocast_dtype is None:
        out = op(*leaves)
        out.backward()
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = op(*leaves)
            if backward_inside:
                out.backward()
        if not backward_inside:
            out.backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("vocab", [15, 16], ids=["odd-V", "even-V"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(_ops(None)))
def test_op_under_autocast_equals_the_op_on_cast_inputs(name, autocast_dtype, vocab):
    hidden, weight, bias, labels = _inputs(vocab)
    op = _ops(labels)[name]
    out, grads = _run(op, hidden, weight, bias, autocast_dtype=autocast_dtype)

    def cast_op(h, w, b):
        return op(h.to(autocast_dtype), w.to(autocast_dtype), b.to(autocast_dtype))

    ref_out, ref_grads = _run(cast_op, hidden, weight, bias)
    assert torch.isfinite(out) and out.dtype == ref_out.dtype
    assert torch.equal(out, ref_out)
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and torch.equal(g, ref_g)


@pytest.mark.parametrize("name", ["logprobs+entropy", "cross_entropy", "dft2", "policy"])
def test_backward_inside_autocast_gives_the_same_gradients(name):
    hidden, weight, bias, labels = _inputs(15)
    op = _ops(labels)[name]
    out, grads = _run(op, hidden, weight, bias, autocast_dtype=torch.bfloat16)
    out_in, grads_in = _run(op, hidden, weight, bias, autocast_dtype=torch.bfloat16, backward_inside=True)
    assert torch.equal(out, out_in)
    for g, g_in in zip(grads, grads_in):
        assert torch.equal(g, g_in)


def test_float64_inputs_are_not_lowered():
    hidden, weight, bias, labels = _inputs(15, dtype=torch.float64)
    op = _ops(labels)["cross_entropy"]
    out, grads = _run(op, hidden, weight, bias, autocast_dtype=torch.bfloat16)
    ref_out, ref_grads = _run(op, hidden, weight, bias)
    assert out.dtype == torch.float64 and torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_close_to_the_float32_result():
    """The bf16-cast op stays within bf16 input rounding of the fp32 op (its logits are fp32 products)."""
    hidden, weight, bias, labels = _inputs(15)
    op = _ops(labels)["cross_entropy"]
    out, _ = _run(op, hidden, weight, bias, autocast_dtype=torch.bfloat16)
    ref, _ = _run(op, hidden, weight, bias)
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
