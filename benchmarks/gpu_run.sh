#!/usr/bin/env bash
# Run the dftkern benchmark suite on a CUDA machine and render the report.
#
#   bash benchmarks/gpu_run.sh [PYTEST ARGS...]   # from anywhere; runs in the repository root
#   bash benchmarks/gpu_run.sh -k "token and not naive-compile"     # e.g. a subset of rows
#
# Steps: install the carried peer wheels from .whl/ (if any) into /tmp/site, run
# `pytest benchmarks/ --benchmark-only` with few rounds into $OUT/bench.json, render
# $OUT/bench.md + $OUT/bench.png with benchmarks/report.py, print the Markdown last.
#
# Environment:
#   OUT                     output folder (default: ./bench-out)
#   DFTKERN_BENCH_SHAPES    full (default: 3 LM heads x N=4k/16k/32k + DFT/DPO) | small (N=4k only)
#   DFTKERN_BENCH_BUDGET_S  seconds of benchmarking after which remaining rows are skipped
#                           (default 300, keeps the whole script under ~7 minutes on an H100)
#   PYTHON                  interpreter (default: python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT"
START=$(date +%s)

shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then
    echo "== installing ${#WHEELS[@]} carried wheel(s) into /tmp/site: ${WHEELS[*]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${WHEELS[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export DFTKERN_BENCH_SHAPES=${DFTKERN_BENCH_SHAPES:-full}
export DFTKERN_BENCH_BUDGET_S=${DFTKERN_BENCH_BUDGET_S:-300}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
for dist in ("triton", "transformers", "pytest", "pytest-benchmark", "liger-kernel", "cut-cross-entropy"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} not installed")
PY
echo "== shapes: $DFTKERN_BENCH_SHAPES, budget: ${DFTKERN_BENCH_BUDGET_S}s, output: $OUT"

set +e
"$PYTHON" -m pytest benchmarks/ --benchmark-enable --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json "$OUT/bench.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=0.5 \
    --benchmark-warmup=on --benchmark-warmup-iterations=1 \
    --benchmark-columns=min,median,rounds --benchmark-sort=name \
    "$@" >"$OUT/pytest.log" 2>&1
PYTEST_STATUS=$?
set -e
echo "== pytest exit status $PYTEST_STATUS (full log: $OUT/pytest.log); summary:"
grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error" "$OUT/pytest.log" | tail -n 40 || true

if [[ -s "$OUT/bench.json" ]]; then
    "$PYTHON" benchmarks/report.py "$OUT/bench.json" --markdown "$OUT/bench.md" --png "$OUT/bench.png" --quiet
    echo "== wall time $(($(date +%s) - START)) s"
    echo
    cat "$OUT/bench.md"
else
    echo "== no results JSON was written (no row ran); last lines of the log:"
    tail -n 40 "$OUT/pytest.log"
    echo "== wall time $(($(date +%s) - START)) s"
fi
exit "$PYTEST_STATUS"
