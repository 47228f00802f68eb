"""Banks of categorical policies (one per seed), expressed as inputs of dftkern's fused ops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["POLICIES", "LogitPolicy", "MLPPolicy", "make_policy", "policy_probs"]


POLICIES: tuple[str, ...] = ("logits", "mlp")


def _policy_dtype(log_probs: torch.Tensor) -> torch.dtype:
    """float64 policies for float64 ``log_probs`` (what the experiment trains), float32 otherwise."""
    return torch.float64 if log_probs.dtype == torch.float64 else torch.float32


class _PolicyBank(nn.Module):
    """``S`` independent categorical policies (one per seed) in one module.

    Seed ``s`` owns a disjoint block of the hidden dimension: its hidden state
    ``seed_features()[s]`` is zero outside block ``s``, so its logits (and gradients) only
    involve its own block of ``weight``. One optimiser step therefore trains all seeds at once, as
    separate runs would (Adam acts per coordinate; the bank's loss is the *sum* of the per-seed
    losses, see :func:`method_loss`; :func:`train_seeds` on why float64). The same layout poses
    the bank as inputs of the fused ops (:meth:`fused_inputs`): one-token rows whose
    ``log_softmax(weight @ h)[label]`` is ``log pi_s(label)``.
    """

    num_seeds: int
    weight: nn.Parameter

    def seed_features(self) -> torch.Tensor:  # pragma: no cover - abstract
        """``[S, H]`` hidden state of each seed's rows (the policy's dtype; differentiable)."""
        raise NotImplementedError

    def fused_inputs(self, rows_per_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs of the fused ops for ``S * rows_per_seed`` one-token rows, seed-major.

        Returns:
            ``(hidden [S * rows_per_seed, 1, H], weight [V, H], bias=None)`` in the policy's dtype:
            rows ``s * rows_per_seed ... (s + 1) * rows_per_seed - 1`` belong to seed ``s``.
        """
        features = self.seed_features()
        return features.repeat_interleave(rows_per_seed, dim=0).unsqueeze(1), self.weight, None

    def logits(self) -> torch.Tensor:
        """``[S, V]`` logits of every seed's policy (the policy's dtype; differentiable)."""
        return self.seed_features() @ self.weight.t()


class LogitPolicy(_PolicyBank):
    """Categorical policies whose logits are the free parameters.

    Fused-op form: hidden size ``H = S``; a row of seed ``s`` has the one-hot hidden state
    ``e_s`` and ``weight[:, s]`` (``weight [V, S]``) holds seed ``s``'s logits, so the
    one-token sequence log-probability of label ``a`` is ``log pi_s(a)``.

    Args:
        log_probs: ``[V]`` initial log-probabilities (every seed starts there); float64 gives a
            float64 policy, any other dtype a float32 one.
        num_seeds: ``S``.
    """

    def __init__(self, log_probs: torch.Tensor, num_seeds: int = 1):
        super().__init__()
        if log_probs.dim() != 1:
            raise ValueError(f"log_probs must be 1-D [V], got shape {tuple(log_probs.shape)}")
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
        self.num_seeds = num_seeds
        dtype = _policy_dtype(log_probs)
        init = log_probs.detach().to(dtype).reshape(-1, 1).repeat(1, num_seeds)
        self.weight = nn.Parameter(init)
        self.register_buffer("identity", torch.eye(num_seeds, dtype=dtype))

    def seed_features(self) -> torch.Tensor:
        return self.identity


