"""Lean-engine rows (issue 12): ignored tokens, entropy at TRL #7244's shape, dW accumulation dtype, prompt fractions.

* token CE with 0% / 75% ignored labels (CPU; the compaction row) and 50% (CUDA, Llama-3-8B
  N=16k), and at TRL #7244's shape (H=4096, V=151936, N=8192) — every token row incl. peers and
  the ``accum_dtype='weight'`` CE rows;
* the entropy-bonus token loss (``token_entropy`` groups): dftkern's token op with entropy (8NHV),
  ``fused_token_loss`` (6NHV), naive (+ compiled), the bare head GEMM; and forward-only rows
  (log-probs + entropy without gradient vs the bare forward GEMM);
* DFT with 0% and 50% prompt tokens (the default shapes have 25%).
"""

from __future__ import annotations

import pytest

from .harness import run_row
from .implementations import (
    entropy_implementations,
    loss_implementations,
    make_loss_problem,
    make_token_problem,
    token_implementations,
)
from .shapes import lean_token_shapes, prompt_loss_shapes, selected_shape_set, token_shapes

SHAPE_SET = selected_shape_set()
TOKEN_CASES = [(shape, impl) for shape in lean_token_shapes(SHAPE_SET) for impl in token_implementations()]
# entropy: the CPU shape on CPU; TRL #7244's shape on CUDA
ENTROPY_SHAPES = token_shapes("cpu") if SHAPE_SET == "cpu" else [s for s in lean_token_shapes(SHAPE_SET)
                                                                  if s.model == "trl7244"]
ENTROPY_CASES = [(shape, impl) for shape in ENTROPY_SHAPES for impl in entropy_implementations()]
PROMPT_CASES = [(shape, impl) for shape in prompt_loss_shapes(SHAPE_SET, "dft") for impl in loss_implementations("dft")]


@pytest.mark.parametrize(("shape", "impl"), TOKEN_CASES, ids=[f"{s.id}-{i.name}" for s, i in TOKEN_CASES])
def test_lean_token(benchmark, shape, impl, matmul_floor):
    run_row(benchmark, operation="token", shape=shape, shape_set=SHAPE_SET, impl=impl,
            make_problem=make_token_problem, matmul=matmul_floor)


@pytest.mark.parametrize(("shape", "impl"), ENTROPY_CASES, ids=[f"{s.id}-{i.name}" for s, i in ENTROPY_CASES])
def test_token_entropy(benchmark, shape, impl, matmul_floor):
    run_row(benchmark, operation="entropy", shape=shape, shape_set=SHAPE_SET, impl=impl,
            make_problem=make_token_problem, matmul=matmul_floor)


@pytest.mark.parametrize(("shape", "impl"), PROMPT_CASES, ids=[f"dft-{s.id}-{i.name}" for s, i in PROMPT_CASES])
def test_dft_prompt_fraction(benchmark, shape, impl, matmul_floor):
    run_row(benchmark, operation="dft", shape=shape, shape_set=SHAPE_SET, impl=impl,
            make_problem=make_loss_problem, matmul=matmul_floor)
