"""Data parallel: 2 gloo processes under torchrun equal one process on the same global batch, with the
student's CPE augmentation on (per-sample uniforms from the data pipeline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radio.train import save_config, train
from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.plots import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_cfg  # noqa: E402


def test_two_gloo_ranks_match_one_process(tmp_path):
    cfg = tiny_cfg(tmp_path / "single", steps=3, batch_size=4)
    # CPE augmentation stays on (the default): each sample's crop comes from its own seed, not the rank.
    assert cfg.student.cpe_augmentation
    # A mosaic packs the views of the local batch together, and SAM3's global attention mixes a
    # canvas: co-packed views differ between 1 x 4 and 2 x 2 samples. One view per canvas does not.
    cfg.teachers["sam3"].high_res_mode = "resize"
    cfg.fidelity.enabled = False
    # DAMP stays off here: its noise is independent per rank (as DAMP prescribes), so 2 ranks cannot
    # equal one process with it on (tests/test_train.py checks the per-rank noise).
    cfg.optim.accum_steps = 2  # and gradient accumulation (no_sync) is exercised too
    save_config(cfg, tmp_path / "cfg.toml")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "radio", "train",
           "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "ddp"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks 2" in proc.stdout

    train(cfg, progress=False, log=lambda *a: None)

    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for key in a:
            if key.startswith("loss") or key in ("lr", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    sa = load_checkpoint(latest_checkpoint(tmp_path / "single"))
    sb = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    for k in sa["ema"]:
        torch.testing.assert_close(sb["ema"][k], sa["ema"][k], rtol=1e-4, atol=1e-5)
    for name in sa["teachers"]:  # PHI-S statistics all-reduced to the global batch's
        torch.testing.assert_close(sb["teachers"][name]["normalizer"]["sum"], sa["teachers"][name]["normalizer"]["sum"])
    assert len(sb["rng"]["per_rank"]) == 2
