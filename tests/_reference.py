"""Float64 references of the plain definitions, shared by the test modules.

Everything here is deliberately the *naive* math, written independently of ``dftkern``:

* :func:`reference_token_logprobs` — ``log_softmax(z)[label]`` in float64 with
  ``z = (h W^T + b) / temperature``, then ``softcap * tanh(z / softcap)``; 0 where
  ``label == ignore_index``. Differentiable (autograd in float64).
* :func:`reference_token_entropy` — float64 entropy ``-sum_v p_v log p_v`` of ``p = softmax(z)`` per
  token (same ``z``), 0 where ignored. Differentiable.
* :func:`reference_token_grads` — float64 gradients of ``sum(grad_out * logp)`` w.r.t. hidden,
  weight and bias, computed by autograd on float64 copies of the inputs.
* :func:`reference_sequence_logprobs` — per-row sums or means, padded ``[B, T]`` or packed with
  ``cu_seqlens``; a row without scored tokens gives 0.
* :func:`naive_same_dtype_logprobs` — the usual PyTorch pipeline *in the input dtype*:
  ``logits = h @ W.T`` rounded to fp16/bf16, then ``log_softmax`` (in the input dtype, or in
  ``softmax_dtype`` after rounding), then a gather. It is the baseline whose error the fused
  op must not exceed for half-precision inputs.
* :func:`relative_error` — the error measure used by the tolerance checks.
* :func:`make_inputs`, :func:`random_upstream`, :func:`value_and_grads` — seeded inputs and a
  runner returning an op's value and gradients.
* :func:`assert_matches_reference`, :func:`assert_no_worse_than_naive` — the tolerance checks
  (``FWD_TOL``, ``GRAD_TOL``).

None of these functions allocate anything clever: they materialize ``[N, V]`` and are meant for
small test shapes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "relative_error",
    "transformed_logits",
    "reference_token_logprobs",
    "reference_token_entropy",
    "reference_token_grads",
    "reference_sequence_logprobs",
    "naive_same_dtype_logprobs",
    "naive_token_grads",
    "segment_bounds",
    "make_inputs",
    "random_upstream",
    "value_and_grads",
    "FWD_TOL",
    "GRAD_TOL",
    "LOGIT_TRANSFORMS",
    "split_transform",
    "assert_matches_reference",
    "assert_no_worse_than_naive",
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, norm: str = "max") -> float:
    """Normwise relative error ``||actual - expected|| / ||expected||``, computed in float64.

    Args:
        norm: ``"max"`` (largest absolute deviation over the largest magnitude; the strict measure
            used for tolerances) or ``"l2"`` (Frobenius norms; a stable aggregate for comparing
            two approximations with each other).
    Both tensors must have the same shape. When ``expected`` is identically zero the absolute
    error is returned (so an all-zero expectation demands an all-zero result).
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if norm not in ("max", "l2"):
        raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
    if actual.numel() == 0:
        return 0.0
    diff = actual.detach().to(torch.float64) - expected.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if norm == "max":
        err, scale = diff.abs().max().item(), e.abs().max().item()
    else:
        err, scale = torch.linalg.vector_norm(diff).item(), torch.linalg.vector_norm(e).item()
    return err / scale if scale > 0 else err


