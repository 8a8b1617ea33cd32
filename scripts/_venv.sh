# Sourced by scripts/test.sh and scripts/bench.sh: a project venv with torch and the package installed.
# A machine that already has torch (a GPU image, say) keeps it: the venv sees the system's packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A CPU build where the machine offers one; a plain 'torch' may pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$1]"
