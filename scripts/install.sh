#!/usr/bin/env bash
# Create .venv (unless VENV says otherwise) and install giantpipe with its dev extras.
# PyTorch: a torch that is already importable (a user's CUDA build, say) is left alone;
# otherwise the CPU build torch==2.13.0 is installed first, so no multi-GB CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if ! "${pip[@]}" "torch==2.13.0" 2>/dev/null; then
    # No local 2.13.0 file: take the CPU wheel from PyTorch's own index.
    "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import giantpipe, torch, lightning; print(f'giantpipe ready: torch {torch.__version__}, lightning {lightning.__version__}')"
