"""Running one benchmark row: skips, timing, achieved TFLOP/s, peak memory.

A row goes through:

1. the session time budget (env ``DFTKERN_BENCH_BUDGET_S``): past it, remaining rows skip;
2. availability (peer not installed, CUDA-only code on CPU): skip with the reason;
3. on CUDA, a memory estimate against free memory: a row that obviously cannot fit is skipped
   as "OOM (estimated ...)" before anything is allocated;
4. inputs drawn once (random), then ``benchmark(step)`` where ``step`` clears the gradients, runs
   the loss, calls ``backward()`` and, on CUDA, ``torch.cuda.synchronize()`` so pytest-benchmark's
   wall clock covers the GPU work; a ``torch.cuda.OutOfMemoryError`` frees memory and skips "OOM";
5. peak memory of one more step: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``
   minus the allocation before the step (inputs, weights); on CPU the peak-RSS growth of one step
   in a fresh subprocess (:mod:`benchmarks.rss_probe`). Both include the gradients the step writes.

Every skip is recorded (:data:`SKIPPED_ROWS`) and written into the ``--benchmark-json`` output by
the conftest hook, so the report lists skipped rows with their reasons.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .implementations import Implementation, package_version
from .shapes import dtype_name

__all__ = [
    "BUDGET_ENV",
    "SKIPPED_ROWS",
    "SESSION_STATE",
    "device",
    "budget_seconds",
    "row_group",
    "skip_row",
    "make_step",
    "measure_matmul_tflops",
    "cuda_peak_bytes",
    "cpu_peak_rss_growth",
    "environment_info",
    "run_row",
]

BUDGET_ENV = "DFTKERN_BENCH_BUDGET_S"
REPO_ROOT = Path(__file__).resolve().parent.parent

SKIPPED_ROWS: list[dict] = []
"""One dict per skipped row: operation, group, implementation, shape, reason."""

SESSION_STATE: dict = {"start": time.monotonic(), "matmul": None}


def device() -> torch.device:
    """The benchmark device: the current CUDA device when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def budget_seconds() -> float | None:
    """Session time budget in seconds from ``DFTKERN_BENCH_BUDGET_S`` (None: unlimited)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{BUDGET_ENV} must be positive, got {raw!r}")
    return value


def row_group(operation: str, shape, forward_only: bool = False) -> str:
    """The report group of a row: the shape's group, renamed for the entropy operation and for
    forward-only rows (which are timed apart from the forward+backward rows)."""
    group = shape.group
    if operation == "entropy":
        group = group.replace("token_logprobs", "token_entropy", 1)
    if forward_only:
        group = group.replace("fwd+bwd", "fwd only", 1)
    return group


def skip_row(operation: str, shape, impl_name: str, reason: str, group: str | None = None):
    """Record a skipped row and skip the test (never returns)."""
    SKIPPED_ROWS.append({"operation": operation, "group": group or shape.group, "implementation": impl_name,
                         "shape": shape.id, "reason": reason})
    pytest.skip(reason)


def make_step(loss_fn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...],
              dev: torch.device, backward: bool = True) -> Callable[[], torch.Tensor]:
    """One timed unit: clear grads, loss forward, backward (unless ``backward=False``: a forward-only
    row), (CUDA) synchronize. Returns the detached loss."""
    sync = dev.type == "cuda"

    def step() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn()
        if backward:
            loss.backward()
        if sync:
            torch.cuda.synchronize(dev)
        return loss.detach()
    return step


# ---------------------------------------------------------------------------------------------
# Matmul floor
# ---------------------------------------------------------------------------------------------


def measure_matmul_tflops(dev: torch.device, size: int | None = None, iters: int | None = None) -> dict:
    """Best-of-3 rate of a square matmul: bf16 8192^3 on CUDA, fp32 1024^3 on CPU.

    Returns ``{"tflops", "dtype", "size", "seconds"}`` (seconds per matmul of the best repetition).
    """
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = size or (8192 if cuda else 1024)
    iters = iters or (20 if cuda else 4)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    a = torch.randn(size, size, dtype=dtype, device=dev, generator=gen)
    b = torch.randn(size, size, dtype=dtype, device=dev, generator=gen)
    out = torch.empty(size, size, dtype=dtype, device=dev)
    for _ in range(3 if cuda else 1):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        if cuda:
            torch.cuda.synchronize(dev)
        best = min(best, (time.perf_counter() - start) / iters)
    del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    return {"tflops": 2.0 * size ** 3 / best / 1e12, "dtype": dtype_name(dtype), "size": size, "seconds": best}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_peak_bytes(step: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...], dev: torch.device) -> int:
    """Peak CUDA allocation of one step above what was allocated before it (inputs, weights)."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    step()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - baseline)


