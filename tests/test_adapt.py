"""Cheap adaptation: student.freeze and LoRA (radio.model.lora, radio.train.adapt), and their export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radio import AdaptorSpec, RadioConfig, RadioModel
from radio.model.demo_checkpoint import write_demo_checkpoint
from radio.model.lora import LoRALinear, apply_lora, merge_lora, merge_lora_state_dict
from radio.train import TrainConfig, export_run, train
from radio.train.adapt import adapt_student
from radio.train.build import build_optimizer, build_student
from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.config import apply_overrides
from radio.train.damp import linear_weight_names
from radio.train.loop import INITIAL_WEIGHTS
from radio.train.teaching import build_teachers


def tiny_cfg(out, steps=3) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.out, cfg.run.steps, cfg.run.checkpoint_every = str(out), steps, 2
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.holdout = 2, 0, 2
    cfg.data.low_resolutions, cfg.data.high_resolutions, cfg.data.high_prob = [32, 48], [64], 0.5
    cfg.optim.warmup_steps = 1
    cfg.fidelity.resolution, cfg.fidelity.crops_per_image = 48, 1
    return cfg


def run_two_steps(cfg):
    """Two optimizer steps (fidelity on, so the initial weights are saved; the run stops before it)."""
    train(cfg, stop_after=2, progress=False, log=lambda *a: None)
    state = load_checkpoint(latest_checkpoint(cfg.run.out))
    return load_checkpoint(f"{cfg.run.out}/checkpoints/{INITIAL_WEIGHTS}"), state


def changed(initial: dict, after: dict) -> set[str]:
    return {k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, after[k])}


def test_lora_linear_starts_as_the_base_layer_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    lora = LoRALinear.from_linear(base, rank=2, alpha=3.0)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(lora(x), base(x))  # B = 0 at the start
    assert lora.weight is base.weight and not lora.weight.requires_grad and lora.lora_a.requires_grad
    with torch.no_grad():
        lora.lora_b.normal_()
    want = base(x) + 1.5 * (x @ lora.lora_a.T) @ lora.lora_b.T
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora.merged()(x), want)
    merged = merge_lora_state_dict({f"m.{k}": v for k, v in lora.state_dict().items()})
    assert set(merged) == {"m.weight", "m.bias"}
    torch.testing.assert_close(merged["m.weight"], lora.merged().weight)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(6, 5, True, rank=0, alpha=1.0)


def test_lora_keeps_base_names_for_damp_and_only_wraps_targets():
    torch.manual_seed(0)
    model = RadioModel(RadioConfig.preset("tiny"), [AdaptorSpec("t", 8, 8)])
    before = set(model.state_dict())
    names = apply_lora(model.blocks, 2, 4.0, ["qkv", "fc2"])
    assert names == [f"{i}.{n}" for i in range(4) for n in ("attn.qkv", "mlp.fc2")]
    after = set(model.state_dict())
    assert before < after and {k.rsplit(".", 1)[1] for k in after - before} == {"lora_a", "lora_b", "lora_scale"}
    assert "blocks.0.attn.qkv.weight" in linear_weight_names(model)  # DAMP still perturbs the base weight
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
        y = model.eval()(x)["t"].features
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(x)["t"].features, y, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(model.blocks, 2, 4.0, ["nothing"])


def test_freeze_backbone_trains_only_the_heads(tmp_path):
    cfg = apply_overrides(tiny_cfg(tmp_path / "run"), ["student.freeze=backbone"])
    initial, state = run_two_steps(cfg)
    moved = changed(initial, state["student"])
    assert moved and all(k.startswith("adaptors.") for k in moved)
    assert any(k.startswith("adaptors.sam3.feature_head") for k in moved)
    opt = state["optimizer"]  # AdamW state for the trainable tensors only (each moved in two steps)
    assert len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"]) == len(moved)
    assert torch.equal(state["ema"]["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])


def test_lora_on_a_released_model_trains_adapters_and_export_merges(tmp_path):
    path = write_demo_checkpoint(tmp_path / "c.pth.tar")
    cfg = apply_overrides(
        tiny_cfg(tmp_path / "run"),
        [
            f"student.init_from={path}",
            "student.freeze=backbone",
            "student.lora.rank=2",
            "student.lora.alpha=4",
            "student.lora.targets=['qkv', 'fc1']",
            "damp.sigma=0.05",  # DAMP perturbs the frozen base weights, the adapters still learn
        ],
    )
    initial, state = run_two_steps(cfg)
    moved = changed(initial, state["student"])
    backbone = {k for k in moved if not k.startswith("adaptors.")}
    assert backbone == {f"blocks.{i}.{n}.lora_{ab}" for i in range(4) for n in ("attn.qkv", "mlp.fc1") for ab in "ab"}
    opt = state["optimizer"]
    assert len(opt["state"]) == len(moved)

    # export merges the adapters: a plain model that equals the merged LoRA model
    export_run(cfg.run.out, tmp_path / "model")
    exported = RadioModel.from_pretrained(tmp_path / "model").eval()
    assert not any("lora" in k for k in exported.state_dict())
    spec = [AdaptorSpec.from_dict(a) for a in state["adaptors"]]
    lora_model = RadioModel(RadioConfig.from_dict(state["model_config"]), spec)
    adapt_student(lora_model, cfg.student)
    lora_model.load_state_dict(state["ema"])
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_lora = lora_model.eval()(x)
        merged = merge_lora(lora_model)
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(exported.state_dict()[k], v, rtol=0, atol=0, msg=k)
        y = exported(x)
    for name in y:
        torch.testing.assert_close(y[name].features, y_lora[name].features, atol=1e-5, rtol=1e-4)


def test_lora_without_freeze_trains_the_rest_of_the_backbone():
    cfg = apply_overrides(TrainConfig(), ["student.lora.rank=4", "student.lora.targets=['proj']"])
    torch.manual_seed(0)
    student = build_student(cfg, build_teachers(cfg, torch.device("cpu")))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.proj.lora_a" in trainable and "blocks.0.attn.proj.weight" not in trainable
    assert {"blocks.0.attn.qkv.weight", "blocks.0.norm1.weight", "cpe.pos_embed"} <= trainable
    optimizer = build_optimizer(student, cfg.optim)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    with pytest.raises(ValueError, match="student.lora.targets"):
        apply_overrides(cfg, ["student.lora.targets=['head']"])
    with pytest.raises(ValueError, match="student.freeze"):
        apply_overrides(cfg, ["student.freeze=all"])
