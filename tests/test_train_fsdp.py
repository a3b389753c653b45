"""FSDP2 (run.parallel = "fsdp"): the same training as DDP, sharded checkpoints (DCP) that resume exactly,
also at another world size, and that export.

Tolerances: 2 gloo ranks under FSDP against DDP, and a resume at another world size against the
uninterrupted run, agree to 1e-5 relative (float32 reductions in another order); a resume at the same
world size is bitwise equal.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from radio import RadioModel
from radio.train import export_run, load_run_config, save_config, train
from radio.train.checkpoint import list_checkpoints, load_latest_good
from radio.train.plots import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from distributed_runs import torchrun_train  # noqa: E402
from test_train import tiny_cfg  # noqa: E402

QUIET = {"progress": False, "log": lambda *a: None}


def _cfg(out, parallel):
    cfg = tiny_cfg(out, steps=3, batch_size=4)
    cfg.teachers["sam3"].high_res_mode = "resize"  # one view per canvas: ranks see what one process sees
    cfg.fidelity.enabled = False
    cfg.optim.accum_steps = 2  # gradient sync on the last micro-batch only
    cfg.run.parallel = parallel
    return cfg


def _losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl")]


def _resume_here(run):
    cfg = load_run_config(run)
    cfg.run.out = str(run)
    train(cfg, resume=True, **QUIET)


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_ddp_and_resumes_at_any_world_size(tmp_path):
    for parallel in ("ddp", "fsdp"):
        save_config(_cfg(tmp_path / parallel, parallel), tmp_path / f"{parallel}.toml")
        torchrun_train("--config", str(tmp_path / f"{parallel}.toml"), "--out", str(tmp_path / parallel))
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert [s for s, *_ in fsdp] == [1, 2, 3]
    for a, b in zip(ddp, fsdp):
        assert b[1] == pytest.approx(a[1], rel=1e-5) and b[2] == pytest.approx(a[2], rel=1e-5), a[0]
    # sharded checkpoints: one DCP directory per step, a shard file per rank, hashed
    _, path = list_checkpoints(tmp_path / "fsdp")[-1]
    assert path.is_dir() and {p.name for p in path.iterdir()} >= {"meta.pt", "manifest.sha256.json", "__1_0.distcp"}
    # radio export gathers the shards in one process; the EMA equals DDP's
    export_run(tmp_path / "fsdp", tmp_path / "m-fsdp", log=lambda *a: None)
    export_run(tmp_path / "ddp", tmp_path / "m-ddp", log=lambda *a: None)
    a, b = RadioModel.from_pretrained(tmp_path / "m-ddp"), RadioModel.from_pretrained(tmp_path / "m-fsdp")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6, msg=k)

    # stop after step 2 (as a kill between checkpoints would), then resume: on 2 ranks and on 1 process
    part = tmp_path / "part"
    torchrun_train("--config", str(tmp_path / "fsdp.toml"), "--out", str(part), "--stop-after", "2")
    shutil.copytree(part, tmp_path / "part-1")
    torchrun_train("--resume", str(part))
    assert _losses(part) == fsdp  # same world size: bitwise
    _resume_here(tmp_path / "part-1")  # another world size: DCP reshards
    for a, b in zip(fsdp, _losses(tmp_path / "part-1")):
        assert b[1] == pytest.approx(a[1], rel=1e-5), a[0]


def test_fsdp_in_one_process_checkpoints_resumes_and_falls_back(tmp_path):
    """One process with run.parallel = "fsdp" writes the same sharded format (resumable on N ranks)."""
    full = _cfg(tmp_path / "full", "fsdp")
    train(full, **QUIET)
    part = _cfg(tmp_path / "part", "fsdp")
    part.run.checkpoint_every = 1
    train(part, stop_after=2, **QUIET)
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [1, 2]
    # damage the newest shard file: resume falls back to step 1 and still ends equal
    shard = tmp_path / "part" / "checkpoints" / "step_00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    logs = []
    path, _ = load_latest_good(tmp_path / "part", log=logs.append)
    assert path.name == "step_00000001" and "does not match its SHA-256" in logs[0]
    _resume_here(tmp_path / "part")
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    # a run cannot switch between replicated and sharded checkpoints on resume
    cfg = load_run_config(tmp_path / "part")
    cfg.run.out, cfg.run.parallel, cfg.run.steps = str(tmp_path / "part"), "ddp", 4
    with pytest.raises(ValueError, match="trained with 'fsdp'"):
        train(cfg, resume=True, **QUIET)
