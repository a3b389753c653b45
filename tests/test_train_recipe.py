"""The recipe's training options: ViTDet-mode training (student.vitdet_train) and resolution partitions
trained in every step (data.partition_mode = "rank"): determinism, resume exactness, fidelity output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from radio.train import TrainConfig, load_run_config, train
from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.config import VitdetTrainConfig, apply_overrides
from radio.train.vitdet_train import vitdet_window

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _losses, tiny_cfg  # noqa: E402


def _quiet(*args):
    pass


def test_vitdet_window_is_a_deterministic_draw_per_micro_step():
    cfg = VitdetTrainConfig(prob=0.3, window_sizes=[2, 3])
    draws = [vitdet_window(cfg, 7, m) for m in range(2000)]
    assert draws == [vitdet_window(cfg, 7, m) for m in range(2000)]  # a pure function of (seed, m)
    windowed = [w for w in draws if w is not None]
    assert abs(len(windowed) / len(draws) - 0.3) < 0.04
    assert set(windowed) == {2, 3}
    assert draws != [vitdet_window(cfg, 8, m) for m in range(2000)]  # the seed matters
    assert vitdet_window(VitdetTrainConfig(prob=0.0, window_sizes=[2]), 7, 0) is None
    assert all(vitdet_window(VitdetTrainConfig(prob=1.0, window_sizes=[4]), 7, m) == 4 for m in range(50))


def test_vitdet_train_keys_are_validated():
    cfg = apply_overrides(TrainConfig(), ["student.vitdet_train.prob=0.5", "student.vitdet_train.window_sizes=[2]"])
    assert cfg.student.vitdet_train.prob == 0.5 and cfg.student.vitdet_train.window_sizes == [2]
    with pytest.raises(ValueError, match="window_sizes"):
        apply_overrides(TrainConfig(), ["student.vitdet_train.prob=0.5"])
    with pytest.raises(ValueError, match="prefix_mode"):
        apply_overrides(TrainConfig(), ["student.vitdet_train.prefix_mode=bogus"])
    with pytest.raises(ValueError, match="prob"):
        apply_overrides(TrainConfig(), ["student.vitdet_train.prob=1.5"])
    with pytest.raises(ValueError, match="exclude"):
        apply_overrides(TrainConfig(), ["student.vitdet_train.window_sizes=[2]", "student.model.window_size=2"])
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["student.vitdet_train.bogus=1"])


def _vitdet_cfg(out, steps, prob):
    cfg = tiny_cfg(out, steps=steps)
    # 32, 48, 64 px at patch 16: 2, 3 and 4 tokens a side; windows of 2 pad the 3 x 3 grid to 4 x 4.
    cfg.student.vitdet_train = VitdetTrainConfig(prob=prob, window_sizes=[2], prefix_mode="replicate")
    return cfg


def test_vitdet_training_resumes_exactly_and_reports_windowed_fidelity(tmp_path):
    full = _vitdet_cfg(tmp_path / "full", 4, prob=0.5)
    windows = [vitdet_window(full.student.vitdet_train, full.run.seed, m) for m in range(4)]
    assert None in windows and 2 in windows  # both kinds of micro-batch in this run
    train(full, progress=False, log=_quiet)
    report = json.loads((tmp_path / "full" / "fidelity.json").read_text())
    assert report["windowed"]["window_size"] == 2 and report["windowed"]["prefix_mode"] == "replicate"
    for name, t in report["windowed"]["teachers"].items():
        assert -1 <= t["after"]["spatial"] <= 1
        # windowed and global inference measure different things
        assert t["after"]["spatial"] != report["teachers"][name]["after"]["spatial"]

    part = _vitdet_cfg(tmp_path / "part", 4, prob=0.5)
    part.fidelity.enabled = False
    train(part, stop_after=2, progress=False, log=_quiet)
    resumed = load_run_config(tmp_path / "part")
    resumed.run.out = str(tmp_path / "part")
    train(resumed, resume=True, progress=False, log=_quiet)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-6), (ra["step"], k)

    glob = _vitdet_cfg(tmp_path / "global", 4, prob=0.0)
    glob.fidelity.enabled = False
    train(glob, progress=False, log=_quiet)
    g = _losses(tmp_path / "global")
    first_windowed = windows.index(2)
    for m in range(first_windowed):  # identical until the first windowed micro-batch ...
        assert g[m]["loss"] == pytest.approx(a[m]["loss"], rel=1e-6)
    assert g[first_windowed]["loss"] != pytest.approx(a[first_windowed]["loss"], rel=1e-5)  # ... then not
    ca = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    cb = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    for k in ca["student"]:
        torch.testing.assert_close(cb["student"][k], ca["student"][k], rtol=1e-6, atol=1e-6)
