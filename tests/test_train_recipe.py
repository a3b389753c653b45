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
from distributed_runs import assert_same_training, torchrun_train  # noqa: E402
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


def test_rank_mode_sampler_gives_each_group_its_partition_and_batch():
    from radio.train.data import StepSampler

    def sampler(rank, world, **kw):
        return StepSampler(20, 4, [32, 48], [64], 0.25, seed=1, start=0, stop=3, rank=rank, world_size=world,
                           partition_mode="rank", high_batch_size=2, **kw)  # fmt: skip

    one = list(sampler(0, 1))
    assert [s[0].partition for s in one] == ["low", "high"] * 3  # one process: low then high, every micro-step
    assert [len(s) for s in one] == [4, 2] * 3
    # 4 ranks at high_prob 0.25: rank 3 trains high, ranks 0-2 share the low batch ... which must divide
    with pytest.raises(ValueError, match="data.batch_size=4 must be divisible by the 3"):
        sampler(0, 4)
    ranks = [list(sampler(r, 4, high_ranks=2)) for r in range(4)]  # 2 low ranks, 2 high ranks
    for m in range(3):
        low = [s for r in (0, 1) for s in ranks[r][m]]
        high = [s for r in (2, 3) for s in ranks[r][m]]
        assert {s.partition for s in low} == {"low"} and {s.partition for s in high} == {"high"}
        assert low + high == one[2 * m] + one[2 * m + 1]  # the same samples as one process, split by group
    # resuming at micro-step 2 gives the same samples
    assert list(sampler(0, 1))[4:] == list(
        StepSampler(20, 4, [32, 48], [64], 0.25, seed=1, start=2, stop=3, partition_mode="rank", high_batch_size=2)
    )


def _rank_cfg(out, steps):
    cfg = tiny_cfg(out, steps=steps)
    cfg.data.partition_mode = "rank"
    cfg.data.batch_size, cfg.data.high_batch_size, cfg.data.high_prob = 2, 1, 0.25
    cfg.fidelity.enabled = False
    return cfg


def test_rank_mode_resumes_exactly_and_weights_the_partitions(tmp_path):
    """One process: a stopped rank-mode run resumes exactly; and step 1 (before any update, the same
    samples at every p = data.high_prob) logs (1 - p) L_low + p L_high with L_low, L_high independent of p."""
    train(_rank_cfg(tmp_path / "full", 4), progress=False, log=_quiet)
    train(_rank_cfg(tmp_path / "part", 4), stop_after=2, progress=False, log=_quiet)
    resumed = load_run_config(tmp_path / "part")
    resumed.run.out = str(tmp_path / "part")
    train(resumed, resume=True, progress=False, log=_quiet)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-6), (ra["step"], k)

    losses = {0.25: a[0]["loss"]}
    for p in (0.5, 0.75):
        cfg = _rank_cfg(tmp_path / f"p{p}", 1)
        cfg.data.high_prob = p
        train(cfg, progress=False, log=_quiet)
        losses[p] = _losses(tmp_path / f"p{p}")[0]["loss"]
    slope = (losses[0.75] - losses[0.25]) / 0.5  # L_high - L_low
    low = losses[0.25] - 0.25 * slope
    assert losses[0.5] == pytest.approx(low + 0.5 * slope, rel=1e-6)
    assert abs(slope) > 1e-3 * abs(low)  # the partitions' losses differ, so p matters


def test_rank_groups_on_two_gloo_ranks_equal_one_process_alternating(tmp_path):
    """Rank 0 trains the low partition, rank 1 the high one, in the same steps: the losses, the EMA and the
    teacher statistics equal one process running both sub-batches in turn (with ViTDet-mode training on)."""
    from radio.train import save_config

    cfg = _rank_cfg(tmp_path / "single", 3)
    cfg.optim.accum_steps = 2
    cfg.student.vitdet_train = VitdetTrainConfig(prob=0.5, window_sizes=[2])
    save_config(cfg, tmp_path / "cfg.toml")
    torchrun_train("--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "ddp"))
    train(cfg, progress=False, log=_quiet)
    assert_same_training(tmp_path / "single", tmp_path / "ddp", [1, 2, 3])


def test_c_radiov4_preset_is_the_recipe():
    from radio.model import RadioConfig
    from radio.train.config import DAMP_SIGMA

    cfg = TrainConfig.preset("c-radiov4")
    model = RadioConfig.preset(cfg.student.preset, **cfg.student.model)
    assert model.final_norm is False and model.window_size is None  # as released; windows only in training
    assert cfg.damp.sigma == DAMP_SIGMA > 0
    v = cfg.student.vitdet_train
    assert v.prob > 0 and v.prefix_mode == "replicate" and v.window_sizes == [8, 16]
    assert cfg.data.partition_mode == "rank" and 0 < cfg.data.high_batch_size < cfg.data.batch_size
    assert (cfg.optim.warmup_steps, cfg.loss.ema_decay, cfg.data.high_prob) == (5000, 0.9996, 0.25)
    # every resolution of both partitions is a multiple of the (global) student's step: trainable
    assert all(r % model.patch_size == 0 for r in cfg.data.low_resolutions + cfg.data.high_resolutions)
