#!/usr/bin/env bash
# `make bench-gpu`: one call on an NVIDIA GPU machine that checks and times everything.
#   1. the kernel tests, compiled for the GPU (no interpreter; bf16 included), and the
#      pytest-benchmark tests run once each (--benchmark-disable)                        <= 150 s
#      (meanwhile the training-step benchmark's compiles run in the background),
#   2. every benchmark in bench/ at its GPU sizes (CSV + markdown + PNG), each under its own
#      budget (bench/run_all.py); whatever step 1 left unused goes to the benchmarks,
#   3. a summary table as the last lines (with the kernel-test result in it).
# The whole script is held to BENCH_TOTAL_S (default 465 s), under 8 minutes on one H100/H200.
#
#   bash bench/gpu.sh                      # results under bench/results/
#   BENCH_OUT=/some/dir bash bench/gpu.sh  # results packed for a machine that returns <= 8 files:
#       BENCH_OUT/bench_results_<date>_<device>.tar.gz (every CSV / md / PNG and the test log),
#       BENCH_OUT/summary_<date>_<device>.md and BENCH_OUT/gpu_sh_<date>.log (this script's output)
#
# Uses .venv when present, else the machine's python3 (GPU machines here come with
# torch/triton/timm/transformers and have no network to install).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET RADIO_KERNELS_BACKEND
TOTAL_S=${BENCH_TOTAL_S:-465}
TESTS_MAX_S=${BENCH_TESTS_MAX_S:-150}
BENCH_MIN_S=200  # the kernel tests never eat into this much benchmark time
STAMP=$(date +%F)
START=$SECONDS

if [ -n "${BENCH_OUT:-}" ]; then
    mkdir -p "$BENCH_OUT"
    RESULTS=$(mktemp -d /tmp/bench_results.XXXXXX)
    LOG="$BENCH_OUT/gpu_sh_${STAMP}.log"
else
    RESULTS=bench/results
    mkdir -p "$RESULTS"
    LOG=/dev/null
fi
SLUG=gpu

pack() {  # BENCH_OUT: one archive + the summary (the log is written there directly)
    [ -n "${BENCH_OUT:-}" ] || return 0
    cp "$RESULTS"/summary_*.md "$BENCH_OUT"/ 2>/dev/null
    tar czf "$BENCH_OUT/bench_results_${STAMP}_${SLUG}.tar.gz" -C "$RESULTS" . 2>/dev/null \
        || echo "gpu.sh: could not pack $RESULTS into $BENCH_OUT" >&2
}

main() {
    local status=0
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    SLUG=$("$PY" -c "
import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), flush=True)
from bench._common import device_slug
print(device_slug('cuda'))" | tee /dev/stderr | tail -n 1) || { echo "gpu.sh: no CUDA device for torch"; pack; return 1; }
    [ -n "$SLUG" ] || SLUG=gpu

    echo "== kernel tests on the GPU =="
    # Optional plugins of the GPU image: xdist runs the tests in parallel (Triton compiles each
    # kernel variant serially, ~300 variants here), pytest-timeout stops a hung test,
    # pytest-benchmark lets the benchmark tests run once each as plain tests.
    local -a args=(-p no:cacheprovider -rfE --durations=5)  # -q comes from pyproject addopts
    local -a files=(tests/test_reference.py tests/test_losses.py tests/test_attention.py tests/test_attention_varlen.py)
    local plugins
    plugins=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('xdist', 'pytest_timeout', 'pytest_benchmark') if u.find_spec(m)))")
    case " $plugins " in *" xdist "*) args+=(-n "${BENCH_TEST_WORKERS:-12}") ;; esac
    case " $plugins " in *" pytest_timeout "*) args+=(--timeout 120) ;; esac
    case " $plugins " in *" pytest_benchmark "*) files+=(bench/test_kernels_benchmark.py); args+=(--benchmark-disable) ;; esac
    local tests_s=$(( TOTAL_S - (SECONDS - START) - BENCH_MIN_S ))
    (( tests_s > TESTS_MAX_S )) && tests_s=$TESTS_MAX_S
    (( tests_s < ${BENCH_TESTS_MIN_S:-30} )) && tests_s=${BENCH_TESTS_MIN_S:-30}
    local tlog="$RESULTS/kernel_tests_${STAMP}_${SLUG}.log"
    # Meanwhile, in the background: compile the training-step points (Triton kernels, compiled
    # blocks) into the on-disk caches, 2 points at a time, so the timed run loads them instead of
    # compiling for minutes. It stops itself at its budget (TERM: it kills its workers first).
    local pw_pid="" pwlog="$RESULTS/prewarm_train_step_${STAMP}_${SLUG}.log"
    if [ "${BENCH_BACKGROUND_PREWARM:-1}" = 1 ]; then
        TORCHINDUCTOR_COMPILE_THREADS=4 timeout $(( tests_s + 60 )) "$PY" -m bench.train_step --device cuda \
            --prewarm-only --budget-s $(( tests_s + 30 )) >"$pwlog" 2>&1 &
        pw_pid=$!
    fi
    echo "pytest ${args[*]} ${files[*]}   (limit ${tests_s} s)"
    timeout "$tests_s" "$PY" -m pytest "${args[@]}" "${files[@]}" >"$tlog" 2>&1
    local tests_rc=$?
    tail -n 30 "$tlog"
    local -a prewarmed=()
    if [ -n "$pw_pid" ]; then
        wait "$pw_pid" && prewarmed=(--prewarmed train_step)
        echo "background $(tail -n 1 "$pwlog")"
    fi
    local result note
    result=$(grep -E "[0-9]+ (passed|failed|error)" "$tlog" | tail -n 1)
    case $tests_rc in
        0) note="kernel tests on the GPU: ${result:-passed}" ;;
        124) note="kernel tests on the GPU: STOPPED at the ${tests_s} s limit (${result:-no result line})"; status=1 ;;
        *) note="kernel tests on the GPU: FAILED, exit ${tests_rc} (${result:-no result line})"; status=1 ;;
    esac
    pack

    echo "== benchmarks =="
    local bench_s=$(( TOTAL_S - (SECONDS - START) - 10 ))
    # run_all holds itself to --total-s (summary included); the timeout is only a backstop.
    timeout $(( bench_s + 20 )) "$PY" -m bench.run_all --device cuda --out "$RESULTS" \
        --total-s "$bench_s" --note "$note" ${prewarmed[@]+"${prewarmed[@]}"} || status=1
    pack
    return $status
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
