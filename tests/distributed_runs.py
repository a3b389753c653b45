"""Shared helpers of the multi-process trainer tests: launch 2 gloo ranks, compare two runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.plots import read_metrics


def torchrun_train(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m radio train ARGS --no-progress``; asserts it succeeded."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "radio",
        "train",
        *args,
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_training(
    want_dir: Path, got_dir: Path, steps: list[int], statistics: dict[str, list[str]] | None = None
) -> None:
    """The runs logged the same losses, LR and gradient norms (1e-4), hold the same EMA weights (1e-4 /
    1e-5) and the same teacher statistics to float round-off: ``statistics`` {part: [keys]} of each
    teacher's state ("normalizer", "dispersion"), default every floating-point entry of both."""
    want, got = read_metrics(want_dir / "metrics.jsonl"), read_metrics(got_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == steps
    for a, b in zip(want, got):
        for key in a:
            if key.startswith("loss") or key in ("lr", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    sa, sb = load_checkpoint(latest_checkpoint(want_dir)), load_checkpoint(latest_checkpoint(got_dir))
    for k in sa["ema"]:
        torch.testing.assert_close(sb["ema"][k], sa["ema"][k], rtol=1e-4, atol=1e-5)
    for name in sa["teachers"]:  # statistics all-reduced to the global batch's
        for part in ("normalizer", "dispersion"):
            for key, value in (sa["teachers"][name][part] or {}).items():
                if statistics is not None and key not in statistics.get(part, ()):
                    continue
                if torch.is_tensor(value) and value.is_floating_point():
                    torch.testing.assert_close(sb["teachers"][name][part][key], value)
