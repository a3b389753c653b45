"""Continued distillation from released weights: ``student.init_from`` (radio.train.init_from)."""

from __future__ import annotations

import os

import pytest
import torch

from radio import AdaptorSpec, RadioConfig, RadioModel
from radio.model.demo_checkpoint import write_demo_checkpoint
from radio.train import TrainConfig, train
from radio.train.build import build_student
from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.loop import INITIAL_WEIGHTS, load_run_config
from radio.train.teaching import build_teachers


def tiny_cfg(out, init_from, steps=2) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.out, cfg.run.steps, cfg.run.checkpoint_every = str(out), steps, steps
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.holdout = 2, 0, 2
    cfg.data.low_resolutions, cfg.data.high_resolutions, cfg.data.high_prob = [32, 48], [64], 0.5
    cfg.optim.warmup_steps = 1
    cfg.fidelity.resolution, cfg.fidelity.crops_per_image = 48, 1
    cfg.student.init_from = str(init_from)
    return cfg


def same_outputs(a: RadioModel, b: RadioModel, names, hw=(48, 64)):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    for name in names:
        torch.testing.assert_close(ya[name].features, yb[name].features, rtol=0, atol=0, msg=name)
        if yb[name].summary is not None:
            torch.testing.assert_close(ya[name].summary, yb[name].summary, rtol=0, atol=0, msg=name)


def test_run_starts_from_the_released_checkpoint(tmp_path):
    """radio train with student.init_from=<official file>: at step 0 the student computes what
    from_radio_checkpoint does (backbone, matching heads, feature normaliser); sam3 gets a new head on
    a register turned CLS token; the EMA starts from the same weights; config.toml records the source."""
    path = write_demo_checkpoint(tmp_path / "tiny-c-radio.pth.tar")
    cfg = tiny_cfg(tmp_path / "run", os.path.relpath(path), steps=2)
    train(cfg, stop_after=1, progress=False, log=lambda *a: None)
    run = tmp_path / "run"
    state = load_checkpoint(latest_checkpoint(run))
    student = RadioModel(
        RadioConfig.from_dict(state["model_config"]), [AdaptorSpec.from_dict(a) for a in state["adaptors"]]
    )
    student.load_state_dict(load_checkpoint(run / "checkpoints" / INITIAL_WEIGHTS))
    official = RadioModel.from_radio_checkpoint(path)
    assert official.config.feature_normalizer
    same_outputs(student, official, ["backbone", "siglip2", "dinov3"])
    assert (student.config.num_cls_tokens, student.config.num_registers) == (3, 7)
    assert {s.name: s.cls_index for s in student.adaptor_specs} == {"siglip2": 0, "dinov3": 1, "sam3": 2}
    assert torch.equal(student.prefix_tokens, official.prefix_tokens)
    assert load_run_config(run).student.init_from == os.path.abspath(path)

    # EMA after one step = decay * initial + (1 - decay) * student: it started from the loaded weights
    decay = cfg.loss.ema_decay
    initial = student.state_dict()
    for name in ("blocks.0.attn.qkv.weight", "adaptors.siglip2.summary_head.fc1.weight"):
        want = decay * initial[name] + (1 - decay) * state["student"][name]
        torch.testing.assert_close(state["ema"][name], want)
    # the feature normaliser is kept as it is (a buffer, not trained)
    assert torch.equal(state["student"]["feature_norm.tx"], official.feature_norm.tx)


def test_folders_go_through_from_pretrained_and_heads_map(tmp_path, monkeypatch):
    official = RadioModel.from_radio_checkpoint(write_demo_checkpoint(tmp_path / "c.pth.tar"))
    official.save_pretrained(tmp_path / "folder")
    calls = []
    original = RadioModel.from_pretrained.__func__
    monkeypatch.setattr(RadioModel, "from_pretrained", classmethod(lambda cls, p: calls.append(p) or original(cls, p)))

    cfg = tiny_cfg(tmp_path / "run", tmp_path / "folder")
    cfg.teachers["sam3"].init_head = "dinov3"  # no summary loss: the summary head is dropped
    cfg.teachers["dinov3"].init_head = ""  # a new head
    torch.manual_seed(0)
    slots = build_teachers(cfg, torch.device("cpu"))
    student = build_student(cfg, slots)
    assert calls == [str(tmp_path / "folder")]
    same_outputs(student, official, ["backbone", "siglip2"])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        got, want = student.eval()(x), official(x)
    assert got["sam3"].summary is None
    torch.testing.assert_close(got["sam3"].features, want["dinov3"].features, rtol=0, atol=0)
    assert not torch.allclose(got["dinov3"].features, want["dinov3"].features)
    assert {s.name: s.cls_index for s in student.adaptor_specs} == {"siglip2": 0, "dinov3": 2, "sam3": 1}

    cfg.teachers["sam3"].init_head = "clip"
    with pytest.raises(ValueError, match=r"teachers.sam3.init_head='clip'"):
        build_student(cfg, slots)
    cfg.teachers["sam3"].init_head = None
    cfg.student.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        build_student(cfg, slots)


def test_head_width_mismatch_is_a_clear_error(tmp_path):
    path = write_demo_checkpoint(tmp_path / "c.pth.tar", teachers=[("siglip2", 32, 32), ("dinov3", 16, 24)])
    cfg = tiny_cfg(tmp_path / "run", path)
    slots = build_teachers(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"teachers.dinov3: source head 'dinov3' emits 24 feature channels"):
        build_student(cfg, slots)
    cfg.teachers["dinov3"].init_head = ""
    assert [s.name for s in build_student(cfg, slots).adaptor_specs] == ["siglip2", "dinov3", "sam3"]


def test_student_model_overrides_apply_to_the_loaded_architecture(tmp_path):
    path = write_demo_checkpoint(tmp_path / "c.pth.tar")
    cfg = tiny_cfg(tmp_path / "run", path)
    cfg.student.model = {"window_size": 2, "vitdet_prefix": "global"}
    slots = build_teachers(cfg, torch.device("cpu"))
    student = build_student(cfg, slots)
    assert (student.config.window_size, student.config.vitdet_prefix, student.config.embed_dim) == (2, "global", 48)
    cfg.student.model = {"mlp_dim": 64}
    with pytest.raises(ValueError, match=r"student.init_from: the weights do not fit the student"):
        build_student(cfg, slots)
