#!/usr/bin/env bash
# The test suite, as CI runs it: sets up the venv if needed (scripts/setup.sh), then pytest.
# Arguments go to pytest: scripts/test.sh -x -k dropout; scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${FASTREG_VENV:-.venv}/bin/python" -m pytest "$@"
