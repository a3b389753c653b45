#!/usr/bin/env bash
# `make bench-gpu`: one call on an NVIDIA GPU machine that checks and times everything.
#   1. the kernel tests, compiled for the GPU (no interpreter; bf16 included),
#   2. every benchmark in bench/ at its GPU sizes (CSV + markdown + PNG under bench/results/),
#   3. a summary table as the last lines.
# Budget: under 8 minutes on one H100/H200. Uses .venv when present, else the machine's python3
# (GPU machines here come with torch/triton/timm/transformers and have no network to install).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET RADIO_KERNELS_BACKEND
OUT_DIR=${BENCH_OUT:-bench/results}
mkdir -p "$OUT_DIR"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== kernel tests on the GPU =="
timeout 200 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_reference.py tests/test_losses.py tests/test_attention.py 2>&1 | tail -n 25 || status=1

echo "== benchmarks =="
timeout 330 "$PY" -m bench.run_all --device cuda --out "$OUT_DIR" || status=1
exit $status
