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


@pytest.mark.parametrize("name", ["losses", "attention", "model", "train_step"])
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
