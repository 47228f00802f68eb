"""Autograd layer: thin ``torch.autograd.Function`` wrappers over :mod:`dftkern.chunking`, and the token ops.

Two Functions, as flash-attn's interface file keeps its own:

* :class:`_LinearLogprobs` — token log-probs (and entropies) of the valid tokens; forward 2nHV,
  backward recomputes the logits (6nHV): works for any upstream gradient.
* :class:`_PrecomputedGradients` — a scalar loss whose input gradients were computed during the
  forward (outside autograd, :func:`in_forward_gradients`); its backward only scales them by the
  upstream gradient, in place (no second copy of ``dW``).

Public token ops on them:

* :func:`fused_linear_logprobs` — ``log softmax(h W^T + b)[y]`` (and the entropy), any upstream gradient (8nHV).
* :func:`fused_linear_cross_entropy` — the SFT token loss (6nHV).
* :func:`fused_token_loss` — any elementwise loss of token log-probs and entropies (6nHV).

n is the number of valid tokens (label != ignore_index): ignored tokens enter no product
(:class:`dftkern.chunking.ValidTokens`). Sequence ops and the grouped losses are in
:mod:`dftkern.grouped`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validation import check_label_range, check_linear_inputs, validation_enabled
from .chunking import (
    ChunkGradient,
    InForwardGradients,
    ValidTokens,
    backward_logprobs,
    forward_logprobs,
    forward_with_grad,
    resolve_chunk_bytes,
    tokens_per_chunk,
)
from .engines import LogitTransform, TorchRowEngine, TritonRowEngine, resolve_accum_dtype

__all__ = [
    "fused_linear_logprobs",
    "fused_linear_cross_entropy",
    "fused_token_loss",
    "sequence_logprobs",
    "grouped_sequence_loss",
    "RowLayout",
    "select_engine",
    "TokenLoss",
]

BACKENDS = ("auto", "triton", "torch")  # the ``backend=`` values every op accepts
_MOVED_TO_GROUPED = ("sequence_logprobs", "grouped_sequence_loss", "RowLayout", "make_layout", "GroupLoss")


def __getattr__(name: str):
    """The sequence ops moved to :mod:`dftkern.grouped`; they stay importable from here."""
    if name in _MOVED_TO_GROUPED:
        from . import grouped

        return getattr(grouped, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_engine(backend: str, device: torch.device, dtype: torch.dtype):
    """Pick the row engine. ``DFTKERN_BACKEND`` (triton|torch) overrides ``backend="auto"``.

    auto: Triton for CUDA tensors of fp32/fp16/bf16, the PyTorch engine otherwise (CPU, fp64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("DFTKERN_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"DFTKERN_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        return TritonRowEngine() if use_triton else TorchRowEngine()
    if backend == "torch":
        return TorchRowEngine()
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    if device.type != "cuda" and not _interpreter_on():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    if dtype == torch.float64:
        raise ValueError("backend='triton' supports float32/float16/bfloat16 inputs, got float64; use 'torch'")
    return TritonRowEngine()


def refuse_double_backward() -> None:
    """Called first in each backward: grad mode is on there only under ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError("dftkern's fused ops are differentiable once: a backward with create_graph=True "
                           "(double backward, e.g. a gradient penalty through the LM head) is not supported; "
                           "compute such a term from plain logits")


def _autocast_on(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_off(device: torch.device):
    """A context with autocast off for ``device``'s type (a null context where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def follows_autocast(op):
    """Make a public op (``op(hidden, weight, labels, *, bias=None, ...)``) behave under ``torch.autocast``.

    Inside an autocast region of hidden's device type, ``hidden``, ``weight`` and ``bias`` (float32,
    float16 or bfloat16; float64 is left alone, as autocast does) are cast to the autocast dtype, as
    autocast casts a linear layer's inputs, and the op runs with autocast off: its products still
    return fp32 logits, and the casts are differentiable, so gradients reach float32 parameters in
    float32. (Without this, autocast would turn the op's fp32 logit buffers into bfloat16 ones.)
    Outside autocast the op is called unchanged.
    """

    @functools.wraps(op)
    def wrapper(hidden, weight, labels, *args, **kwargs):
        if not (isinstance(hidden, torch.Tensor) and _autocast_on(hidden.device)):
            return op(hidden, weight, labels, *args, **kwargs)
        inputs = (hidden, weight, kwargs.get("bias"))
        # a float64 input: nothing is lowered (autocast leaves float64 alone); the op's own checks then apply
        if not any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in inputs):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight, bias = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                    for t in inputs)
            if bias is not None:
                kwargs["bias"] = bias
        with autocast_off(hidden.device):
            return op(hidden, weight, labels, *args, **kwargs)

    return wrapper


