"""The defaults table of docs/benchmarks.md ("Workspace"): shape -> workspace, time.

    python -m benchmarks.workspace_table [--repeats 7]

CPU rows are measured here: workspace = peak live tensor bytes of one forward+backward (the
deterministic account of tests/_memory.py), next to the formula
:func:`dftkern.chunking.workspace_bound`; time = the fastest of ``--repeats`` steps (2 shared
cores: the minimum is the least noisy estimate). CUDA rows give the formula only; their time and
measured memory are "not measured for this version" until ``benchmarks/gpu_run.sh`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import dftkern
from dftkern.chunking import DEFAULT_CHUNK_BYTES_CPU, DEFAULT_GROUPED_CHUNK_BYTES_CUDA, workspace_bound

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _memory import LiveTensorBytes  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _problem(n, h, v, dtype, ignore, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore:
        labels = labels.masked_fill(torch.rand(n, generator=g) < ignore, -100)
    return hidden, weight, labels


def _step(op, hidden, weight, labels, **kw):
    hidden.grad = weight.grad = None
    if op == "token op":
        dftkern.fused_linear_logprobs(hidden, weight, labels, **kw).sum().backward()
    elif op == "CE":
        dftkern.fused_linear_cross_entropy(hidden, weight, labels, **kw).backward()
    elif op == "token loss (logp + entropy)":
        dftkern.fused_token_loss(hidden, weight, labels, token_loss=lambda lp, en, ix: -lp - 0.01 * en,
                                 **kw).backward()
    else:
        raise ValueError(op)


PATHS = {"token op": "recompute", "CE": "fused", "token loss (logp + entropy)": "fused"}


def cpu_rows(repeats: int) -> list[str]:
    n, h, v = 512, 256, 8192
    out = []
    cases = [(op, torch.float32, ignore, None, "fp32") for op in PATHS for ignore in (0.0, 0.75)]
    cases += [("CE", torch.bfloat16, 0.0, 64 * v * 4, accum) for accum in ("fp32", "weight")]
    for op, dtype, ignore, chunk_bytes, accum in cases:
        hidden, weight, labels = _problem(n, h, v, dtype, ignore)
        kw = dict(backend="torch", chunk_bytes=chunk_bytes, accum_dtype=accum)
        _step(op, hidden, weight, labels, **kw)  # warm-up
        with LiveTensorBytes() as account:
            _step(op, hidden, weight, labels, **kw)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _step(op, hidden, weight, labels, **kw)
            times.append(time.perf_counter() - t0)
        n_valid = int((labels != -100).sum())
        budget = chunk_bytes or DEFAULT_CHUNK_BYTES_CPU
        rows = max(1, budget // (v * 4))
        bound = workspace_bound(PATHS[op], n_tokens=n, n_valid=n_valid, chunk_valid=min(n_valid, rows),
                                hidden_size=h, vocab_size=v, dtype=dtype, engine="torch", device="cpu",
                                accum_dtype=accum, chunks=-(-n_valid // rows), budget=budget)
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        out.append(f"| {op} | N={n} H={h} V={v} {name}, {round(100 * ignore)}% ignored | "
                   f"{_fmt(budget)} | {accum} | {_fmt(account.peak)} | {_fmt(bound)} | "
                   f"{min(times) * 1e3:.0f} ms |")
    return out


def gpu_rows() -> list[str]:
    out = []
    h, v = 4096, 128256
    for op, n, ignore, budget, accum in [
        ("CE", 16384, 0.0, DEFAULT_GROUPED_CHUNK_BYTES_CUDA, "fp32"),
        ("CE", 16384, 0.0, DEFAULT_GROUPED_CHUNK_BYTES_CUDA, "weight"),
        ("CE", 16384, 0.0, 512 * MIB, "fp32"),
        ("CE", 16384, 0.0, 512 * MIB, "weight"),
        ("CE", 16384, 0.5, DEFAULT_GROUPED_CHUNK_BYTES_CUDA, "fp32"),
        ("token op", 16384, 0.0, 1 * GIB, "fp32"),
    ]:
        n_valid = int(n * (1 - ignore))
        rows = max(1, budget // (v * 4))
        bound = workspace_bound(PATHS[op], n_tokens=n, n_valid=n_valid, chunk_valid=min(n_valid, rows),
                                hidden_size=h, vocab_size=v, dtype=torch.bfloat16, engine="triton",
                                accum_dtype=accum, chunks=-(-n_valid // rows), budget=budget)
        out.append(f"| {op} | Llama-3-8B head N={n} bf16, {round(100 * ignore)}% ignored | {_fmt(budget)} | "
                   f"{accum} | not measured for this version | {_fmt(bound)} | not measured for this version |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print("| path | shape | chunk budget | accum_dtype | workspace (measured) | workspace (formula) | time |")
    print("|---|---|---|---|---|---|---|")
    for line in cpu_rows(args.repeats) + gpu_rows():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
