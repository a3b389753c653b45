#!/usr/bin/env bash
# `make bench-gpu`: one call on an NVIDIA GPU machine that checks and times everything.
#   1. the kernel tests, compiled for the GPU (no interpreter; bf16 included),        <= 150 s
#   2. every benchmark in bench/ at its GPU sizes (CSV + markdown + PNG under          <= 300 s
#      bench/results/), each under its own budget (bench/run_all.py: BUDGET_S),
#   3. a summary table as the last lines (with the kernel-test result in it).
# Worst case about 7.6 minutes on one H100/H200 (the timeouts), so the whole call stays under 8.
# Uses .venv when present, else the machine's python3 (GPU machines here come with
# torch/triton/timm/transformers and have no network to install).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET RADIO_KERNELS_BACKEND
OUT_DIR=${BENCH_OUT:-bench/results}
mkdir -p "$OUT_DIR"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1

echo "== kernel tests on the GPU =="
log=$(mktemp)
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_reference.py tests/test_losses.py tests/test_attention.py >"$log" 2>&1
tests_rc=$?
tail -n 25 "$log"
result=$(grep -E "passed|failed|error" "$log" | tail -n 1)
rm -f "$log"
case $tests_rc in
    0) note="kernel tests on the GPU: ${result:-passed}" ;;
    124) note="kernel tests on the GPU: STOPPED at the 150 s limit (${result:-no result line})"; status=1 ;;
    *) note="kernel tests on the GPU: FAILED, exit ${tests_rc} (${result:-no result line})"; status=1 ;;
esac

echo "== benchmarks =="
timeout 300 "$PY" -m bench.run_all --device cuda --out "$OUT_DIR" --note "$note" || status=1
exit $status
