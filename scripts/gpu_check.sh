#!/usr/bin/env bash
# The GPU acceptance check (benchmarks/gpu_check.py): on one NVIDIA GPU, in at most ~8 minutes,
# writes benchmarks/results/gpu_check.json and prints a table (docs/gpu.md says what it reports).
#
#   scripts/gpu_check.sh            # on the GPU machine; installs what is missing (see below)
#   scripts/gpu_check.sh --dry-run  # the same plumbing on the CPU, tiny model (the test suite runs this)
#
# Without --dry-run it first makes sure of: a CUDA build of torch (pip, from download.pytorch.org,
# TORCH_CUDA_INDEX to choose another wheel index), bitsandbytes (QLoRA) and trl (the comparison).
# flash-attn is not installed here (it compiles for a long time): install it beforehand to have
# its varlen kernel checked and used. PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: no NVIDIA GPU here (use --dry-run on a CPU)" >&2
    exit 2
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: installing a CUDA build of torch" >&2
    "$PY" -m pip install -q --upgrade torch --index-url "${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
  fi
  "$PY" -c "import bitsandbytes" 2>/dev/null || "$PY" -m pip install -q "bitsandbytes>=0.50"
  "$PY" -c "import trl" 2>/dev/null || "$PY" -m pip install -q "trl>=1.16" || echo "gpu_check: trl not installed; its comparison is skipped" >&2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