def prepare_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend, chunk_bytes,
                   validate, accum_dtype="fp32", grouped=False):
    """Checks shared by every public op; returns ``(labels int64, engine, budget, transform)``.

    ``grouped``: the op computes its gradients in the forward (its default budget is larger).
    """
    labels = check_linear_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap)
    check_label_range(labels, weight.shape[0], ignore_index, validate)
    resolve_accum_dtype(accum_dtype, weight)
    engine = select_engine(backend, hidden.device, hidden.dtype)
    budget = resolve_chunk_bytes(chunk_bytes, hidden.device, grouped=grouped)
    transform = LogitTransform(float(temperature), None if softcap is None else float(softcap), ignore_index)
    return labels, engine, budget, transform


def find_valid_tokens(labels1d: torch.Tensor, ignore_index: int, valid_positions, validate) -> ValidTokens:
    """The valid tokens of a call (at most one host sync on CUDA; none with ``valid_positions``)."""
    return ValidTokens.find(labels1d, ignore_index, valid_positions, check=validation_enabled(validate))


@dataclass
class TokenCall:
    """A token op's checked inputs: ``hidden2d [N, H]``, ``labels1d [N]`` int64 (``labels`` in the
    caller's shape), the engine, the chunk budget, the logit transform and the valid tokens."""

    hidden2d: torch.Tensor
    labels1d: torch.Tensor
    labels: torch.Tensor
    engine: object
    budget: int
    transform: LogitTransform
    tokens: ValidTokens


def prepare_token_call(hidden, weight, labels, *, bias, ignore_index, temperature, softcap, backend, chunk_bytes,
                       validate, accum_dtype, valid_positions, grouped=False) -> TokenCall:
    """:func:`prepare_inputs`, flattened to token rows, and the valid tokens."""
    labels, engine, budget, transform = prepare_inputs(hidden, weight, labels, bias, ignore_index, temperature,
                                                       softcap, backend, chunk_bytes, validate, accum_dtype,
                                                       grouped=grouped)
    labels1d = labels.reshape(-1)
    tokens = find_valid_tokens(labels1d, ignore_index, valid_positions, validate)
    return TokenCall(hidden.reshape(-1, hidden.shape[-1]), labels1d, labels, engine, budget, transform, tokens)


