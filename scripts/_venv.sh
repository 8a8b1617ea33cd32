# Sourced by scripts/test.sh and scripts/bench.sh: a project venv with torch and the package installed.
# Built as a fresh machine would build it: isolated from the system's packages, so the newest release of every
# test dependency is what runs. One exception: a machine whose own Python already has torch (a GPU image, with
# no network to install another) gets a venv that sees the system's packages, so that torch stays in use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A CPU build where the machine offers one; a plain 'torch' may pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$1]"
