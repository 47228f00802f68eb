#!/usr/bin/env bash
# One GPU session in one script (target: under 8 minutes on an H100/H200): the CUDA tests, then
# the benchmark rows of the lean-engine issue, then the report. Everything goes to $OUT.
#
#   bash benchmarks/gpu_run.sh                    # tests/gpu + the default subset (below)
#   bash benchmarks/gpu_run.sh -k "token and not naive-compile"   # tests/gpu + your own selection
#   SKIP_GPU_TESTS=1 bash benchmarks/gpu_run.sh   # benchmarks only
#
# Default subset (DEFAULT_K): token CE at Llama-3-8B N=16384 with 0% and 50% ignored labels
# (all dftkern Triton rows incl. accum_dtype='weight' and the 512 MiB budget rows, naive, peers),
# TRL #7244's shape (H=4096, V=151936, N=8192: CE rows and peers, and the token_entropy groups:
# token op + entropy, fused_token_loss, naive, bare GEMM, forward-only rows), DFT G=4 K=4 T=1024
# at 25% (default), 0% and 50% prompt tokens, DPO 4 pairs (incl. one-pair-per-chunk rows with
# fp32 and bf16 dW accumulation, and Liger's chunked DPO). Torch-engine and torch.compile rows
# are left out (slow on GPU, not what is being measured).
#
# Steps: install the carried peer wheels from .whl/ (if any) into /tmp/site; pytest tests/gpu
# (-> $OUT/gpu_tests.log, $OUT/gpu_tests.xml); pytest benchmarks/ --benchmark-only with few
# rounds (-> $OUT/bench.json, $OUT/pytest.log); benchmarks/report.py (-> $OUT/bench.md,
# $OUT/bench.png); print the Markdown last.
#
# Environment:
#   OUT                     output folder (default: ./bench-out)
#   DFTKERN_BENCH_SHAPES    full (default) | small (N=4k instead of 16k for the masked rows)
#   DFTKERN_BENCH_BUDGET_S  seconds of benchmarking after which remaining rows are skipped
#                           (default 330)
#   GPU_TESTS_TIMEOUT_S     wall limit of the tests/gpu step (default 180)
#   SKIP_GPU_TESTS          1: skip the tests/gpu step
#   PYTHON                  interpreter (default: python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT"
START=$(date +%s)
DEFAULT_K="(llama3-8b-N16384 or trl7244 or G4x5 or G4x2) and not naive-compile and not dftkern-torch"

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
export DFTKERN_BENCH_BUDGET_S=${DFTKERN_BENCH_BUDGET_S:-330}
unset TRITON_INTERPRET  # compiled kernels on the GPU

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
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' || true

GPU_TESTS_STATUS=skipped
if [[ "${SKIP_GPU_TESTS:-0}" != "1" ]]; then
    echo "== tests/gpu (limit ${GPU_TESTS_TIMEOUT_S:-180}s)"
    set +e
    timeout "${GPU_TESTS_TIMEOUT_S:-180}" "$PYTHON" -m pytest tests/gpu -q -rs -p no:cacheprovider \
        --junitxml "$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
    GPU_TESTS_STATUS=$?
    set -e
    tail -n 15 "$OUT/gpu_tests.log"
    echo "== tests/gpu exit status $GPU_TESTS_STATUS after $(($(date +%s) - START)) s"
fi

if (($#)); then
    SELECTION=("$@")
else
    SELECTION=(-k "$DEFAULT_K")
fi
echo "== benchmarks: shapes $DFTKERN_BENCH_SHAPES, budget ${DFTKERN_BENCH_BUDGET_S}s, selection: ${SELECTION[*]}"
set +e
"$PYTHON" -m pytest benchmarks/ --benchmark-enable --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json "$OUT/bench.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=0.5 \
    --benchmark-warmup=on --benchmark-warmup-iterations=1 \
    --benchmark-columns=min,median,rounds --benchmark-sort=name \
    "${SELECTION[@]}" >"$OUT/pytest.log" 2>&1
PYTEST_STATUS=$?
set -e
echo "== benchmark pytest exit status $PYTEST_STATUS (full log: $OUT/pytest.log); summary:"
grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error" "$OUT/pytest.log" | tail -n 40 || true

if [[ -s "$OUT/bench.json" ]]; then
    "$PYTHON" benchmarks/report.py "$OUT/bench.json" --markdown "$OUT/bench.md" --png "$OUT/bench.png" --quiet
    echo "== wall time $(($(date +%s) - START)) s (tests/gpu status: $GPU_TESTS_STATUS)"
    echo
    cat "$OUT/bench.md"
else
    echo "== no results JSON was written (no row ran); last lines of the log:"
    tail -n 40 "$OUT/pytest.log"
    echo "== wall time $(($(date +%s) - START)) s (tests/gpu status: $GPU_TESTS_STATUS)"
fi
if [[ "$GPU_TESTS_STATUS" != "0" && "$GPU_TESTS_STATUS" != "skipped" ]]; then
    exit "$GPU_TESTS_STATUS"
fi
exit "$PYTEST_STATUS"
