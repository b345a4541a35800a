#!/usr/bin/env bash
# Create .venv with gdscache (editable) and its test dependencies. Idempotent.
# torch: a CUDA machine keeps the torch it has or gets the default build; a CPU-only machine gets
# torch 2.13.0 (on the project's CI machines a local CPU build, not gigabytes of CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q torch==2.13.0
  fi
fi
pip install -q -e ".[test]"
echo "gdscache installed in .venv ($(python -c 'import gdscache; print(gdscache.__version__)'))"