def input_grads_wanted(hidden, weight, bias) -> bool:
    """Whether autograd will want gradients of these inputs (decides the in-forward gradient paths)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))


# ---------------------------------------------------------------------------------------------
# Token log-probs (and entropy): any upstream gradient
# ---------------------------------------------------------------------------------------------


class _LinearLogprobs(torch.autograd.Function):
    """``hidden [N, H]`` -> log-probs ``[n]`` (and entropies ``[n]``) of the valid tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tokens, transform, engine, budget, entropy, accum_dtype):
        logp, lse, ent = forward_logprobs(hidden, weight, bias, labels, transform, engine, budget, tokens,
                                          entropy=entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.tokens, ctx.transform, ctx.engine, ctx.budget, ctx.accum_dtype = tokens, transform, engine, budget, accum_dtype
        ctx.set_materialize_grads(False)
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        refuse_double_backward()
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 10
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with autocast_off(hidden.device):  # a backward called inside autocast
            grads = backward_logprobs(hidden, weight, bias, labels, lse, grad_logp.contiguous(), ctx.transform,
                                      ctx.engine, ctx.budget, ctx.tokens, entropy=ent, grad_entropy=grad_entropy,
                                      need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                                      accum_dtype=ctx.accum_dtype)
        return (*grads,) + (None,) * 7


def compact_token_logprobs(hidden2d, weight, bias, labels1d, tokens: ValidTokens, transform, engine, budget, *,
                           entropy: bool = False, accum_dtype="fp32"):
    """Differentiable log-probs ``[n]`` (and entropies ``[n]``) of the valid tokens, in order."""
    if input_grads_wanted(hidden2d, weight, bias):
        return _LinearLogprobs.apply(hidden2d, weight, bias, labels1d, tokens, transform, engine, budget, entropy,
                                     accum_dtype)
    with torch.no_grad():
        logp, _, ent = forward_logprobs(hidden2d, weight, bias, labels1d, transform, engine, budget, tokens,
                                        entropy=entropy)
    return (logp, ent) if entropy else logp


@follows_autocast
def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: float | None = None,
                          backend: str = "auto", chunk_bytes: int | None = None,
                          validate: bool | None = None, return_entropy: bool = False,
                          valid_positions: torch.Tensor | None = None, accum_dtype="fp32"):
    """Per-token log-probabilities of ``labels`` under ``softmax(z)``, never materializing ``[N, V]``.

    ``z = (hidden @ weight.T + bias) / temperature``, then ``softcap * tanh(z / softcap)`` if set.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16 (float64 on the torch engine), any strides.
        weight: ``[V, H]``, same dtype and device (may be tied to an input embedding).
        labels: int64 ``[...]`` = hidden's leading shape, already aligned: ``labels[..., t]`` is
            predicted from ``hidden[..., t]`` (no shift inside).
        bias: ``[V]`` or None. ignore_index: label value whose log-prob is 0 and gets no gradient;
            such tokens enter no matrix product.
        backend: "auto" (Triton on CUDA, PyTorch otherwise; env ``DFTKERN_BACKEND`` overrides),
            "triton" or "torch".
        chunk_bytes: workspace budget (see :mod:`dftkern.chunking`); env ``DFTKERN_CHUNK_BYTES``.
        validate: True/False/None. Check label range (and ``valid_positions``) on CUDA too (costs a
            host sync; env ``DFTKERN_VALIDATE=1``). On CPU labels are always checked; on CUDA
            without validation an out-of-range label yields NaN at that position.
        return_entropy: also return the entropy ``-sum_v p_v log p_v`` of ``p = softmax(z)`` per
            token (computed in the same sweep over the vocabulary as the log-sum-exp).
        valid_positions: optional int64 1-D tensor of the flat positions (into
            ``labels.reshape(-1)``) whose label != ignore_index, increasing; CPU preferred. Saves
            the one host sync the call otherwise makes on CUDA to find them.
        accum_dtype: ``dW`` accumulation across token tiles in the backward: "fp32" (default) or
            the weight's dtype (see :func:`dftkern.engines.resolve_accum_dtype`).

    Returns:
        float32 tensor of shape ``labels.shape`` (float64 for float64 inputs); 0.0 where
        ``labels == ignore_index``. With ``return_entropy``: ``(logp, entropy)``, both of that
        shape and dtype (entropy 0 where ignored). Differentiable w.r.t. hidden, weight and bias
        for any upstream gradients of either output; the gradients come back in the input dtypes
        (0 at ignored tokens). Cost: 2nHV forward, 6nHV backward for n valid tokens.
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    call = prepare_token_call(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                              softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, validate=validate,
                              accum_dtype=accum_dtype, valid_positions=valid_positions)
    out = compact_token_logprobs(call.hidden2d, weight, bias, call.labels1d, call.tokens, call.transform, call.engine,
                                 call.budget, entropy=return_entropy, accum_dtype=accum_dtype)
    if return_entropy:
        return tuple(call.tokens.scatter(t).view(call.labels.shape) for t in out)
    return call.tokens.scatter(out).view(call.labels.shape)


class _RowSums(torch.autograd.Function):
    """Per-row sums ``[R]`` of packed token values ``[n]`` (row r = tokens ``bounds[r]:bounds[r+1]``).

    Forward: an fp64 prefix sum over the finite values (deterministic on CUDA, no atomics) plus,
    per row, the sum of its non-finite values (0, +-inf or NaN: order-free), so a NaN or inf in one
    row never reaches another. Backward: every token gets its own row's upstream gradient (a
    gather: no cancellation across rows, and a non-finite upstream gradient stays in its row).
    """

    @staticmethod
    def forward(ctx, values, bounds, row_of_token):
        values64 = values.to(torch.float64)
        finite = torch.isfinite(values64)
        prefix = torch.cat([values64.new_zeros(1), torch.cumsum(torch.where(finite, values64, 0.0), 0)])
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        nonfinite = values64.new_zeros(bounds.numel() - 1).index_add(0, row_of_token,
                                                                     torch.where(finite, 0.0, values64))
        ctx.save_for_backward(row_of_token)
        ctx.dtype = values.dtype
        return (sums + nonfinite).to(values.dtype)

    @staticmethod
    def backward(ctx, grad_sums):
        (row_of_token,) = ctx.saved_tensors
        return grad_sums.index_select(0, row_of_token).to(ctx.dtype), None, None


def row_sums(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Differentiable per-row sums of packed ``values [n]`` (any float dtype) over the int64 row
    ``bounds [R+1]`` (``bounds[0] = 0``, ``bounds[-1] = n``, on ``values``' device); see :class:`_RowSums`."""
    row_of_token = torch.repeat_interleave(torch.arange(bounds.numel() - 1, device=values.device), bounds.diff(),
                                           output_size=values.shape[0])
    return _RowSums.apply(values, bounds, row_of_token)


