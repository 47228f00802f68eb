"""Per-token logit statistics for logging (no gradient): entropy, mean logit, top-1 hit.

TRL's trainers log ``entropy``, ``mean_token_accuracy`` and ``logits/chosen|rejected``, which need
the whole row of logits, not only the label's log-prob. This computes them in chunks of token
rows (one chunk of logits at a time, bounded by the same byte budget as dftkern's engines) over
the non-ignored tokens only. It costs one extra 2NHV forward product, which is why the trainers
make it optional (``logit_metrics``).
"""

from __future__ import annotations

import torch

from ..chunking import resolve_chunk_bytes
from ..functional import autocast_off
from ._head import LMHead


@torch.no_grad()
def token_logit_stats(hidden: torch.Tensor, head: LMHead, labels: torch.Tensor, *, ignore_index: int = -100,
                      chunk_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Entropy of ``softmax(z)``, ``mean_v z_v`` and ``argmax_v z_v == label`` per token.

    ``z`` is the transformed logit row (bias, temperature, softcap as in :class:`LMHead`), in fp32.

    Args:
        hidden: ``[..., H]`` any float dtype; labels: int64 ``[...]`` aligned with it.
    Returns:
        ``{"entropy": fp32, "mean_logit": fp32, "is_top1": bool}``, each of ``labels.shape``, 0/False
        at ignored positions. ``is_top1`` uses the first maximum (a tie with an earlier token misses).
    """
    weight = head.weight
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(flat_h.device)
    valid = torch.nonzero(flat_y != ignore_index).squeeze(1)
    out = {"entropy": torch.zeros(flat_y.shape, dtype=torch.float32, device=flat_h.device),
           "mean_logit": torch.zeros(flat_y.shape, dtype=torch.float32, device=flat_h.device),
           "is_top1": torch.zeros(flat_y.shape, dtype=torch.bool, device=flat_h.device)}
    budget = resolve_chunk_bytes(chunk_bytes, flat_h.device)
    rows = max(1, budget // (3 * 4 * weight.shape[0]))  # logits, exp and product rows in fp32
    w32 = weight.float() if weight.dtype != torch.float32 else weight
    b32 = None if head.bias is None else head.bias.float()
    tf = head.transform
    with autocast_off(flat_h.device):  # fp32 statistics, also inside TRL's bf16 autocast
        for start in range(0, valid.numel(), rows):
            idx = valid[start:start + rows]
            z = flat_h[idx].float() @ w32.t()
            if b32 is not None:
                z = z + b32
            if tf.temperature != 1.0:
                z = z / tf.temperature
            if tf.softcap is not None:
                z = tf.softcap * torch.tanh(z / tf.softcap)
            logp = torch.log_softmax(z, dim=-1)
            plogp = logp.exp() * logp
            out["entropy"][idx] = -plogp.masked_fill_(logp == -torch.inf, 0.0).sum(-1)  # p = 0: no term
            out["mean_logit"][idx] = z.mean(-1)
            out["is_top1"][idx] = z.argmax(-1) == flat_y[idx]
    return {k: v.view(labels.shape) for k, v in out.items()}
