#!/usr/bin/env bash
# One GPU session in one script (target: under 8 minutes on an H100/H200, set before the
# prefix-sharing step was added; that step is capped by PREFIX_BENCH_TIMEOUT_S): the CUDA tests, then
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
# (-> $OUT/gpu_tests.log, $OUT/gpu_tests.xml); the prefix-sharing step of issue 16 (shared vs
# unshared training step on a random-init model with Llama-3-8B's layer shapes, 2 layers, bf16
# autocast, K = 2, 4, 8 at prompt/response 512/512 and 1024/256; -> $OUT/prefix_sharing.json,
# $OUT/prefix_sharing.md; docs/prefix_sharing.md); pytest benchmarks/ --benchmark-only with few
# rounds (-> $OUT/bench.json, $OUT/pytest.log); benchmarks/report.py (-> $OUT/bench.md,
# $OUT/bench.png); print the Markdown last. That is 8 files under $OUT, the most the device
# tool brings back: add no more.
#
# Environment:
#   OUT                     output folder (default: ./bench-out)
#   DFTKERN_BENCH_SHAPES    full (default) | small (N=4k instead of 16k for the masked rows)
#   DFTKERN_BENCH_BUDGET_S  seconds of benchmarking after which remaining rows are skipped
#                           (default 330)
#   GPU_TESTS_TIMEOUT_S     wall limit of the tests/gpu step (default 180)
#   SKIP_GPU_TESTS          1: skip the tests/gpu step
#   PREFIX_BENCH_TIMEOUT_S  wall limit of the prefix-sharing step (default 240; the JSON is rewritten
#                           after every measurement, so a run cut short keeps what it measured)
#   SKIP_PREFIX_BENCH       1: skip the prefix-sharing step
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

PREFIX_STATUS=skipped
if [[ "${SKIP_PREFIX_BENCH:-0}" != "1" ]]; then
    echo "== prefix sharing (issue 16): Llama-3-8B layer shapes, 2 layers (limit ${PREFIX_BENCH_TIMEOUT_S:-240}s)"
    set +e
    timeout "${PREFIX_BENCH_TIMEOUT_S:-240}" "$PYTHON" -m dftkern.train.prefix_sharing bench --device cuda \
        --dtype bf16 --preset llama3-8b-layers --ks 2 4 8 --shapes 512/512 1024/256 --groups 2 --warmup 2 \
        --repeats 3 --json "$OUT/prefix_sharing.json" >"$OUT/prefix_sharing.md" 2>/tmp/prefix_sharing.err
    PREFIX_STATUS=$?
    set -e
    rm -f "$OUT/prefix_sharing.json.tmp"  # left only if the limit struck mid-write
    tail -n 20 /tmp/prefix_sharing.err
    cat "$OUT/prefix_sharing.md"
    echo "== prefix sharing exit status $PREFIX_STATUS after $(($(date +%s) - START)) s"
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
if [[ "$PREFIX_STATUS" != "skipped" && -s "$OUT/prefix_sharing.md" ]]; then
    echo
    echo "Prefix sharing (issue 16, exit status $PREFIX_STATUS):"
    cat "$OUT/prefix_sharing.md"
fi
if [[ "$GPU_TESTS_STATUS" != "0" && "$GPU_TESTS_STATUS" != "skipped" ]]; then
    exit "$GPU_TESTS_STATUS"
fi
if [[ "$PYTEST_STATUS" != "0" ]]; then
    exit "$PYTEST_STATUS"
fi
if [[ "$PREFIX_STATUS" != "0" && "$PREFIX_STATUS" != "skipped" ]]; then
    exit "$PREFIX_STATUS"
fi
exit 0
