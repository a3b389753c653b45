"""CI smoke test of bench/: every benchmark at its smallest size on a CPU writes sane CSV + markdown.

Benchmarks run in-process through their ``main(argv)`` (one torch import for all of them);
``bench.run_all`` runs once as a subprocess, as ``make bench`` does. About a minute on 2 cores.
"""

from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

# Columns that must hold finite positive numbers in every "ok" row of each benchmark's CSV.
POSITIVE_COLUMNS = {
    "model": ["ms_median", "ms_min"],
    "packed": ["ms", "ms_min", "speedup_vs_padded"],
    "train_step": ["step_ms_median", "images_per_s", "step_tflop", "achieved_tflops", "ref_matmul_tflops"],
}


def _rows(out: Path, name: str) -> list[dict]:
    csvs = sorted(out.glob(f"{name}_*.csv"))
    mds = sorted(out.glob(f"{name}_*.md"))
    assert len(csvs) == 1 and len(mds) == 1, f"{name}: expected one CSV and one markdown file, got {csvs + mds}"
    assert "|---" in mds[0].read_text(), f"{name}: {mds[0].name} holds no markdown table"
    with open(csvs[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{name}: {csvs[0].name} has no rows"
    return rows


def _assert_sane(name: str, rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    assert ok, f"{name}: no row completed: {[r.get('status') for r in rows]}"
    for r in ok:
        for column in POSITIVE_COLUMNS.get(name, []):
            value = float(r[column])
            assert math.isfinite(value) and value > 0, f"{name}: {column}={r[column]!r} in {r}"
    for r in rows:  # no infinities anywhere (NaN marks a value a CPU cannot measure, e.g. GPU memory)
        for key, value in r.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            assert not math.isinf(number), f"{name}: {key}={value!r}"


# Beyond --quick: the smallest student for the model benchmark (its --quick keeps vit-b).
EXTRA_ARGS = {"model": ["--preset", "tiny", "--repeats", "1"]}


@pytest.mark.parametrize("name", ["losses", "attention", "model", "packed", "train_step"])
def test_benchmark_quick_on_cpu(name, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    module.main(["--device", "cpu", "--quick", "--out", str(tmp_path), *EXTRA_ARGS.get(name, [])])
    rows = _rows(tmp_path, name)
    _assert_sane(name, rows)
    if name == "train_step":
        from bench.summary import headline

        assert [r["provider"] for r in rows] == ["torch"]
        assert float(rows[0]["speedup_vs_torch"]) == 1.0
        assert headline(name, rows).startswith("tiny 64px: torch ")


def test_train_step_is_a_full_optimizer_step():
    """One step moves the student's weights, the EMA, the optimizer state and the PHI-S statistics."""
    from bench.train_step import StepBench

    bench = StepBench.build("tiny", 64, 2, "cpu")
    raw, ema = bench.models.raw, bench.models.ema
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    loss = bench.step("torch")
    assert torch.isfinite(loss)
    changed = [k for k, v in raw.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and any(k.startswith("adaptors.") for k in changed)
    assert any(not torch.equal(v, ema_before[k]) for k, v in ema.state_dict().items())
    assert bench.optimizer.state, "AdamW holds no state after the step"
    assert bench.scheduler.last_epoch == 1
    assert all(int(slot.normalizer.num_updates) == 1 for slot in bench.models.slots.values())
    with pytest.raises(ValueError, match="provider"):
        bench.step("cuda")


def test_compiled_provider_swaps_blocks_in_and_out(monkeypatch):
    """'torch+compile' runs the blocks through torch.compile wrappers sharing the same weights, and
    the eager blocks are back afterwards (the other providers must stay uncompiled)."""
    from bench.train_step import StepBench

    calls = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Recorder(module))
    bench = StepBench.build("tiny", 64, 2, "cpu")
    eager = bench.models.raw.blocks
    bench.step("torch")
    assert not calls
    bench.step("torch+compile")
    # The student runs every block once (and the EMA, an uncompiled copy, none).
    assert len(calls) == len(eager)
    assert bench.models.raw.blocks is eager
    wrapped = bench._compiled["blocks"]
    assert all(w.inner is b for w, b in zip(wrapped, eager))


def test_run_all_writes_a_summary(tmp_path):
    args = ["--device", "cpu", "--quick", "--only", "train_step", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("| train_step | ok |") and "tiny 64px: torch" in last, last
    assert len(list(tmp_path.glob("summary_*_quick.md"))) == 1
    assert len(list(tmp_path.glob("train_step_*_quick.csv"))) == 1


# ------------------------------------------------------------------------------------------------
# Branches of the GPU run (bench/gpu.sh) that can be exercised on a CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_prefix", "window_tokens"), [(0, 0), (0, 4), (3, 4)])
def test_sdpa_windowed_matches_the_reference_rule(num_prefix, window_tokens):
    """The SDPA providers' 4-D folding of windows computes reference.attention's rule exactly."""
    from bench.attention import sdpa_windowed
    from radio_kernels import reference

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, num_prefix + 3 * max(window_tokens, 4), 3, 2, 8, generator=g, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views of a packed projection, as in the benchmark
    ours = sdpa_windowed(q, k, v, num_prefix, window_tokens)
    ref = reference.attention(q, k, v, num_prefix=num_prefix, window_tokens=window_tokens)
    torch.testing.assert_close(ours, ref)


def test_attention_run_reports_unrun_and_late_providers():
    """A provider that failed its check is reported, not timed; a spent budget skips every row."""
    import time

    from bench import attention

    shape = attention.shape_of(128, 16, 4, 2, batch=1)
    status = {"eager": "not timed: failed its check against SDPA"}
    rows = attention.run(
        [shape], ["sdpa-math", "eager"], torch.float32, torch.device("cpu"), 0.0, time.time() + 60, None, status
    )
    assert {r["status"] for r in rows if r["provider"] == "eager"} == {status["eager"]}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows if r["provider"] == "sdpa-math")
    rows = attention.run([shape], ["sdpa-math"], torch.float32, torch.device("cpu"), 0.0, time.time() - 1)
    assert {r["status"] for r in rows} == {"skipped (time budget)"}


def test_prewarm_reports_finished_failed_and_stopped_workers():
    import time

    from bench._common import prewarm

    started = time.time()
    report = prewarm(time.sleep, [0, 0, 60], timeout_s=4, max_parallel=3)
    assert time.time() - started < 30
    assert report.startswith("prewarm: 2/3 shapes") and "1 stopped" in report, report
    report = prewarm(sys.exit, [0, 3], timeout_s=30)
    assert report.startswith("prewarm: 1/2 shapes") and "1 failed" in report, report


def test_run_all_budgets_flow_to_the_last_benchmark(monkeypatch):
    import time

    from bench import run_all

    names = list(run_all.BENCHMARKS)
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    assert run_all.budget_for("losses", names, "cuda", False, None) == run_all.BUDGET_S["cuda"]["losses"]
    assert run_all.budget_for("losses", names, "cuda", False, 1000.0 + 300) == run_all.BUDGET_S["cuda"]["losses"]
    # The last one gets all that is left, the summary's reserve aside; a short run squeezes the others.
    assert run_all.budget_for("train_step", names, "cuda", False, 1000.0 + 300) == 300 - run_all.SUMMARY_RESERVE_S
    squeezed = run_all.budget_for("attention", names, "cuda", False, 1000.0 + 60)
    later = len(names) - names.index("attention") - 1
    assert squeezed == 60 - run_all.SUMMARY_RESERVE_S - later * run_all.MIN_BUDGET_S
    assert "--budget-s" in run_all.command("train_step", "cuda", "out", False, 100.0)


def test_summary_names_the_training_step_target():
    from bench.summary import headline

    rows = [
        dict(preset="vit-b", resolution=512, provider="torch", status="ok", images_per_s=100.0, device="nvidia-h200"),
        dict(preset="vit-b", resolution=512, provider="triton", status="ok", speedup_vs_torch=1.6, mem_vs_torch=0.8,
             device="nvidia-h200"),
        dict(preset="vit-b", resolution=512, provider="torch+compile", status="failed: OutOfMemoryError: x",
             device="nvidia-h200"),
    ]  # fmt: skip
    text = headline("train_step", rows)
    assert "triton 1.60x img/s, 0.80x mem (target >= 1.5x, <= 0.7x: NOT met)" in text, text
    assert "torch+compile failed: OutOfMemoryError" in text, text


def test_train_step_gpu_dtype_path_and_wide_teachers_on_cpu():
    """The GPU's bf16 autocast step runs (on a CPU), and the wide teachers build with real widths."""
    from bench.train_step import StepBench

    bench = StepBench.build("tiny", 64, 2, "cpu", amp_dtype=torch.bfloat16)
    assert bench.amp_dtype is torch.bfloat16 and torch.isfinite(bench.step("torch"))
    wide = StepBench.build("tiny", 64, 1, "cpu", teachers="wide", teacher_depth=1, amp_dtype=torch.bfloat16)
    widths = {name: slot.teacher.dtype for name, slot in wide.models.slots.items()}
    assert widths == dict.fromkeys(("siglip2", "dinov3", "sam3"), torch.bfloat16)


def test_train_step_skips_points_that_cannot_finish(monkeypatch):
    from bench import train_step
    from bench.summary import measure_reference

    monkeypatch.setattr(train_step, "POINT_FRACTION_NEEDED", 1e9)  # no point after the first fits
    ref = measure_reference("cpu", quick=True)
    rows = train_step.run(
        "cpu", {("tiny", 64): 2, ("tiny", 128): 2}, ["torch"], teachers="tiny", teacher_depth=2,
        compile_mode="blocks", warmup=1, repeats=1, budget_s=600, reference=ref,
    )  # fmt: skip
    assert [r["status"] for r in rows] == ["ok", "skipped: time budget"]


def test_losses_past_their_budget_write_skipped_rows(tmp_path):
    from bench import losses

    rows = losses.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path)])
    assert rows and {r["status"] for r in rows} == {"skipped: time budget"}
    assert len(list(tmp_path.glob("losses_*.csv"))) == 1


FAKE_GPU_PYTHON = """#!/usr/bin/env bash
# Stand-in for the GPU machine's python3: CPU sizes and a few kernel tests, the same scripts.
real={python}
if [ "$1" = "-c" ] && [[ "$2" == *get_device_name* ]]; then
    exec "$real" -c "print('torch (fake GPU)'); print('fake-gpu')"
elif [ "$1" = "-m" ] && [ "$2" = "bench.run_all" ]; then
    shift 2; args=(); for a in "$@"; do [ "$a" = cuda ] && a=cpu; args+=("$a"); done
    exec "$real" -m bench.run_all "${{args[@]}}" --quick --only losses
elif [ "$1" = "-m" ] && [ "$2" = "bench.train_step" ]; then
    shift 2; args=(); for a in "$@"; do [ "$a" = cuda ] && a=cpu; args+=("$a"); done
    exec "$real" -m bench.train_step "${{args[@]}}" --quick --providers torch torch+compile
elif [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
    shift 2; TRITON_INTERPRET=1 exec "$real" -m pytest "$@" -k "test_shifted_mse_matches_reference"
fi
exec "$real" "$@"
"""


def test_gpu_sh_packs_results_for_the_device_tool(tmp_path):
    """bench/gpu.sh end to end with a stand-in python: at most 3 files in BENCH_OUT (the device tool
    returns 8), an archive holding every result and the test log, and the summary as the last lines."""
    import tarfile

    fake = tmp_path / "python"
    fake.write_text(FAKE_GPU_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(__import__("os").environ, PY=str(fake), BENCH_OUT=str(out), BENCH_TOTAL_S="400")
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("| losses | ok |"), last[-5:]
    assert any(line.startswith("- kernel tests on the GPU: ") and " passed" in line for line in last[-12:]), last[-12:]
    assert "background prewarm: 1/1 shapes compiled" in proc.stdout, proc.stdout[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and names[0].startswith("bench_results_") and names[0].endswith("_fake-gpu.tar.gz"), names
    assert names[1].startswith("gpu_sh_") and names[2].startswith("summary_"), names
    with tarfile.open(out / names[0]) as tar:
        packed = tar.getnames()
    assert any("kernel_tests_" in n for n in packed) and any(n.endswith(".csv") for n in packed), packed
    assert any("prewarm_train_step_" in n for n in packed), packed
    assert (out / names[1]).read_text().rstrip().endswith(last[-1])
