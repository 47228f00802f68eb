"""``grouped_sequence_loss``: the ``group_loss=`` / ``token_term=`` protocol, both schedules, against float64.

A small pairwise loss on sequence sums plus a token term (``log(1 - p_t)`` summed per row, as the
unlikelihood loss uses) is compared with a float64 restatement that materializes the logits;
``head=`` (the old name of ``group_loss``) gives identical results.
"""

from __future__ import annotations

import pytest
import torch
from _reference import make_inputs, reference_token_logprobs, relative_error

from dftkern import grouped_sequence_loss
from dftkern.functional import RowLayout, sequence_logprobs


def _token_term(logp):
    return torch.log(-torch.expm1(logp.clamp(max=-1e-6)))


def _group_loss(seq_sums, counts, g0, g1, token_term_sums=None):
    pairs = seq_sums.float().reshape(g1 - g0, 2)
    per_group = -torch.nn.functional.logsigmoid(0.3 * (pairs[:, 0] - pairs[:, 1]))
    if token_term_sums is not None:
        per_group = per_group - 0.5 * token_term_sums.float().reshape(g1 - g0, 2)[:, 1]
    return per_group, {"n": counts.reshape(g1 - g0, 2)[:, 0].detach()}


def _reference(hidden, weight, labels, bias, with_term):
    h, w, b = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    logp = reference_token_logprobs(h, w, labels, bias=b)
    keep = labels != -100
    pairs = logp.sum(-1).reshape(-1, 2)
    loss = -torch.nn.functional.logsigmoid(0.3 * (pairs[:, 0] - pairs[:, 1]))
    if with_term:
        term = torch.where(keep, torch.log(-torch.expm1(logp.clamp(max=-1e-6))), torch.zeros_like(logp)).sum(-1)
        loss = loss - 0.5 * term.reshape(-1, 2)[:, 1]
    loss = loss.mean()
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad)


def _run(hidden, weight, labels, bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, seq, counts, stats = grouped_sequence_loss(leaves[0], leaves[1], labels, bias=leaves[2], rows_per_group=2,
                                                     **kwargs)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves], seq, counts, stats


@pytest.mark.parametrize("schedule", ["fused", "recompute"])
@pytest.mark.parametrize("with_term", [False, True], ids=["plain", "token-term"])
def test_group_loss_and_token_term_match_fp64(backend, schedule, with_term):
    hidden, weight, labels, bias = make_inputs((6, 7), 16, 90, seed=31, with_bias=True, ignore_fraction=0.3)
    labels[3] = -100  # a row without valid tokens
    kwargs = dict(group_loss=_group_loss, schedule=schedule, backend=backend,
                  token_term=_token_term if with_term else None, chunk_bytes=2 * 14 * 90 * 4)
    loss, grads, seq, counts, stats = _run(hidden, weight, labels, bias, **kwargs)
    ref_loss, ref_grads = _reference(hidden, weight, labels, bias, with_term)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) <= 1e-4
    assert torch.equal(counts, (labels != -100).sum(-1).float())
    torch.testing.assert_close(seq.double(), reference_token_logprobs(hidden, weight, labels, bias=bias).sum(-1),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["n"], counts.reshape(-1, 2)[:, 0])


def test_head_is_the_old_name_of_group_loss():
    hidden, weight, labels, bias = make_inputs((4, 5), 8, 40, seed=32, with_bias=True, ignore_fraction=0.2)
    new = _run(hidden, weight, labels, bias, group_loss=_group_loss, token_term=_token_term, backend="torch")
    old = _run(hidden, weight, labels, bias, head=_group_loss, token_term=_token_term, backend="torch")
    assert new[0].item() == old[0].item()
    for a, b in zip(new[1], old[1]):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="group_loss"):
        grouped_sequence_loss(hidden, weight, labels, rows_per_group=2, group_loss=_group_loss, head=_group_loss)
    with pytest.raises(TypeError, match="group_loss"):
        grouped_sequence_loss(hidden, weight, labels, rows_per_group=2)
    with pytest.raises(ValueError, match="rows_per_group"):
        grouped_sequence_loss(hidden, weight, labels, rows_per_group=0, group_loss=_group_loss)


def test_layout_errors_name_the_expected_layout():
    hidden, weight, labels, _ = make_inputs((2, 3), 8, 20, seed=33)
    with pytest.raises(ValueError, match=r"packed \[N, H\]"):
        grouped_sequence_loss(hidden, weight, labels, rows_per_group=1, group_loss=_group_loss, cu_seqlens=[0, 3, 6])
    with pytest.raises(ValueError, match=r"padded \[R, T, H\]"):
        sequence_logprobs(hidden.reshape(6, 8), weight, labels.reshape(6))
    with pytest.raises(TypeError, match="hidden"):
        sequence_logprobs(hidden.tolist(), weight, labels)
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logprobs(hidden.reshape(6, 8), weight, labels.reshape(6), cu_seqlens="0,3,6")


def test_old_import_locations():
    import dftkern.grouped as grouped

    assert RowLayout is grouped.RowLayout and sequence_logprobs is grouped.sequence_logprobs