class MLPPolicy(_PolicyBank):
    """Categorical policies produced by tiny networks, initialised exactly at ``log_probs``.

    Seed ``s``: ``h_s = tanh(A_s c_s + b_s)`` (``[H]``) for a fixed random context ``c_s``
    (``[C]``); logits ``= W_s [h_s, 1]`` with ``W_s [V, H + 1]`` whose last column (the bias)
    starts at ``log_probs`` and the rest at zero. ``A_s``, ``b_s`` and ``W_s`` are trained.
    Fused-op form: ``H_total = S (H + 1)``, block-diagonal hidden states, ``weight = [W_0 ... W_{S-1}]``;
    gradients reach the encoders through the fused op's ``d hidden``.

    Args:
        log_probs: ``[V]`` initial log-probabilities (float64 gives a float64 policy, any other
            dtype a float32 one; the random initialisation is drawn in float32 either way).
        seeds: one int per network (initialises its encoder and context; a seed gives the same
            network whatever else is in the bank).
        hidden_size: ``H``; context_size: ``C``.
    """

    def __init__(self, log_probs: torch.Tensor, seeds: Sequence[int] = (0,), hidden_size: int = 16,
                 context_size: int = 8):
        super().__init__()
        if log_probs.dim() != 1:
            raise ValueError(f"log_probs must be 1-D [V], got shape {tuple(log_probs.shape)}")
        for name, value in (("hidden_size", hidden_size), ("context_size", context_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        seeds = list(seeds)
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.num_seeds = len(seeds)
        bound = 1.0 / math.sqrt(context_size)
        contexts, enc_w, enc_b = [], [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            contexts.append(torch.randn(context_size, generator=generator))
            enc_w.append((torch.rand(hidden_size, context_size, generator=generator) * 2 - 1) * bound)
            enc_b.append((torch.rand(hidden_size, generator=generator) * 2 - 1) * bound)
        dtype = _policy_dtype(log_probs)
        self.register_buffer("context", torch.stack(contexts).to(dtype))  # [S, C]
        self.encoder_weight = nn.Parameter(torch.stack(enc_w).to(dtype))  # [S, H, C]
        self.encoder_bias = nn.Parameter(torch.stack(enc_b).to(dtype))  # [S, H]
        weight = torch.zeros(log_probs.numel(), self.num_seeds, hidden_size + 1, dtype=dtype)
        weight[:, :, hidden_size] = log_probs.detach().to(dtype).reshape(-1, 1)
        self.weight = nn.Parameter(weight.reshape(log_probs.numel(), -1))  # [V, S * (H + 1)]

    def _blocks(self) -> list[torch.Tensor]:
        """Seed by seed ``[tanh(A_s c_s + b_s), 1]`` (``[H + 1]`` each), with the ops a one-seed bank uses."""
        blocks = []
        for seed in range(self.num_seeds):
            h = torch.tanh(self.encoder_weight[seed] @ self.context[seed] + self.encoder_bias[seed])
            blocks.append(torch.cat([h, torch.ones_like(h[:1])]))
        return blocks

    def seed_features(self) -> torch.Tensor:
        return torch.block_diag(*self._blocks())  # [S, S * (H + 1)]

    def logits(self) -> torch.Tensor:
        """``[S, V]``: ``W_s [h_s, 1]`` seed by seed (same values as :meth:`seed_features` ``@ weight.T``,
        computed with the shapes of a one-seed bank so that a bank reproduces separate runs bit for bit)."""
        per_seed = self.weight.view(self.weight.shape[0], self.num_seeds, -1)
        return torch.stack([per_seed[:, seed] @ block for seed, block in enumerate(self._blocks())])


def make_policy(kind: str, log_probs: torch.Tensor, seeds: Sequence[int] = (0,), hidden_size: int = 16) -> _PolicyBank:
    """A bank of ``len(seeds)`` ``"logits"`` or ``"mlp"`` policies, all at ``softmax(log_probs)``."""
    if kind == "logits":
        return LogitPolicy(log_probs, num_seeds=len(seeds))
    if kind == "mlp":
        return MLPPolicy(log_probs, seeds=seeds, hidden_size=hidden_size)
    raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}")


def policy_probs(policy: _PolicyBank) -> torch.Tensor:
    """``[S, V]`` float64 probabilities of every seed's current policy (no grad)."""
    with torch.no_grad():
        return torch.softmax(policy.logits().double(), dim=-1)
