"""Sequence losses (DFT, DPO), forward + backward: dftkern engines x schedules vs naive and Liger."""

from __future__ import annotations

import pytest

from .harness import run_row
from .implementations import loss_implementations, make_loss_problem
from .shapes import loss_shapes, selected_shape_set

SHAPE_SET = selected_shape_set()
CASES = [(loss, shape, impl) for loss in ("dft", "dpo") for shape in loss_shapes(SHAPE_SET, loss)
         for impl in loss_implementations(loss)]


@pytest.mark.parametrize(("loss", "shape", "impl"), CASES, ids=[f"{op}-{s.id}-{i.name}" for op, s, i in CASES])
def test_sequence_loss(benchmark, loss, shape, impl, matmul_floor):
    run_row(benchmark, operation=loss, shape=shape, shape_set=SHAPE_SET, impl=impl,
            make_problem=make_loss_problem, matmul=matmul_floor)
