"""The policy loss's own preprocessing makes no host read of device tensors unless validation is on.

On a CUDA device every such read (``.item()``, ``bool(t)``, a boolean-mask index) is a host sync
that stalls the training step. The "meta" device stands in for it here: a meta tensor has no
data, so any read of its values raises. The fused LM-head call is replaced by a stand-in that
hands ``token_loss`` meta log-probs (the engine's own sync behaviour is tested with it, not here);
everything ``fused_policy_loss`` computes around it -- rows, advantages per token, ratio inputs,
weights, stats -- runs on meta tensors. With ``validate=True`` the same call must read values and
fail, which shows the check can tell.
"""

from __future__ import annotations

import pytest
import torch

import dftkern
from dftkern.losses import policy

R, T, H, V = 3, 5, 8, 11


def _stand_in(hidden, weight, labels, *, token_loss, valid_positions, return_token_values, **_):
    n = valid_positions.numel()  # a host tensor: reading it costs nothing
    logp = torch.zeros(n, device=hidden.device)
    entropy = torch.zeros(n, device=hidden.device)
    loss = token_loss(logp, entropy, valid_positions.to(hidden.device)).sum()
    if return_token_values:
        return loss, torch.zeros(labels.shape, device=hidden.device), torch.zeros(labels.shape, device=hidden.device)
    return loss


def _inputs(packed: bool, device: str):
    labels = torch.full((R, T), -100, dtype=torch.int64)
    labels[:, 2:] = 1
    valid_positions = (labels.reshape(-1) != -100).nonzero().reshape(-1)  # host, as the trainer's batches carry
    kwargs = dict(advantages=torch.randn(R, device=device), old_logps=torch.randn(R, T, device=device),
                  ref_logps=torch.randn(R, T, device=device), kl_beta=0.1, entropy_coef=0.01,
                  valid_positions=valid_positions)
    hidden, weight = torch.randn(R, T, H, device=device), torch.randn(V, H, device=device)
    if packed:
        kwargs.update(cu_seqlens=torch.tensor([0, T, 2 * T, 3 * T], dtype=torch.int32),
                      old_logps=kwargs["old_logps"].reshape(-1), ref_logps=kwargs["ref_logps"].reshape(-1))
        return hidden.reshape(R * T, H), weight, labels.reshape(-1).to(device), kwargs
    return hidden, weight, labels.to(device), kwargs


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("packed", [False, True])
def test_default_device_path_reads_no_device_values(monkeypatch, packed, aggregation):
    monkeypatch.delenv("DFTKERN_VALIDATE", raising=False)
    monkeypatch.setattr(policy, "fused_token_loss", _stand_in)
    hidden, weight, labels, kwargs = _inputs(packed, "meta")
    max_tokens = T if aggregation == "constant" else None
    loss, stats = dftkern.fused_policy_loss(hidden, weight, labels, aggregation=aggregation, max_tokens=max_tokens,
                                            return_stats=True, **kwargs)
    assert loss.device.type == "meta" and set(stats) >= {"ratio_mean", "kl_mean", "clip_fraction_low"}
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):  # validation reads the values
        dftkern.fused_policy_loss(hidden, weight, labels, aggregation=aggregation, max_tokens=max_tokens,
                                  validate=True, **kwargs)


def test_host_inputs_are_still_checked_without_validate(monkeypatch):
    """CPU tensors cost no sync: non-finite advantages / log-probs at valid tokens and a bad
    cu_seqlens are errors with the default settings, also when labels live elsewhere (here: meta)."""
    monkeypatch.delenv("DFTKERN_VALIDATE", raising=False)
    monkeypatch.setattr(policy, "fused_token_loss", _stand_in)
    hidden, weight, labels, kwargs = _inputs(True, "meta")
    bad_adv = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        dftkern.fused_policy_loss(hidden, weight, labels, **{**kwargs, "advantages": bad_adv})
    old = torch.zeros(R * T)
    old[0] = float("nan")  # an ignored position: not read
    dftkern.fused_policy_loss(hidden, weight, labels, **{**kwargs, "old_logps": old})
    old[3] = float("inf")  # a valid one (positions 2..4 of row 0), found through the host valid_positions
    with pytest.raises(ValueError, match="old_logps contains NaN or inf at valid"):
        dftkern.fused_policy_loss(hidden, weight, labels, **{**kwargs, "old_logps": old})
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing offsets from 0 to N=15"):
        dftkern.fused_policy_loss(hidden, weight, labels, **{**kwargs, "cu_seqlens": torch.tensor([0, 9, 5, 15])})


def test_host_cu_seqlens_rows_match_the_device_search():
    labels = torch.zeros(9, dtype=torch.int64)
    for bounds in ([0, 2, 2, 9], [0, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 4, 9]):
        host = policy._token_rows(labels, torch.tensor(bounds), len(bounds) - 1, check=False)
        search = torch.searchsorted(torch.tensor(bounds[1:]), torch.arange(9), right=True)
        assert torch.equal(host, search), bounds