# ---------------------------------------------------------------------------------------------
# Losses with their gradients computed in the forward (6NHV)
# ---------------------------------------------------------------------------------------------


class _PrecomputedGradients(torch.autograd.Function):
    """``loss`` (a detached scalar) whose input gradients were computed in the forward pass.

    Backward returns those gradients times ``grad_output``, scaling them in place: no second
    ``[V, H]`` buffer, so it can run once (``retain_graph=True`` and a second backward raise).
    Float64 — the dtype of reference checks such as ``torch.autograd.gradcheck``, which runs
    backward several times — scales out of place instead and can be backpropagated any number of
    times (at the cost of a copy of each gradient per backward).
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads: InForwardGradients):
        ctx.grads = (grads.grad_hidden, grads.grad_weight, grads.grad_bias)
        ctx.reentrant = any(g is not None and g.dtype == torch.float64 for g in ctx.grads)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        if ctx.reentrant:
            return (None, *(None if g is None else g * grad_loss for g in ctx.grads), None)
        if ctx.grads is None:
            raise RuntimeError("a dftkern loss with in-forward gradients can be backpropagated once: its saved "
                               "gradients were scaled in place by the first backward (retain_graph=True is not "
                               "supported); recompute the loss instead")
        grads, ctx.grads = ctx.grads, None
        scaled = tuple(None if g is None else g.mul_(grad_loss) for g in grads)
        return (None, *scaled, None)


def in_forward_gradients(call: TokenCall, weight, bias, chunk_gradient: ChunkGradient, *, chunk_ranges=None,
                         entropy: bool = False, accum_dtype="fp32") -> InForwardGradients:
    """:func:`dftkern.chunking.forward_with_grad` outside autograd, for the inputs that require grad.

    ``chunk_ranges``: token ranges (default: chunks of as many valid tokens as the budget holds).
    """
    if chunk_ranges is None:
        chunk_ranges = call.tokens.chunk_bounds(tokens_per_chunk(call.budget, weight))
    hidden2d = call.hidden2d
    grad_on = torch.is_grad_enabled()
    with torch.no_grad():
        return forward_with_grad(hidden2d, weight, bias, call.labels1d, call.transform, call.engine, chunk_ranges,
                                 chunk_gradient, tokens=call.tokens, entropy=entropy,
                                 need_hidden=grad_on and hidden2d.requires_grad,
                                 need_weight=grad_on and weight.requires_grad,
                                 need_bias=grad_on and bias is not None and bias.requires_grad,
                                 accum_dtype=accum_dtype)


def with_precomputed_gradients(loss: torch.Tensor, hidden2d, weight, bias, grads: InForwardGradients) -> torch.Tensor:
    """``loss`` attached to autograd with the gradients of :func:`in_forward_gradients`."""
    return _PrecomputedGradients.apply(loss, hidden2d, weight, bias, grads)


@follows_autocast
def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               reduction: str = "mean", bias: torch.Tensor | None = None,
                               ignore_index: int = -100, temperature: float = 1.0,
                               softcap: float | None = None, backend: str = "auto",
                               chunk_bytes: int | None = None, validate: bool | None = None,
                               accum_dtype="fp32", valid_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy ``-log p(label)`` of the fused head, reduced to a scalar: the SFT token loss.

    Because the loss is a scalar, its gradient w.r.t. every log-prob is known in the forward, so
    the gradients are computed there from the same logits (6nHV, the matmul floor) and backward
    only scales them — unlike :func:`fused_linear_logprobs` (8nHV), which accepts any upstream
    gradient.

    Its default chunk budget is the sequence losses' (4 GiB on CUDA): fewer chunks mean fewer
    passes over the ``dW`` accumulator.

    Args:
        as :func:`fused_linear_logprobs`; reduction: "mean" (over non-ignored tokens; 0 when there
        are none), "sum", or "none" (per-token ``-logp``, through :func:`fused_linear_logprobs`).
        accum_dtype: ``dW`` accumulation across chunks: "fp32" (default, exact up to fp32) or the
            weight's dtype (one rounding per chunk; no fp32 ``[V, H]`` buffer).
    Returns:
        float32 scalar (``labels.shape`` for "none").
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":
        return -fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                      temperature=temperature, softcap=softcap, backend=backend,
                                      chunk_bytes=chunk_bytes, validate=validate, valid_positions=valid_positions,
                                      accum_dtype=accum_dtype)
    call = prepare_token_call(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                              softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, validate=validate,
                              accum_dtype=accum_dtype, valid_positions=valid_positions, grouped=True)
    scale = 1.0 / max(call.tokens.num_valid, 1) if reduction == "mean" else 1.0
    if not input_grads_wanted(hidden, weight, bias):
        with torch.no_grad():
            logp, _, _ = forward_logprobs(call.hidden2d, weight, bias, call.labels1d, call.transform, call.engine,
                                          call.budget, call.tokens)
        return logp.sum() * -scale

    def chunk_gradient(c, logp, entropy, positions):
        return torch.full_like(logp, -scale), None

    grads = in_forward_gradients(call, weight, bias, chunk_gradient, accum_dtype=accum_dtype)
    return with_precomputed_gradients(grads.logp.sum() * -scale, call.hidden2d, weight, bias, grads)


TokenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``token_loss(logp [n], entropy [n], index [n]) -> terms [n]``: an elementwise, differentiable
function of the log-probs and entropies of ``n`` valid tokens (fp32, fp64 for fp64 inputs).
``index`` holds their int64 flat positions into ``labels.reshape(-1)`` (on the compute device), so
the callable can gather its own per-token constants (advantages, old or reference log-probs,
weights). The loss is the sum of all terms."""


