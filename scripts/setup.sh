#!/usr/bin/env bash
# Creates or updates the development venv (.venv, or $FASTREG_VENV): torch, then fastreg as an
# editable install with its kernels compiled ahead of time, and the test and bench extras.
# Idempotent: a second run with nothing changed returns in a second.
#
# torch: a CUDA build from PyPI when an NVIDIA GPU is visible, else torch==2.13.0 (served as
# a CPU wheel on this project's machines). FASTREG_TORCH overrides the pip arguments, e.g.
# FASTREG_TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FASTREG_VENV:-.venv}
python=$venv/bin/python

if [[ ! -x $python ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi

if ! "$python" -c "import torch" 2>/dev/null; then
  if [[ -n ${FASTREG_TORCH:-} ]]; then
    read -r -a torch_args <<< "$FASTREG_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_args=(torch)  # PyPI's Linux wheels are CUDA builds
  else
    torch_args=("torch==2.13.0")
  fi
  echo "setup: installing ${torch_args[*]} into $venv" >&2
  "$python" -m pip install --progress-bar off "${torch_args[@]}"
fi

# Reinstall only when something that goes into the build or the dependencies changed.
stamp_file=$venv/.fastreg-setup-stamp
stamp=$( { "$python" -c "import torch; print(torch.__version__)"
           cat setup.py pyproject.toml; find csrc -type f -not -path 'csrc/tests/*' | LC_ALL=C sort | xargs cat; } | sha256sum)
if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]] && compgen -G "fastreg/_C*.so" >/dev/null; then
  exit 0
fi

"$python" -m pip install --progress-bar off "setuptools>=69" ninja
# --no-build-isolation: setup.py sees torch and compiles the kernels now (FASTREG_BUILD_OPS=1:
# fail rather than fall back to a JIT build if it cannot).
echo "setup: building fastreg's kernels (MAX_JOBS=${MAX_JOBS:-all cores})" >&2
FASTREG_BUILD_OPS=1 "$python" -m pip install --progress-bar off --no-build-isolation -e ".[test,bench]"
echo "$stamp" > "$stamp_file"
