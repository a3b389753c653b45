"""Data parallel: 2 gloo processes under torchrun equal one process on the same global batch, with the
student's CPE augmentation on (per-sample uniforms from the data pipeline)."""

from __future__ import annotations

import sys
from pathlib import Path

from radio.train import save_config, train
from radio.train.checkpoint import latest_checkpoint, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from distributed_runs import assert_same_training, torchrun_train  # noqa: E402
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
    proc = torchrun_train("--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "ddp"))
    assert "ranks 2" in proc.stdout

    train(cfg, progress=False, log=lambda *a: None)
    # PHI-S statistics all-reduced to the global batch's running sum
    assert_same_training(tmp_path / "single", tmp_path / "ddp", [1, 2, 3], statistics={"normalizer": ["sum"]})
    sb = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert len(sb["rng"]["per_rank"]) == 2
