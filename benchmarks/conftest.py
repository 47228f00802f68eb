"""pytest fixtures and pytest-benchmark hooks of the benchmark suite.

* ``matmul_floor`` (session): the measured square-matmul rate of this device (bf16 on CUDA, fp32
  on CPU), the denominator of each row's "% of matmul".
* ``pytest_benchmark_update_machine_info``: device, library versions, commit, date and the matmul
  floor under ``machine_info["dftkern_bench"]``.
* ``pytest_benchmark_update_json``: the skipped rows (with reasons) and the matmul floor under
  ``output_json["dftkern_bench"]``, so ``report.py`` can show them.
"""

from __future__ import annotations

import pytest

from . import harness
from .shapes import selected_shape_set


@pytest.fixture(scope="session")
def shape_set() -> str:
    return selected_shape_set()


@pytest.fixture(scope="session")
def matmul_floor(request) -> dict | None:
    """``{"tflops", "dtype", "size", "seconds"}`` of this device, or None in --benchmark-disable runs."""
    config = request.config
    if config.getoption("benchmark_disable", default=False) and not config.getoption("benchmark_enable", default=False):
        return None
    result = harness.measure_matmul_tflops(harness.device())
    harness.SESSION_STATE["matmul"] = result
    return result


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dftkern_bench"] = harness.environment_info(selected_shape_set())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dftkern_bench"] = {
        "skipped": list(harness.SKIPPED_ROWS),
        "matmul": harness.SESSION_STATE["matmul"],
        "flop_model": "6*N*H*V per forward+backward; N = all token rows (rows*T for losses)",
    }
