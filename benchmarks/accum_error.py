"""Gradient error of the two ``dW`` accumulation dtypes, measured on CPU against float64.

    python -m benchmarks.accum_error [--tokens 8192 --hidden 256 --vocab 4096 --chunks 1 4 16 64]

For bf16 and fp16 inputs (drawn in fp32, then rounded) the CE loss ``-(1/N) sum_t logp_t`` is
differentiated w.r.t. the LM-head weight in two ways, each with the token axis split into
``k`` chunks (the fused schedule's ``dW += dX_c^T h_c``):

* ``dftkern`` — ``fused_linear_cross_entropy(accum_dtype=...)`` as it runs on this CPU (the
  products see fp32 ``dX``: the CPU has no half x half -> fp32 GEMM);
* ``GPU emulation`` — the CUDA path emulated in fp32: ``dX`` rounded to the input dtype per chunk
  (what the Triton epilogue writes), the product accumulated in fp32 (as cuBLAS does), then
  either added to an fp32 accumulator (``accum_dtype="fp32"``, one rounding at the end) or to a
  buffer of the input dtype (``accum_dtype`` = the weight's dtype: one rounding per chunk).

The reference is the float64 gradient of the same (rounded) inputs. Printed: the max-norm and
L2 relative errors of ``dW``. The output is a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dftkern import fused_linear_cross_entropy
from dftkern.chunking import index_ranges


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden ** 0.5)).to(dtype)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a.double() - b
    return (d.abs().max() / b.abs().max()).item(), (d.norm() / b.norm()).item()


def reference_grad(h, w, y) -> torch.Tensor:
    w64 = w.double().requires_grad_(True)
    loss = -torch.log_softmax(h.double() @ w64.T, -1).gather(1, y[:, None]).mean()
    loss.backward()
    return w64.grad


def gpu_emulation(h, w, y, chunks: int, accum: str) -> torch.Tensor:
    """dW as the CUDA path computes it (see module doc), with ``chunks`` token chunks."""
    n = h.shape[0]
    acc = torch.zeros(w.shape, dtype=torch.float32 if accum == "fp32" else w.dtype)
    for t0, t1 in index_ranges(n, -(-n // chunks)):
        logits = h[t0:t1].float() @ w.float().T
        p = torch.softmax(logits, -1)
        p[torch.arange(t1 - t0), y[t0:t1]] -= 1.0
        dx = (p / n).to(w.dtype)  # the epilogue writes dX in the input dtype
        product = dx.float().T @ h[t0:t1].float()  # fp32 accumulation inside the GEMM
        acc += product.to(acc.dtype) if accum != "fp32" else product
    return acc.to(w.dtype)


def dftkern_grad(h, w, y, chunks: int, accum: str) -> torch.Tensor:
    rows = -(-h.shape[0] // chunks)
    leaf = w.clone().requires_grad_(True)
    fused_linear_cross_entropy(h, leaf, y, backend="torch", chunk_bytes=rows * w.shape[0] * 4,
                               accum_dtype=accum).backward()
    return leaf.grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args(argv)
    print(f"N={args.tokens}, H={args.hidden}, V={args.vocab}; relative error of dW vs float64 "
          "(max-norm / L2)\n")
    print("| dtype | chunks | path | accum_dtype='fp32' | accum_dtype=weight dtype |")
    print("|---|---|---|---|---|")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        h, w, y = _inputs(args.tokens, args.hidden, args.vocab, dtype)
        ref = reference_grad(h, w, y)
        for chunks in args.chunks:
            for path, fn in (("dftkern (CPU)", dftkern_grad), ("GPU emulation", gpu_emulation)):
                cells = []
                for accum in ("fp32", "weight"):
                    mx, l2 = _rel(fn(h, w, y, chunks, accum), ref)
                    cells.append(f"{mx:.2e} / {l2:.2e}")
                print(f"| {name} | {chunks} | {path} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
