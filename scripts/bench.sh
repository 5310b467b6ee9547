#!/usr/bin/env bash
# The benchmark: sets up the venv if needed (scripts/setup.sh), then python -m fastreg.bench.
# Arguments go to the benchmark: scripts/bench.sh --set quick; scripts/bench.sh --help
# It runs in the folder it is called from, so relative paths (--out, compare's runs) are yours.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
scripts/setup.sh
python=$(cd "${FASTREG_VENV:-.venv}/bin" && pwd)/python  # FASTREG_VENV is relative to the repository
cd "$caller"
exec "$python" -m fastreg.bench "$@"
