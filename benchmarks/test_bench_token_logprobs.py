"""Token log-probs / cross-entropy, forward + backward: one group per shape, one row per implementation."""

from __future__ import annotations

import pytest

from .harness import run_row
from .implementations import make_token_problem, token_implementations
from .shapes import selected_shape_set, token_shapes

SHAPE_SET = selected_shape_set()
CASES = [(shape, impl) for shape in token_shapes(SHAPE_SET) for impl in token_implementations()]


@pytest.mark.parametrize(("shape", "impl"), CASES, ids=[f"{s.id}-{i.name}" for s, i in CASES])
def test_token_logprobs(benchmark, shape, impl, matmul_floor):
    run_row(benchmark, operation="token", shape=shape, shape_set=SHAPE_SET, impl=impl,
            make_problem=make_token_problem, matmul=matmul_floor)
