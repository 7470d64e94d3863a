#!/usr/bin/env bash
# The test command (README and CI run this): set up if needed, then the whole suite on two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --durations=15 "$@"