def transformed_logits(hidden: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                       temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``z = softcap * tanh(((hidden @ weight.T + bias) / temperature) / softcap)`` in the inputs' dtype.

    Args:
        hidden: ``[..., H]``; weight: ``[V, H]``; bias: ``[V]`` or None (all the same dtype).
    Returns:
        ``[..., V]`` in the dtype of the inputs (no up-casting here).
    """
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if temperature != 1.0:
        z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _gather_masked(logp_all: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    labels = labels.long()
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    picked = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100,
                             temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Float64 token log-probs ``log_softmax(z)[label]`` (0 where ``label == ignore_index``).

    Args:
        hidden: ``[..., H]`` any float dtype (converted to float64; autograd flows through the
            conversion). weight: ``[V, H]``. labels: integer ``[...]``. bias: ``[V]`` or None.
    Returns:
        float64 ``labels.shape``.
    """
    z = transformed_logits(hidden.to(torch.float64), weight.to(torch.float64),
                           bias=None if bias is None else bias.to(torch.float64),
                           temperature=temperature, softcap=softcap)
    return _gather_masked(torch.log_softmax(z, dim=-1), labels, ignore_index)


def reference_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                            bias: torch.Tensor | None = None, ignore_index: int = -100,
                            temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Float64 entropy of ``softmax(z)`` per token, ``-sum_v p_v log p_v`` (0 where ``label == ignore_index``).

    Same arguments as :func:`reference_token_logprobs`; returns float64 ``labels.shape``.
    """
    z = transformed_logits(hidden.to(torch.float64), weight.to(torch.float64),
                           bias=None if bias is None else bias.to(torch.float64),
                           temperature=temperature, softcap=softcap)
    logp_all = torch.log_softmax(z, dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(labels == ignore_index, torch.zeros_like(ent), ent)


def _fp64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64).requires_grad_(True)


def reference_token_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          grad_out: torch.Tensor, *, bias: torch.Tensor | None = None,
                          ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None) -> dict[str, torch.Tensor | None]:
    """Float64 truth for the forward value and the gradients of ``sum(grad_out * logp)``.

    Args:
        grad_out: upstream gradient, ``labels.shape`` (any float dtype).
    Returns:
        dict with ``logp`` (float64 ``labels.shape``), ``hidden`` (``[..., H]``), ``weight``
        (``[V, H]``) and ``bias`` (``[V]`` or None), all float64 and detached.
    """
    h, w, b = _fp64_leaf(hidden), _fp64_leaf(weight), _fp64_leaf(bias)
    logp = reference_token_logprobs(h, w, labels, bias=b, ignore_index=ignore_index,
                                    temperature=temperature, softcap=softcap)
    (logp * grad_out.detach().to(torch.float64)).sum().backward()
    return {"logp": logp.detach(), "hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def segment_bounds(cu_seqlens) -> list[int]:
    """``cu_seqlens`` (list or 1-D integer tensor) as a Python list of ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        return [int(v) for v in cu_seqlens.tolist()]
    return [int(v) for v in cu_seqlens]


def reference_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                average: bool = False, cu_seqlens: Sequence[int] | torch.Tensor | None = None,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Float64 per-row sums (or means over non-ignored tokens) of token log-probs.

    Args:
        hidden: padded ``[B, T, H]`` with labels ``[B, T]``, or packed ``[N, H]`` with labels
            ``[N]`` and ``cu_seqlens`` (``B + 1`` offsets).
    Returns:
        float64 ``[B]``; a row with no non-ignored token gives exactly 0.
    """
    token = reference_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                     temperature=temperature, softcap=softcap)
    scored = (labels != ignore_index).to(torch.float64)
    if cu_seqlens is None:
        sums, counts = token.sum(-1), scored.sum(-1)
    else:
        bounds = segment_bounds(cu_seqlens)
        sums = torch.stack([token[a:b].sum() for a, b in zip(bounds, bounds[1:])]) if len(bounds) > 1 \
            else token.new_zeros(0)
        counts = torch.stack([scored[a:b].sum() for a, b in zip(bounds, bounds[1:])]) if len(bounds) > 1 \
            else token.new_zeros(0)
    if not average:
        return sums
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))


def naive_same_dtype_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              bias: torch.Tensor | None = None, ignore_index: int = -100,
                              temperature: float = 1.0, softcap: float | None = None,
                              softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain PyTorch pipeline in the inputs' own dtype (differentiable, materializes ``[N, V]``).

    ``logits = hidden @ weight.T (+ bias)`` and the temperature/softcap transform are computed in
    the input dtype (so fp16/bf16 logits are rounded), then ``log_softmax`` runs in the input
    dtype, or in ``softmax_dtype`` (e.g. float32) after that rounding when given.

    Returns:
        ``labels.shape`` in the softmax dtype; 0 where ``label == ignore_index``.
    """
    z = transformed_logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    if softmax_dtype is not None:
        z = z.to(softmax_dtype)
    return _gather_masked(torch.log_softmax(z, dim=-1), labels, ignore_index)


def naive_token_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      grad_out: torch.Tensor, *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                      temperature: float = 1.0, softcap: float | None = None,
                      softmax_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
    """Value and gradients of the naive same-dtype pipeline, as :func:`reference_token_grads` returns them.

    The gradients come back in the inputs' dtype (autograd through the same-dtype matmul).
    """
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    logp = naive_same_dtype_logprobs(h, w, labels, bias=b, ignore_index=ignore_index, temperature=temperature,
                                     softcap=softcap, softmax_dtype=softmax_dtype)
    logp.backward(grad_out.detach().to(logp.dtype))
    return {"logp": logp.detach(), "hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def make_inputs(n_tokens: int | tuple[int, ...], hidden_size: int, vocab_size: int, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, with_bias: bool = False, logit_scale: float = 1.0,
                ignore_index: int = -100, ignore_fraction: float = 0.0):
    """Random ``(hidden [..., H], weight [V, H], labels [...], bias [V] | None)`` on CPU.

    Hidden is ``N(0, 1)`` times ``logit_scale``; weight is ``N(0, 1/H)`` so logits have unit
    scale (times ``logit_scale``). Drawn in float32 from a seeded generator, then cast to
    ``dtype`` (so every dtype sees the same values up to rounding). A fraction of labels is set to
    ``ignore_index``.
    """
    gen = torch.Generator().manual_seed(seed)
    lead = (n_tokens,) if isinstance(n_tokens, int) else tuple(n_tokens)
    hidden = torch.randn(*lead, hidden_size, generator=gen) * logit_scale
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size ** 0.5
    labels = torch.randint(0, vocab_size, lead, generator=gen)
    if ignore_fraction > 0:
        drop = torch.rand(lead, generator=gen) < ignore_fraction
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    bias = torch.randn(vocab_size, generator=gen) * 0.5 if with_bias else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), labels, cast(bias)


