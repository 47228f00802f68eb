"""Deterministic memory account on CPU: each path's peak workspace stays within its documented formula.

:class:`_memory.LiveTensorBytes` counts the bytes of every live tensor storage allocated during
the call (forward and backward); :func:`dftkern.chunking.workspace_bound` is the
formula of docs/benchmarks.md ("Workspace"). Paths: the token op (forward only; forward + backward), CE,
``fused_token_loss``, the grouped loss under both schedules; with and without ignored tokens
(compaction), fp32 and bf16, both ``accum_dtype`` values, one chunk and several, both engines
(the Triton engine under the interpreter: its kernels allocate nothing, so its account is the
GPU formula without the torch engine's scratch).

Each case also checks a lower bound (the chunk's logits really are allocated), so a test that
measures nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from _memory import LiveTensorBytes

import dftkern
from dftkern.chunking import workspace_bound

N, H, V, T = 256, 32, 1024, 32  # T: row length of the grouped layout (pairs of rows)


def _inputs(dtype, ignore):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore:
        labels[torch.rand(N, generator=g) < ignore] = -100
        labels[T:2 * T] = -100  # an empty row
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def _group_loss(seq_sums, counts, g0, g1):
    return -seq_sums.float().reshape(g1 - g0, 2).sum(1), {}


def _call(op, hidden, weight, labels, **kwargs):
    if op == "forward":
        with torch.no_grad():
            dftkern.fused_linear_logprobs(hidden, weight, labels, **kwargs)
        return
    if op == "token":
        logp, ent = dftkern.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, **kwargs)
        (logp.sum() + 0.1 * ent.sum()).backward()
    elif op == "ce":
        dftkern.fused_linear_cross_entropy(hidden, weight, labels, **kwargs).backward()
    elif op == "token_loss":
        dftkern.fused_token_loss(hidden, weight, labels, token_loss=lambda lp, en, ix: -lp - 0.1 * en,
                                 **kwargs).backward()
    else:
        schedule = "fused" if op == "grouped-fused" else "recompute"
        loss = dftkern.grouped_sequence_loss(hidden.view(-1, T, H), weight, labels.view(-1, T), rows_per_group=2,
                                             group_loss=_group_loss, schedule=schedule, **kwargs)[0]
        loss.backward()


PATH = {"forward": "forward", "token": "recompute", "ce": "fused", "token_loss": "fused",
        "grouped-fused": "fused", "grouped-recompute": "recompute"}


def _check(op, dtype, ignore, chunk_rows, accum, backend):
    hidden, weight, labels = _inputs(dtype, ignore)
    n = int((labels != -100).sum())
    a = 4
    budget = chunk_rows * V * a if chunk_rows is not None else 256 << 20
    rows = max(1, budget // (V * a))
    span = N if op.startswith("grouped") else n  # groups are planned on their full token spans
    c = min(n, rows)
    chunks = 1 if span <= rows else 2
    kwargs = dict(backend=backend, chunk_bytes=budget)
    if op != "forward":
        kwargs["accum_dtype"] = accum
    with LiveTensorBytes() as account:
        _call(op, hidden, weight, labels, **kwargs)
    bound = workspace_bound(PATH[op], n_tokens=N, n_valid=n, chunk_valid=c, hidden_size=H, vocab_size=V,
                            dtype=dtype, engine=backend, device="cpu", accum_dtype=accum, chunks=chunks,
                            budget=budget,
                            grads=op != "forward")
    assert account.peak <= bound, (f"{op}, {dtype}, accum {accum}: peak {account.peak} B > formula {bound} B "
                                   f"(peak at {account.peak_op}; n={n}, c={c}, chunks={chunks})")
    assert account.peak >= c * V * a, f"{op}: the account missed the chunk's logits ({account.peak} B)"
    # shown with `pytest -s` (the README quotes the range of these ratios)
    print(f"memory account: {backend} {op} {str(dtype).split('.')[-1]} ignored={ignore} chunk_rows={chunk_rows} "
          f"accum={accum}: peak/formula = {account.peak / bound:.2f}")
    return account.peak


@pytest.mark.parametrize("op", list(PATH))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ignore", [0.0, 0.5], ids=["dense", "half-ignored"])
@pytest.mark.parametrize("chunk_rows", [None, 64], ids=["one-chunk", "chunks-of-64"])
def test_torch_engine_within_formula(op, dtype, ignore, chunk_rows):
    accums = ["fp32", "weight"] if dtype == torch.bfloat16 and op != "forward" else ["fp32"]
    for accum in accums:
        _check(op, dtype, ignore, chunk_rows, accum, "torch")


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("op", ["forward", "token", "ce", "grouped-fused"])
def test_triton_engine_within_formula(op):
    _check(op, torch.float32, 0.5, 64, "fp32", "triton")


def test_compaction_and_bf16_accumulation_save_memory():
    """Half the tokens ignored: a one-chunk CE needs about half the logits; bf16 dW accumulation
    over several chunks drops the fp32 [V, H] accumulator (here V*H*4 = 128 KiB)."""
    dense = _check("ce", torch.float32, 0.0, None, "fp32", "torch")
    sparse = _check("ce", torch.float32, 0.5, None, "fp32", "torch")
    assert sparse < 0.6 * dense
    fp32_acc = _check("ce", torch.bfloat16, 0.0, 64, "fp32", "torch")
    bf16_acc = _check("ce", torch.bfloat16, 0.0, 64, "weight", "torch")
    assert fp32_acc - bf16_acc >= V * H * 2


def test_account_counts_allocations_not_views():
    x = torch.zeros(10)
    with LiveTensorBytes() as account:
        y = x.view(2, 5)  # a view of a tensor from before: nothing
        z = torch.empty(1000)  # 4000 bytes
        w = z[:10]  # a view: nothing more
        del z  # still alive through w
        big = torch.ones(2000)  # 8000 bytes
        del big, w
    assert account.peak == 12000 and account.live == 0 and y.shape == (2, 5)
