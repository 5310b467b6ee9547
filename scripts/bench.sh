#!/usr/bin/env bash
# The benchmark: sets up the venv if needed (scripts/setup.sh), then python -m fastreg.bench.
# Arguments go to the benchmark: scripts/bench.sh --set quick; scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${FASTREG_VENV:-.venv}/bin/python" -m fastreg.bench "$@"