def random_upstream(shape, *, seed: int = 1) -> torch.Tensor:
    """A seeded ``N(0, 1)`` float32 upstream gradient (not a mean: every token weighted differently)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def value_and_grads(op, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    grad_out: torch.Tensor, *, bias: torch.Tensor | None = None, **kwargs) -> dict:
    """Run ``op(hidden, weight, labels, bias=bias, **kwargs)`` on fresh leaf copies and backprop ``grad_out``.

    ``op`` is any function with the signature of ``dftkern.fused_linear_logprobs`` (or
    ``sequence_logprobs``); ``grad_out`` has the shape of its output. Returns the same dict layout
    as :func:`reference_token_grads`: ``logp`` (the op's output), ``hidden``, ``weight``, ``bias``
    gradients (in the inputs' dtypes).
    """
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = op(h, w, labels, bias=b, **kwargs)
    out.backward(grad_out.detach().to(out.dtype))
    return {"logp": out.detach(), "hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


# ---------------------------------------------------------------------------------------------
# tolerance checks shared by the test modules
# ---------------------------------------------------------------------------------------------

FWD_TOL = 1e-5
"""Max-norm relative error allowed on fp32 forward values (vs float64 truth)."""
GRAD_TOL = 1e-4
"""Max-norm relative error allowed on fp32 gradients (vs float64 truth)."""

LOGIT_TRANSFORMS = {
    "plain": {},
    "bias": {"with_bias": True},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 5.0},
    "bias+temperature+softcap": {"with_bias": True, "temperature": 1.6, "softcap": 3.0},
}
"""Named logit-transform configurations: ``with_bias`` goes to :func:`make_inputs`, the rest to the op."""


def split_transform(config: dict) -> tuple[bool, dict]:
    """``LOGIT_TRANSFORMS`` entry -> ``(with_bias, op_kwargs)``."""
    config = dict(config)
    return config.pop("with_bias", False), config


def assert_matches_reference(ours: dict, ref: dict, *, fwd_tol: float = FWD_TOL, grad_tol: float = GRAD_TOL):
    """Forward value and every gradient present in ``ref`` within tolerance (max-norm relative error).

    ``ours``/``ref`` are dicts as returned by :func:`value_and_grads` / :func:`reference_token_grads`.
    """
    err = relative_error(ours["logp"], ref["logp"])
    assert err <= fwd_tol, f"forward relative error {err:.3e} > {fwd_tol}"
    for name in ("hidden", "weight", "bias"):
        if ref[name] is None:
            assert ours[name] is None, f"unexpected gradient for {name}"
            continue
        assert ours[name] is not None, f"no gradient for {name}"
        err = relative_error(ours[name], ref[name])
        assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol}"


def assert_no_worse_than_naive(op, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None, transform: dict, *, grad_tol: float,
                               fwd_tol: float = FWD_TOL) -> None:
    """For fp16/bf16 inputs: ``op``'s error vs the float64 truth is <= the naive pipeline's.

    Args:
        op: a token-logprob function with the signature of ``dftkern.fused_linear_logprobs``
            (engine arguments already bound, e.g. with ``functools.partial``).
        transform: ``temperature``/``softcap``/``ignore_index`` keyword arguments.
        grad_tol: bound on ``op``'s own max-norm gradient errors (about 2 ulps of the input dtype).
        fwd_tol: bound on ``op``'s forward error (fp32-level: its logits are never rounded).

    The naive pipeline runs twice: log_softmax in the input dtype, and in fp32 after rounding the
    logits (the stronger baseline). Errors are compared in the L2 norm (a stable aggregate) for
    the value and every gradient, with a random upstream gradient. Also checks that the output is
    fp32 and the gradients come back in the input dtype.
    """
    grad_out = random_upstream(labels.shape, seed=7)
    ref = reference_token_grads(hidden, weight, labels, grad_out, bias=bias, **transform)
    ours = value_and_grads(op, hidden, weight, labels, grad_out, bias=bias, **transform)
    assert ours["logp"].dtype == torch.float32
    for name in ("hidden", "weight", "bias"):
        if ref[name] is not None:
            assert ours[name].dtype == hidden.dtype, f"d{name} must come back in the input dtype"
    err = relative_error(ours["logp"], ref["logp"])
    assert err <= fwd_tol, f"forward relative error {err:.3e} > {fwd_tol}"
    for softmax_dtype in (None, torch.float32):
        naive = naive_token_grads(hidden, weight, labels, grad_out, bias=bias, softmax_dtype=softmax_dtype,
                                  **transform)
        for name in ("logp", "hidden", "weight", "bias"):
            if ref[name] is None:
                continue
            ours_err = relative_error(ours[name], ref[name], norm="l2")
            naive_err = relative_error(naive[name], ref[name], norm="l2")
            assert ours_err <= naive_err, (f"{name}: ours {ours_err:.3e} > naive {naive_err:.3e} "
                                           f"(naive softmax in {softmax_dtype or hidden.dtype})")
    for name in ("hidden", "weight", "bias"):
        if ref[name] is not None:
            err = relative_error(ours[name], ref[name])
            assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol}"


def make_ragged_rows(n_rows: int, seq_len: int, hidden_size: int, vocab_size: int, *, seed: int,
                     empty_rows: tuple[int, ...] = (), with_bias: bool = True, ignore_index: int = -100):
    """Seeded padded rows with ragged prompts and responses, float32 on CPU.

    Returns ``(hidden [R, T, H], weight [V, H], labels int64 [R, T], bias [V] | None)``. Every row
    gets a random prompt (0-2 ignored tokens) and a random response length >= 1 (the rest is
    padding = ``ignore_index``), so token counts differ from row to row; rows listed in
    ``empty_rows`` have every label ignored (no scored token at all).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, seq_len, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) * (1.5 / hidden_size ** 0.5)
    labels = torch.randint(0, vocab_size, (n_rows, seq_len), generator=gen)
    for row in range(n_rows):
        prompt = int(torch.randint(0, 3, (1,), generator=gen))
        length = int(torch.randint(1, seq_len - prompt + 1, (1,), generator=gen))
        labels[row, :prompt] = ignore_index
        labels[row, prompt + length:] = ignore_index
    for row in empty_rows:
        labels[row] = ignore_index
    bias = torch.randn(vocab_size, generator=gen) * 0.5 if with_bias else None
    return hidden, weight, labels, bias
