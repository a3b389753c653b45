"""high_res_mode="featsharp" in the trainer: config, the c-radiov4 preset's missing file, targets, a CPU run."""

from __future__ import annotations

import pytest
import torch

from radio.train import TrainConfig, train
from radio.train.config import FEATSHARP_SIGLIP2, apply_overrides
from radio.train.plots import read_metrics
from radio.train.teaching import build_teachers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def upsampler_dir(tmp_path_factory):
    """A factor-2 upsampler for the tiny SigLIP2 teacher (seed 0, as the trainer's default), 3 steps."""
    from radio.teachers.featsharp.training import FeatSharpTrainConfig, train_featsharp

    out = tmp_path_factory.mktemp("featsharp")
    cfg = FeatSharpTrainConfig(factor=2, steps=3, batch_size=2, checkpoint_every=3, warmup_steps=1, out=str(out))
    train_featsharp(cfg, progress=False, log=lambda *_: None)
    return out


def _cfg(out, upsampler_dir, steps=3) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.out, cfg.run.steps, cfg.run.checkpoint_every = str(out), steps, steps
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.holdout = 2, 0, 2
    cfg.data.low_resolutions, cfg.data.high_resolutions, cfg.data.high_prob = [32], [64, 128], 1.0
    cfg.optim.warmup_steps = 1
    cfg.fidelity.resolution, cfg.fidelity.crops_per_image = 48, 1
    return apply_overrides(
        cfg, ["teachers.siglip2.high_res_mode=featsharp", f'teachers.siglip2.featsharp="{upsampler_dir}"']
    )


def test_config_checks():
    with pytest.raises(ValueError, match=r"teachers\.siglip2\.featsharp = DIR"):
        apply_overrides(TrainConfig(), ["teachers.siglip2.high_res_mode=featsharp"])
    with pytest.raises(ValueError, match="not sam3"):
        apply_overrides(TrainConfig(), ["teachers.sam3.high_res_mode=featsharp", "teachers.sam3.featsharp=x"])
    # The tiny demo: its highest resolution (128 px) over the tiny teacher's 64 px native -> factor 2.
    cfg = apply_overrides(
        TrainConfig(), ["teachers.siglip2.high_res_mode=featsharp", "teachers.siglip2.featsharp=nope"]
    )
    with pytest.raises(ValueError, match="radio featsharp train --teacher siglip2 --factor 2 --out nope"):
        build_teachers(cfg, torch.device("cpu"))


def test_c_radiov4_names_the_missing_file_and_the_command(tmp_path, monkeypatch):
    cfg = TrainConfig.preset("c-radiov4")
    assert cfg.teachers["siglip2"].high_res_mode == "featsharp"
    assert cfg.teachers["siglip2"].featsharp == FEATSHARP_SIGLIP2
    monkeypatch.chdir(tmp_path)  # the preset's relative folder does not exist here
    with pytest.raises(ValueError) as err:
        build_teachers(cfg, torch.device("cpu"))  # raises before loading (downloading) any teacher
    msg = str(err.value)
    assert f"teachers.siglip2.featsharp = '{FEATSHARP_SIGLIP2}'" in msg
    assert f"{FEATSHARP_SIGLIP2}/featsharp.pt" in msg
    assert (
        "radio featsharp train --teacher siglip2 --name-or-path google/siglip2-giant-opt-patch16-384 "
        f"--dtype bfloat16 --factor 3 --image-dir /path/to/images --out {FEATSHARP_SIGLIP2}" in msg
    )
    assert "high_res_mode=tile" in msg


def test_upsampler_of_another_teacher_is_refused(tmp_path, upsampler_dir):
    cfg = apply_overrides(
        _cfg(tmp_path, upsampler_dir),
        ["teachers.dinov3.high_res_mode=featsharp", f'teachers.dinov3.featsharp="{upsampler_dir}"'],
    )
    with pytest.raises(ValueError, match=r"teachers\.dinov3\.featsharp: .*trained for teacher"):
        build_teachers(cfg, torch.device("cpu"))


def test_featsharp_targets_share_the_tile_geometry(tmp_path, upsampler_dir):
    """Same canvas geometry and summary as stitched tiles; features from the upsampler."""
    from radio.train.build import build_student
    from radio.train.data import ImageSource, SampleSpec, ViewDataset, collate
    from radio.train.step import teacher_targets
    from radio.train.teaching import plan_all_views

    cfg = _cfg(tmp_path, upsampler_dir)
    slots = build_teachers(cfg, torch.device("cpu"))
    assert slots["siglip2"].upsampler is not None and slots["dinov3"].upsampler is None
    student = build_student(cfg, slots)
    plans, geometry = plan_all_views(cfg, slots, student.patch_size, student.min_resolution_step)
    tile_cfg = apply_overrides(cfg, ["teachers.siglip2.high_res_mode=tile"])
    tile_slots = build_teachers(tile_cfg, torch.device("cpu"))
    tile_plans, tile_geometry = plan_all_views(tile_cfg, tile_slots, student.patch_size, student.min_resolution_step)
    assert plans[("low", 32)]["siglip2"].mode == "plain"
    for res in (64, 128):
        fs, tile = plans[("high", res)]["siglip2"], tile_plans[("high", res)]["siglip2"]
        assert fs.mode == "featsharp" and tile.mode == "tile"
        assert (fs.tokens, fs.crop, fs.margin, fs.region) == (tile.tokens, tile.crop, tile.margin, tile.region)
        assert geometry[("high", res)] == tile_geometry[("high", res)]
        assert fs.input_size == 2 * 64  # factor 2 x the tiny teacher's native 64 px
        d = cfg.data
        dataset = ViewDataset(ImageSource.from_config(None), geometry, 16, 0, d.crop_scale, 0.5, 1, 32)
        batch = collate([dataset[SampleSpec(i, res, "high", 0, i)] for i in range(2)])
        a = teacher_targets(batch, slots, plans[("high", res)], 16, "cpu")["siglip2"]
        b = teacher_targets(batch, tile_slots, tile_plans[("high", res)], 16, "cpu")["siglip2"]
        assert a.raw.shape == b.raw.shape == (2, fs.tokens, fs.tokens, 32)
        torch.testing.assert_close(a.summary, b.summary)
        assert torch.isfinite(a.raw).all() and not torch.allclose(a.raw, b.raw)


def test_radio_train_end_to_end_with_featsharp(tmp_path, upsampler_dir):
    cfg = _cfg(tmp_path / "run", upsampler_dir)
    result = train(cfg, progress=False, log=lambda *a: None)
    assert result["step"] == 3
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["loss/siglip2/spatial"] > 0 and r["loss"] == r["loss"]