@follows_autocast
def fused_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, token_loss: TokenLoss,
                     cu_seqlens=None, bias: torch.Tensor | None = None, ignore_index: int = -100,
                     temperature: float = 1.0, softcap: float | None = None, backend: str = "auto",
                     chunk_bytes: int | None = None, validate: bool | None = None,
                     valid_positions: torch.Tensor | None = None, accum_dtype="fp32",
                     return_token_values: bool = False):
    """A scalar loss ``sum_t token_loss(logp_t, entropy_t, t)`` over the valid tokens, at 6nHV.

    Per chunk of valid tokens: logits once -> log-probs and entropies (one sweep) ->
    ``torch.autograd.grad`` of ``token_loss(...).sum()`` w.r.t. both -> the gradient epilogue on
    the same logits -> ``dH`` and ``dW``. Backward only scales the saved gradients. When the loss
    does not depend on the entropy (its gradient is None), the epilogue skips the entropy term.

    Args:
        hidden/weight/labels/bias/ignore_index/temperature/softcap/backend/validate/valid_positions:
            as in :func:`fused_linear_logprobs` (``hidden [..., H]``, labels ``[...]``).
        token_loss: see :data:`TokenLoss`. Called once per chunk (with ``torch.enable_grad()``);
            chunks split the token axis wherever the budget says, so it must be elementwise.
        cu_seqlens: optional ``[R+1]`` offsets of a packed ``[N, H]`` batch; only checked (the
            loss is per token; ``index`` is what locates a token).
        chunk_bytes: workspace budget (default as :func:`fused_linear_cross_entropy`'s).
        accum_dtype: "fp32" (default) or the weight's dtype, for ``dW`` across chunks.
        return_token_values: also return the detached log-probs and entropies.

    Returns:
        float32 scalar (float64 for float64 inputs); with ``return_token_values``:
        ``(loss, logp, entropy)``, the latter two ``labels.shape``, 0 at ignored tokens.
    """
    if not callable(token_loss):
        raise TypeError(f"token_loss must be a callable (logp, entropy, index) -> per-token terms, got "
                        f"{type(token_loss).__name__}")
    if not isinstance(return_token_values, bool):
        raise TypeError(f"return_token_values must be a bool, got {type(return_token_values).__name__}")
    if cu_seqlens is not None:
        from .grouped import make_layout

        make_layout(hidden, labels, cu_seqlens)  # the packed layout's checks
    call = prepare_token_call(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                              softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, validate=validate,
                              accum_dtype=accum_dtype, valid_positions=valid_positions, grouped=True)
    tokens = call.tokens
    parts: list[torch.Tensor] = []

    def terms_sum(logp, entropy, positions) -> torch.Tensor:
        terms = token_loss(logp, entropy, positions)
        if not isinstance(terms, torch.Tensor):
            raise TypeError(f"token_loss must return a tensor of per-token terms, got {type(terms).__name__}")
        return terms.sum()

    if not input_grads_wanted(hidden, weight, bias):
        with torch.no_grad():
            logp, _, ent = forward_logprobs(call.hidden2d, weight, bias, call.labels1d, call.transform, call.engine,
                                            call.budget, tokens, entropy=True)
            loss = terms_sum(logp, ent, tokens.positions_on(hidden.device, 0, tokens.num_valid)).to(logp.dtype)
    else:
        def chunk_gradient(c, logp, entropy, positions):
            with torch.enable_grad():
                lp = logp.detach().requires_grad_(True)
                en = entropy.detach().requires_grad_(True)
                total = terms_sum(lp, en, positions)
                grad_lp = grad_en = None
                if total.requires_grad:
                    grad_lp, grad_en = torch.autograd.grad(total, (lp, en), allow_unused=True)
            parts.append(total.detach().to(lp.dtype).reshape(()))
            return (torch.zeros_like(logp) if grad_lp is None else grad_lp), grad_en

        grads = in_forward_gradients(call, weight, bias, chunk_gradient, entropy=True, accum_dtype=accum_dtype)
        logp, ent = grads.logp, grads.entropy
        loss = with_precomputed_gradients(torch.stack(parts).sum(), call.hidden2d, weight, bias, grads)
    if not return_token_values:
        return loss
    shape = call.labels.shape
    return loss, tokens.scatter(logp.detach()).view(shape), tokens.scatter(ent.detach()).view(shape)
