"""On-policy RL losses on the fused head: PPO-clip and the GRPO family, token level.

For every valid (non-ignored) token t of row i, with ``A`` the advantage (per row, or per token):

* ``r_t = exp(logp_t - old_t)`` — the importance ratio to the sampler (``old_logps=None``: the
  current log-probs detached, ``r = 1``: one on-policy update);
* ``surr_t = -min(r_t A, clip(r_t, 1 - clip_eps, 1 + eps_high) A)``, ``eps_high = clip_eps_high``
  or ``clip_eps`` (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; clip-higher:
  Yu et al. 2025, "DAPO");
* ``kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (the k3 estimator of KL(pi || pi_ref)),
  when ``ref_logps`` is given;
* ``term_t = surr_t + kl_beta * kl_t - entropy_coef * H_t``, ``H_t`` the entropy of
  ``softmax(z_t)`` (after temperature/softcap), with its exact gradient.

Aggregations (the loss is ``sum_t w_t term_t``):

=================  =================================================================  ==========================
``token_mean``     ``sum_t term_t / #valid tokens``                                   PPO; DAPO (Yu et al. 2025)
``sequence_mean``  each row's mean over its valid tokens, then the mean over rows     GRPO (Shao et al. 2024,
                   that have any valid token                                          DeepSeekMath)
``constant``       ``sum_t term_t / (R * max_tokens)``                                Dr. GRPO (Liu et al. 2025)
=================  =================================================================  ==========================

The per-token math is :func:`dftkern.losses.formulas.policy_token_terms` and the weights
:func:`dftkern.losses.formulas.aggregation_weights` (also used by the pure
:func:`~dftkern.losses.formulas.policy_loss`); the registry lists ppo / grpo / dapo / dr_grpo with
their defaults. The LM head runs through :func:`dftkern.fused_token_loss` (6NHV: the gradients
are computed in the forward from the same logits; backward only scales them).
"""

from __future__ import annotations

import torch

from .._validation import validation_enabled
from ..functional import follows_autocast, fused_token_loss
from ._common import check_bool, count_rows, loss_dtype
from .formulas import aggregation_weights, policy_token_terms
from .registry import check_hyperparameter

__all__ = ["fused_policy_loss"]


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device synchronization (it lives in CPU memory)."""
    return t.device.type == "cpu"


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device`` as ``dtype``; a host tensor is copied without waiting for the device."""
    return t.to(device=device, dtype=dtype, non_blocking=_on_host(t) and device.type != "cpu")


