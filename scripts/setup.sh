#!/usr/bin/env bash
# Create .venv (if missing) with torch's CPU build first, then tuneforge with its test extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# DeepSpeed (the `deepspeed` extra) without compiling its ops: ZeRO-1/2/3 run on the CPU over gloo.
python -c "import deepspeed" >/dev/null 2>&1 || DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.15"
# Open MPI's mpirun, for `--launcher mpi` and its test (Debian/Ubuntu; CI runs this as root).
if ! command -v mpirun >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openmpi-bin
  else
    echo "setup.sh: mpirun not found and no apt-get: install Open MPI for the --launcher mpi test" >&2
  fi
fi
