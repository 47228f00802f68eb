"""Peak resident-memory growth of one benchmark step, measured in a fresh interpreter (CPU rows).

    python -m benchmarks.rss_probe --operation token --shape-set cpu --shape-id cpu-small-N512 \\
        --implementation naive

Builds the row's inputs exactly as the benchmark does, runs one warm-up step (torch.compile,
lazy initialisation), clears the gradients, resets the kernel's peak-RSS mark (writing ``5`` to
``/proc/self/clear_refs``), runs one more step and prints one JSON line::

    {"peak_rss_growth_bytes": int, "method": str, "baseline_rss_bytes": int, "loss_value": float}

``peak_rss_growth_bytes`` = VmHWM after the step - VmRSS before it, so it covers everything the
step allocates, gradients included. Where the peak mark cannot be reset (not Linux, no
permission) it falls back to ``ru_maxrss`` growth over the first step, which includes warm-up
costs such as compilation; ``method`` says which was used. Run it with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed (the harness does) so freed buffers leave the resident set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys

import torch

from .implementations import find_implementation, make_loss_problem, make_token_problem
from .shapes import SHAPE_SETS, lean_token_shapes, loss_shapes, prompt_loss_shapes, token_shapes


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _find_shape(operation: str, shape_set: str, shape_id: str):
    if operation in ("token", "entropy"):
        shapes = token_shapes(shape_set) + lean_token_shapes(shape_set)
    else:
        shapes = loss_shapes(shape_set, operation) + prompt_loss_shapes(shape_set, operation)
    for shape in shapes:
        if shape.id == shape_id:
            return shape
    raise ValueError(f"no {operation} shape {shape_id!r} in shape set {shape_set!r}; have {[s.id for s in shapes]}")


def measure(operation: str, shape_set: str, shape_id: str, impl_name: str) -> dict:
    """Peak-RSS growth of one step of the row (see module docstring)."""
    from .harness import make_step  # late: harness imports pytest, only needed here

    shape = _find_shape(operation, shape_set, shape_id)
    impl = find_implementation(operation, impl_name)
    dev = torch.device("cpu")
    reason = impl.unavailable(dev)
    if reason is not None:
        raise RuntimeError(f"{impl_name} cannot run here: {reason}")
    make_problem = make_token_problem if operation in ("token", "entropy") else make_loss_problem
    problem = make_problem(shape, dev)
    loss_fn, leaves = impl.build(problem)
    step = make_step(loss_fn, leaves, dev, backward=not impl.forward_only)

    can_reset = os.path.exists("/proc/self/status") and reset_peak_rss()
    if can_reset:
        step()  # warm-up: compilation and first-touch costs stay out of the measurement
        for leaf in leaves:
            leaf.grad = None
        gc.collect()
        reset_peak_rss()
        baseline = current_rss_bytes()
        loss = step()
        growth = peak_rss_bytes() - baseline
        method = "peak RSS (VmHWM) growth of one step after a warm-up, fresh subprocess"
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        loss = step()
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        method = "ru_maxrss growth over the first step (includes warm-up), fresh subprocess"
    return {"peak_rss_growth_bytes": int(max(growth, 0)), "method": method, "baseline_rss_bytes": int(baseline),
            "loss_value": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operation", required=True, choices=("token", "entropy", "dft", "dpo"))
    parser.add_argument("--shape-set", required=True, choices=SHAPE_SETS)
    parser.add_argument("--shape-id", required=True)
    parser.add_argument("--implementation", required=True)
    args = parser.parse_args(argv)
    result = measure(args.operation, args.shape_set, args.shape_id, args.implementation)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