def _token_rows(labels: torch.Tensor, cu_seqlens, n_rows: int, check: bool) -> torch.Tensor:
    """int64 ``[N]`` on labels' device: the row of every flat position of ``labels`` (padded ``[R, T]``
    or packed ``[N]``). ``cu_seqlens`` (a list or a tensor) is checked when it lives on the host,
    or with ``check`` (a device sync); a host ``cu_seqlens`` gives the rows without any device sync."""
    n_tokens = labels.numel()
    device = labels.device
    if cu_seqlens is None:
        return torch.arange(n_tokens, device=device) // max(labels.shape[1], 1)
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    if _on_host(bounds) or check:
        if int(bounds[0]) != 0 or int(bounds[-1]) != n_tokens or bool((bounds[1:] < bounds[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing offsets from 0 to N={n_tokens}")
    if _on_host(bounds):  # the rows on the host, then one copy that does not wait for the device
        rows = torch.repeat_interleave(torch.arange(n_rows, dtype=torch.int64), bounds[1:] - bounds[:-1])
        return _to(rows, device, torch.int64)
    return torch.searchsorted(bounds[1:].to(device), torch.arange(n_tokens, device=device), right=True)


@follows_autocast
def fused_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, advantages: torch.Tensor,
                      old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None, kl_beta: float = 0.0,
                      entropy_coef: float = 0.0, aggregation: str = "token_mean", max_tokens: int | None = None,
                      cu_seqlens=None, bias: torch.Tensor | None = None, ignore_index: int = -100,
                      temperature: float = 1.0, softcap: float | None = None, return_stats: bool = False,
                      backend: str = "auto", chunk_bytes: int | None = None, validate: bool | None = None,
                      valid_positions: torch.Tensor | None = None, accum_dtype="fp32"):
    """PPO-clip / GRPO-family policy loss on the fused LM head (formulas in the module doc).

    Args:
        hidden: padded ``[R, T, H]`` with labels int64 ``[R, T]``, or packed ``[N, H]`` with labels
            ``[N]`` and ``cu_seqlens [R+1]``; float32/float16/bfloat16 (float64 on the torch engine).
        weight: ``[V, H]``; bias ``[V]`` or None. Labels are aligned (no shift); prompt/padding
            tokens = ``ignore_index``.
        advantages: float ``[R]`` (per sequence, broadcast over its tokens) or labels' shape (per
            token; for packed rows with N == R, [R] is read per sequence); must be finite: per
            sequence every entry (rows without valid tokens included), per token at the valid
            tokens. Checked (like old/ref_logps) where it costs no device sync: a tensor in
            CPU memory (per token: with CPU labels, or with CPU ``valid_positions``); on a device
            only with ``validate=True`` or ``DFTKERN_VALIDATE=1`` -- the default device path makes
            no host sync here, and a NaN there gives a NaN loss.
        old_logps: float, labels' shape: the sampler's per-token log-probs (no gradient), or None
            (ratio 1). ref_logps: float, labels' shape: the reference model's (no gradient); needed
            when ``kl_beta > 0``. Values at ignored positions are not read.
        clip_eps: in (0, 1e6]; clip_eps_high: None (= clip_eps) or in [0, 1e6]; kl_beta: in
            [0, 1e6]; entropy_coef: in [-1e6, 1e6] (positive = entropy bonus).
        aggregation: "token_mean" | "sequence_mean" | "constant"; max_tokens: int >= 1, required
            by "constant" and unused by the others (checked either way, so one setting — e.g. a
            trainer's maximum completion length — can be passed for every aggregation).
        return_stats: bool; also return a dict of detached 0-d float32 tensors over the valid
            tokens: ``clip_fraction_low`` (share with ``r < 1 - clip_eps`` and ``A < 0``: the
            lower clip is active), ``clip_fraction_high`` (``r > 1 + eps_high`` and ``A > 0``),
            ``ratio_mean``, ``kl_mean`` (0 without ``ref_logps``), ``entropy_mean``, and
            ``num_tokens``.
        backend, chunk_bytes, validate, valid_positions, accum_dtype, temperature, softcap: as in
            :func:`dftkern.fused_token_loss` (``accum_dtype``: "fp32", the default, or the
            weight's dtype, "weight", for ``dW``).

    Returns:
        scalar float32 loss (and stats). 0 when no token is valid.
    """
    check_bool("return_stats", return_stats)
    clip_eps = check_hyperparameter("clip_eps", clip_eps)
    clip_eps_high = check_hyperparameter("clip_eps_high", clip_eps_high)
    kl_beta = check_hyperparameter("kl_beta", kl_beta)
    entropy_coef = check_hyperparameter("entropy_coef", entropy_coef)
    aggregation = check_hyperparameter("aggregation", aggregation)
    max_tokens = check_hyperparameter("max_tokens", max_tokens)
    if aggregation == "constant" and max_tokens is None:
        raise ValueError("aggregation='constant' (Dr. GRPO) needs max_tokens (an int >= 1: the normalizer R * "
                         "max_tokens)")
    n_rows = count_rows(hidden, labels, cu_seqlens)
    device = hidden.device
    const_dtype = loss_dtype(hidden)
    labels_flat = labels.reshape(-1)
    valid = labels_flat != ignore_index
    check = validation_enabled(validate)  # device-side checks (a host sync each) only when asked for
    rows = _token_rows(labels, cu_seqlens, n_rows, check)
    host_valid = None  # the valid tokens' positions on the host, when known without a device sync
    if _on_host(labels):
        host_valid = valid
    elif isinstance(valid_positions, torch.Tensor) and _on_host(valid_positions) and valid_positions.dim() == 1 \
            and not valid_positions.is_floating_point():
        positions = valid_positions.to(torch.int64)
        if positions.numel() == 0 or (int(positions.min()) >= 0 and int(positions.max()) < labels.numel()):
            host_valid = positions  # (malformed positions are left to fused_token_loss's own error)

    def float_input(name: str, value, per_row_ok: bool) -> torch.Tensor:
        """``value`` as a flat per-token tensor of ``const_dtype``; finite at the valid tokens (checked
        on the host, or on the device with ``check``)."""
        shapes = ([f"[R={n_rows}] (per sequence)"] if per_row_ok else []) + [f"{list(labels.shape)} (labels' shape)"]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a float tensor of shape {' or '.join(shapes)}, got {got}")
        value = value.detach()
        if per_row_ok and tuple(value.shape) == (n_rows,):  # (packed with N == R: per sequence)
            if (_on_host(value) or check) and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains NaN or inf")
            return _to(value, device, const_dtype)[rows]
        if tuple(value.shape) != tuple(labels.shape):
            raise ValueError(f"{name} must have shape {' or '.join(shapes)}, got {list(value.shape)}")
        flat = value.reshape(-1)
        if _on_host(flat) and host_valid is not None:
            at_valid = flat[host_valid]
        elif check:
            at_valid = flat[valid.to(flat.device)]
        else:
            at_valid = None
        if at_valid is not None and not bool(torch.isfinite(at_valid).all()):
            raise ValueError(f"{name} contains NaN or inf at valid (non-ignored) tokens")
        return _to(flat, device, const_dtype)

    adv_flat = float_input("advantages", advantages, per_row_ok=True)
    old_flat = None if old_logps is None else float_input("old_logps", old_logps, per_row_ok=False)
    ref_flat = None if ref_logps is None else float_input("ref_logps", ref_logps, per_row_ok=False)
    if kl_beta > 0 and ref_flat is None:
        raise ValueError(f"kl_beta={kl_beta} > 0 needs ref_logps (the reference model's per-token log-probs, "
                         f"labels' shape {list(labels.shape)})")
    token_weights = aggregation_weights(valid, rows, n_rows, aggregation, max_tokens, dtype=const_dtype)

    def token_loss(logp: torch.Tensor, entropy: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        terms = policy_token_terms(
            logp, advantages=adv_flat[index], old_logps=None if old_flat is None else old_flat[index],
            ref_logps=None if ref_flat is None else ref_flat[index], entropy=entropy, clip_eps=clip_eps,
            clip_eps_high=clip_eps_high, kl_beta=kl_beta, entropy_coef=entropy_coef)
        return terms * token_weights[index].to(terms.dtype)

    result = fused_token_loss(
        hidden, weight, labels, token_loss=token_loss, cu_seqlens=cu_seqlens, bias=bias, ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, validate=validate,
        valid_positions=valid_positions, accum_dtype=accum_dtype, return_token_values=return_stats)
    if not return_stats:
        return result
    loss, logp, entropy = result
    return loss, _policy_stats(logp.reshape(-1), entropy.reshape(-1), valid, adv_flat, old_flat, ref_flat,
                               clip_eps, clip_eps if clip_eps_high is None else clip_eps_high)


@torch.no_grad()
def _policy_stats(logp, entropy, valid, adv, old, ref, eps_low: float, eps_high: float) -> dict:
    """Means over the valid tokens (detached 0-d float32 tensors); see :func:`fused_policy_loss`."""
    logp = logp.to(adv.dtype)
    v = valid.to(adv.dtype)
    n = v.sum().clamp_min(1.0)
    ratio = torch.ones_like(logp) if old is None else torch.exp(torch.where(valid, logp - old, 0.0))

    def mean(x: torch.Tensor) -> torch.Tensor:
        return ((x.to(adv.dtype) * v).sum() / n).to(torch.float32)

    stats = {
        "clip_fraction_low": mean((ratio < 1.0 - eps_low) & (adv < 0)),
        "clip_fraction_high": mean((ratio > 1.0 + eps_high) & (adv > 0)),
        "ratio_mean": mean(ratio),
        "entropy_mean": mean(entropy),
        "num_tokens": valid.sum().to(torch.float32),
    }
    if ref is None:
        stats["kl_mean"] = torch.zeros((), dtype=torch.float32, device=logp.device)
    else:
        delta = torch.where(valid, ref - logp, 0.0)
        stats["kl_mean"] = mean(torch.exp(delta) - delta - 1.0)
    return stats
