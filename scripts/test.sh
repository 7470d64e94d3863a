#!/usr/bin/env bash
# The test command (README and CI run this): set up if needed, then the whole suite on two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two test workers on two cores: no OpenMP oversubscription
exec .venv/bin/python -m pytest -n 2 -p no:warnings --durations=15 "$@"