def cpu_peak_rss_growth(operation: str, shape_set: str, shape_id: str, impl_name: str,
                        timeout_s: float = 600.0) -> dict:
    """Run :mod:`benchmarks.rss_probe` in a fresh interpreter; returns its JSON result.

    Raises RuntimeError (with the probe's stderr tail) when the probe fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # Fixed thresholds turn off glibc's adaptive mmap threshold: every large buffer is mmapped and
    # unmapped on free, so resident memory follows the live allocations (no hidden reuse).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    cmd = [sys.executable, "-m", "benchmarks.rss_probe", "--operation", operation, "--shape-set", shape_set,
           "--shape-id", shape_id, "--implementation", impl_name]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"rss_probe exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Environment (machine_info)
# ---------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment_info(shape_set: str) -> dict:
    """Device, library versions and date for the results JSON."""
    dev = device()
    info = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "pytest_benchmark": package_version("pytest-benchmark"),
        "dftkern_commit": _git_commit(),
        "python": sys.version.split()[0],
        "cpu_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape_set": shape_set,
        "budget_s": budget_seconds(),
        "matmul": SESSION_STATE["matmul"],
    }
    try:
        import dftkern

        info["dftkern"] = getattr(dftkern, "__version__", None)
    except Exception as exc:  # noqa: BLE001 - report, do not fail the run
        info["dftkern"] = f"not importable: {exc}"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _input_bytes(shape) -> int:
    e = torch.finfo(shape.dtype).bits // 8
    return (shape.tokens + shape.vocab_size) * shape.hidden_size * e + 8 * shape.tokens


def run_row(benchmark, *, operation: str, shape, shape_set: str, impl: Implementation,
            make_problem: Callable, matmul: dict | None) -> None:
    """Benchmark one (operation, shape, implementation) row and fill ``benchmark.extra_info``."""
    group = row_group(operation, shape, impl.forward_only)
    benchmark.group = group
    dev = device()
    smoke = benchmark.disabled

    def skip(reason: str):
        skip_row(operation, shape, impl.name, reason, group=group)

    budget = budget_seconds()
    elapsed = time.monotonic() - SESSION_STATE["start"]
    if budget is not None and elapsed > budget:
        skip(f"time budget exhausted ({elapsed:.0f} s > {BUDGET_ENV}={budget:g})")
    reason = impl.unavailable(dev)
    if reason is not None:
        skip(reason)
    if smoke and impl.compiles and dev.type == "cpu":
        skip("uses torch.compile (first compile ~25 s on 2 CPU cores); skipped in --benchmark-disable smoke runs")

    e = torch.finfo(shape.dtype).bits // 8
    grad_bytes = (shape.tokens + shape.vocab_size) * shape.hidden_size * e
    estimate = grad_bytes + impl.workspace(shape)
    if dev.type == "cuda":
        _free_cuda_memory()
        free, _total = torch.cuda.mem_get_info(dev)
        needed = estimate + _input_bytes(shape)
        if needed > 0.95 * free:
            skip(f"OOM (estimated {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free; not attempted)")

    oom_message = None
    outcome: dict = {}
    try:
        outcome = _attempt(benchmark, impl, make_problem, shape, dev, measure_memory=not smoke)
    except Exception as exc:  # noqa: BLE001 - only OOM is turned into a skip
        if not _is_oom(exc):
            raise
        oom_message = str(exc).splitlines()[0][:160]
    if oom_message is not None:
        _free_cuda_memory()
        skip(f"OOM: {oom_message}")
    if dev.type == "cuda":
        _free_cuda_memory()

    flops = shape.flops // 3 if impl.forward_only else shape.flops
    info = benchmark.extra_info
    info.update({
        "operation": operation,
        "implementation": impl.name,
        "family": impl.family,
        "description": impl.description,
        "options": dict(impl.options),
        "shape": shape.id,
        **shape.describe(),
        "device": dev.type,
        "flops": flops,
        "flop_model": "2*N*H*V (forward only)" if impl.forward_only else "6*N*H*V",
        "loss_value": outcome.get("loss_value"),
    })
    if dev.type == "cuda":
        info["estimated_bytes"] = estimate
    if "peak_mem_bytes" in outcome:
        info["peak_mem_bytes"] = outcome["peak_mem_bytes"]
        info["peak_mem_method"] = "torch.cuda.max_memory_allocated - allocated before the step"

    if smoke:
        return
    if dev.type == "cpu":
        try:
            probe = cpu_peak_rss_growth(operation, shape_set, shape.id, impl.name)
            info["peak_mem_bytes"] = probe["peak_rss_growth_bytes"]
            info["peak_mem_method"] = probe["method"]
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            info["peak_mem_bytes"] = None
            info["peak_mem_error"] = str(exc)[:300]
    median = benchmark.stats.stats.median
    info["median_s"] = median
    info["tflops"] = flops / median / 1e12 if median > 0 else None
    if matmul is not None and info["tflops"] is not None:
        info["matmul_tflops"] = matmul["tflops"]
        info["matmul_dtype"] = matmul["dtype"]
        info["pct_of_matmul"] = 100.0 * info["tflops"] / matmul["tflops"]


def _attempt(benchmark, impl: Implementation, make_problem: Callable, shape, dev: torch.device,
             measure_memory: bool) -> dict:
    """Build inputs and run the benchmark; all tensors die with this frame (OOM-safe)."""
    problem = make_problem(shape, dev)
    loss_fn, leaves = impl.build(problem)
    step = make_step(loss_fn, leaves, dev, backward=not impl.forward_only)
    loss = benchmark(step)
    outcome = {"loss_value": float(loss)}
    if measure_memory and dev.type == "cuda":
        outcome["peak_mem_bytes"] = cuda_peak_bytes(step, leaves, dev)
    return outcome
