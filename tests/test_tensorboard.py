"""metrics.jsonl's per-step time split; ``run.tensorboard = true``: its records as TensorBoard scalars, also
across a resume; a missing tensorboard package is a config error before any run directory exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from radio.train import load_run_config, train
from radio.train.checkpoint import latest_checkpoint
from radio.train.plots import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_cfg  # noqa: E402


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_logs_the_metrics_and_purges_them_on_resume(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", steps=3)
    cfg.fidelity.enabled = False
    cfg.run.tensorboard = True
    train(cfg, progress=False, log=lambda *a: None)  # checkpoints at steps 2 and 3
    assert [s for s, _ in _scalars(tmp_path / "run", "loss")] == [1, 2, 3]
    latest_checkpoint(tmp_path / "run").unlink()  # as if the run died after logging step 3
    resumed = load_run_config(tmp_path / "run")
    resumed.run.out = str(tmp_path / "run")
    # resumed from step 2, step 3 is logged again: TensorBoard keeps it once, like metrics.jsonl
    train(resumed, resume=True, progress=False, log=lambda *a: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for r in records:  # the step's time split: every section measured, together within the step's time
        split = [r[f"time/{k}"] for k in ("data", "teachers", "student", "losses_optimizer")]
        assert all(t > 0 for t in split), r
        assert sum(split) <= cfg.data.batch_size / r["images_per_s"]  # the step's wall time
    for tag in ("loss", "loss/dinov3/spatial", "lr", "grad_norm", "images_per_s", "time/teachers"):
        logged = _scalars(tmp_path / "run", tag)
        assert [s for s, _ in logged] == [1, 2, 3], tag
        assert [v for _, v in logged] == pytest.approx([r[tag] for r in records], rel=1e-6), tag


def test_missing_tensorboard_is_a_config_error_before_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    cfg = tiny_cfg(tmp_path / "run", steps=1)
    cfg.run.tensorboard = True
    with pytest.raises(ValueError, match=r"run.tensorboard = true needs the tensorboard package"):
        train(cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    cfg.run.tensorboard = False
    cfg.validate()


def test_step_timer_sections_and_averages():
    from radio.train.timing import StepTimer

    timer = StepTimer("cpu")
    for _ in range(2):
        with timer("teachers"):
            sum(range(10_000))
        timer.step()
    times = timer.pop()
    assert set(times) == {"time/data", "time/teachers", "time/student", "time/losses_optimizer"}
    assert times["time/teachers"] > 0 and times["time/data"] == 0
    assert timer.pop()["time/teachers"] == 0  # pop starts over
    with pytest.raises(ValueError, match="section must be one of"):
        with timer("backward"):
            pass
