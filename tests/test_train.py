"""The trainer end to end on tiny everything: run directory, resume equality, checkpoints, DAMP, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from radio import RadioModel
from radio.train import TrainConfig, export_run, train
from radio.train.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from radio.train.damp import damp_forward, damp_sigma, linear_weight_names
from radio.train.plots import read_metrics


def tiny_cfg(out, steps=4, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.out = str(out)
    cfg.run.steps = steps
    cfg.run.checkpoint_every = 2
    cfg.run.keep_last = 2
    cfg.data.batch_size = 2
    cfg.data.num_workers = 0
    cfg.data.holdout = 2
    cfg.data.low_resolutions = [32, 48]
    cfg.data.high_resolutions = [64]
    cfg.data.high_prob = 0.5
    cfg.optim.warmup_steps = 1
    cfg.fidelity.resolution = 48
    cfg.fidelity.crops_per_image = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _losses(run_dir):
    return [
        {k: v for k, v in r.items() if k.startswith("loss") or k in ("step", "lr")}
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def test_end_to_end_run_writes_the_run_directory(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", steps=4, num_workers=1)
    cfg.damp.sigma = 0.05
    result = train(cfg, progress=False, log=lambda *a: None)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "loss.png", "fidelity.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        per_teacher = [f"loss/{t}/{term}" for t in ("siglip2", "dinov3", "sam3") for term in ("spatial", "summary")]
        for key in ("loss", "lr", "loss/mesa", *per_teacher):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert r["loss/sam3/summary"] == 0.0  # SAM3 has no summary
        assert r["loss"] > 0
    assert records[0]["damp_sigma"] == pytest.approx(0.05) and records[-1]["damp_sigma"] < 0.05
    # keep_last=2 with checkpoints at steps 2 and 4
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    fidelity = json.loads((run / "fidelity.json").read_text())
    assert set(fidelity["teachers"]) == {"siglip2", "dinov3", "sam3"}
    for scores in fidelity["teachers"].values():
        assert -1 <= scores["before"]["spatial"] <= 1 and -1 <= scores["after"]["spatial"] <= 1
    assert result["fidelity"] == fidelity and result["step"] == 4


def test_stop_and_resume_logs_the_same_losses(tmp_path):
    """A run stopped after step 3 and resumed equals an uninterrupted run (CPU, to 1e-6)."""
    full = tiny_cfg(tmp_path / "full", steps=6)
    full.fidelity.enabled = False
    train(full, progress=False, log=lambda *a: None)

    part = tiny_cfg(tmp_path / "part", steps=6)
    part.fidelity.enabled = False
    first = train(part, stop_after=3, progress=False, log=lambda *a: None)
    assert first["step"] == 3 and latest_checkpoint(tmp_path / "part").name == "step_00000003.pt"
    # a resumed run reads the run's own config.toml, as `radio train --resume DIR` does
    from radio.train import load_run_config

    resumed_cfg = load_run_config(tmp_path / "part")
    resumed_cfg.run.out = str(tmp_path / "part")
    train(resumed_cfg, resume=True, progress=False, log=lambda *a: None)

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-6), (ra["step"], k)
    ca = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    cb = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    for k in ca["ema"]:
        torch.testing.assert_close(ca["ema"][k], cb["ema"][k], rtol=1e-6, atol=1e-6)


def test_resume_with_another_rank_count_continues_the_damp_stream(tmp_path):
    """A checkpoint written by a 2-rank run, resumed by 1 process, keeps DAMP's noise stream going."""
    from radio.train import load_run_config

    def cfg_for(name):
        cfg = tiny_cfg(tmp_path / name, steps=4)
        cfg.fidelity.enabled = False
        cfg.damp.sigma = 0.2
        return cfg

    train(cfg_for("full"), progress=False, log=lambda *a: None)
    train(cfg_for("part"), stop_after=2, progress=False, log=lambda *a: None)
    path = latest_checkpoint(tmp_path / "part")
    state = load_checkpoint(path)
    state["rng"]["per_rank"] = state["rng"]["per_rank"] * 2  # as if two ranks had saved it
    atomic_save(state, path)  # rewritten with its digest, as the trainer would
    logs = []
    resumed = load_run_config(tmp_path / "part")
    resumed.run.out = str(tmp_path / "part")
    train(resumed, resume=True, progress=False, log=logs.append)
    assert any("DAMP stream continued" in line for line in logs)
    for ra, rb in zip(_losses(tmp_path / "full"), _losses(tmp_path / "part")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), ra["step"]


def test_export_round_trip(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", steps=2)
    cfg.fidelity.enabled = False
    train(cfg, progress=False, log=lambda *a: None)
    export_run(tmp_path / "run", tmp_path / "model")
    model = RadioModel.from_pretrained(tmp_path / "model")
    ema = load_checkpoint(latest_checkpoint(tmp_path / "run"))["ema"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    out = model.eval()(torch.rand(1, 3, 32, 48))
    assert set(out) == {"backbone", "siglip2", "dinov3", "sam3"}
    assert out["sam3"].summary is None and out["dinov3"].summary.shape == (1, 32)
    # the teachers' PHI-S transforms travel with the model: inverse() maps adaptor outputs back
    from radio.normalize import PHISNormalizer, load_normalizers

    phis = load_normalizers(tmp_path / "model")
    assert set(phis) == {"siglip2", "dinov3", "sam3"}
    trained = PHISNormalizer(32)
    trained.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path / "run"))["teachers"]["dinov3"]["normalizer"])
    y = torch.randn(5, 32)
    torch.testing.assert_close(phis["dinov3"].inverse(y), trained.inverse(y))
    torch.testing.assert_close(phis["dinov3"](phis["dinov3"].inverse(y)), y)
    with pytest.raises(ValueError, match="no checkpoint found"):
        export_run(tmp_path / "nowhere", tmp_path / "model2")
    with pytest.raises(ValueError, match="teacher_normalizers"):
        load_normalizers(tmp_path / "nowhere")


def test_a_fresh_run_never_overwrites_an_existing_one(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", steps=1)
    cfg.fidelity.enabled = False
    assert train(cfg, progress=False, log=lambda *a: None)["run_dir"] == str(tmp_path / "run")
    cfg = tiny_cfg(tmp_path / "run", steps=1)
    cfg.fidelity.enabled = False
    assert train(cfg, progress=False, log=lambda *a: None)["run_dir"] == str(tmp_path / "run-1")
    with pytest.raises(ValueError, match="no checkpoint found"):
        cfg = tiny_cfg(tmp_path / "empty", steps=1)
        train(cfg, resume=True, progress=False)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 5, {}, keep_last=0)


_WRITER = """
import sys, torch
from radio.train.checkpoint import save_checkpoint
step = 0
big = torch.randn(2_000_000)
while True:
    step += 1
    save_checkpoint(sys.argv[1], step, {"step": step, "base": big, "payload": big + step}, keep_last=2)
    print(step, flush=True)
"""


def test_a_killed_writer_leaves_a_loadable_latest_checkpoint(tmp_path):
    """SIGKILL a process in the middle of its checkpoint loop: the newest step_*.pt still loads."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # at least one checkpoint exists
    while int(proc.stdout.readline()) < 4:  # let it save a few more, then kill it mid-loop
        pass
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] >= 4 and state["payload"].shape == (2_000_000,)
    torch.testing.assert_close(state["payload"] - state["base"], torch.full((2_000_000,), float(state["step"])))
    assert len(list_checkpoints(run)) <= 3  # keep_last=2, plus one if killed between save and pruning


# ----------------------------------------------------------------------------------------------
# DAMP
# ----------------------------------------------------------------------------------------------


def _model():
    from radio import RadioConfig

    torch.manual_seed(0)
    return RadioModel(RadioConfig.preset("tiny", pos_dropout=0.0)).eval()


def test_damp_sigma_zero_is_a_bitwise_no_op():
    model = _model()
    names = linear_weight_names(model)
    assert len(names) >= 4 * 4  # qkv, proj, fc1, fc2 per block (+ patch embed)
    x = torch.rand(2, 3, 32, 32)
    plain = model(x).features
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gen = torch.Generator().manual_seed(0)
    damped = damp_forward(model, names, 0.0, gen, x).features
    damped.sum().backward()
    assert torch.equal(plain, damped)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # no draws


def test_damp_applies_multiplicative_noise_and_leaves_weights_untouched():
    model = _model().train()  # DAMP acts in training mode only
    names = linear_weight_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, u = torch.rand(2, 3, 32, 32), torch.rand(2, 5)
    plain = model(x, cpe_uniforms=u).features
    noisy = damp_forward(model, names, 0.1, torch.Generator().manual_seed(1), x, cpe_uniforms=u).features
    assert not torch.allclose(plain, noisy)
    # gradient through W~ = W * (1 + sigma * eps) reaches the stored weights
    noisy.square().mean().backward()
    assert all(dict(model.named_parameters())[n].grad is not None for n in names)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same generator state gives the same noise (reproducible, resumable)
    again = damp_forward(model, names, 0.1, torch.Generator().manual_seed(1), x, cpe_uniforms=u).features
    assert torch.equal(noisy, again)
    # the product law on one weight: W~ = W (1 + sigma eps), eps from the layer's own counter-based seed
    from radio.train.damp import _mix

    lin = torch.nn.Linear(3, 2, bias=False)
    y = damp_forward(lin, ["weight"], 0.5, torch.Generator().manual_seed(5), torch.eye(3), rank=3)
    draw = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    eps = torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(_mix(_mix(draw, 3), 0)))
    torch.testing.assert_close(y, (lin.weight * (1 + 0.5 * eps)).T)
    # in eval mode the layers are clean even with a DAMP state set
    torch.testing.assert_close(lin.eval()(torch.eye(3)), lin.weight.T)


def test_damp_noise_is_independent_per_rank():
    model = _model().train()
    names = linear_weight_names(model)
    x, u = torch.rand(2, 3, 32, 32), torch.rand(2, 5)
    outs = [
        damp_forward(model, names, 0.1, torch.Generator().manual_seed(1), x, rank=r, cpe_uniforms=u).features
        for r in (0, 1, 0)
    ]
    assert not torch.allclose(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("windows", [None, "configured", "vitdet_train"])
def test_damp_with_gradient_checkpointing_gives_the_same_gradients(windows):
    """The recomputed forward replays the same noise (counter-based seeds): gradients equal the plain run's,
    with global attention, a configured ViTDet window, and ViTDet-mode training's padded windows."""
    from contextlib import nullcontext

    from radio import RadioConfig

    torch.manual_seed(0)
    model = RadioModel(RadioConfig.preset("tiny", pos_dropout=0.0, window_size=2 if windows == "configured" else None))
    model.train()
    names = linear_weight_names(model)
    # 3 x 5 tokens: ViTDet-mode training pads them to windows of 2; a configured window needs a multiple
    x, u = torch.rand(2, 3, *((64, 96) if windows == "configured" else (48, 80))), torch.rand(2, 5)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        with model.windowed(2, "replicate") if windows == "vitdet_train" else nullcontext():
            out = damp_forward(model, names, 0.2, torch.Generator().manual_seed(7), x, cpe_uniforms=u)
            out.features.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.set_grad_checkpointing(False)
    model.zero_grad()
    damp_forward(model, names, 0.0, None, x, cpe_uniforms=u).features.square().mean().backward()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)
    w = names[0]
    assert not torch.allclose(grads[0][w], dict(model.named_parameters())[w].grad)  # the noise did act


def test_backbone_summary_uses_the_cls_tokens_with_a_summary_loss(tmp_path):
    """SAM3 listed first: its CLS token (no summary loss) stays out of the backbone summary."""
    from radio.train.build import build_student
    from radio.train.teaching import build_teachers

    cfg = tiny_cfg(tmp_path)
    cfg.teachers = {name: cfg.teachers[name] for name in ("sam3", "siglip2", "dinov3")}
    slots = build_teachers(cfg, torch.device("cpu"))
    student = build_student(cfg, slots)
    assert student.config.summary_idxs == [1, 2]
    assert [spec.cls_index for spec in student.adaptor_specs] == [0, 1, 2]
    assert student.adaptor_specs[0].summary_dim is None


def test_single_sample_batches_keep_the_summary_loss_bounded(tmp_path):
    """With one sample per step, the first summaries used to be measured against their own mean
    direction: Disp = 0 and a summary loss of ~1e8. The meter's warm-up keeps Disp = 1 meanwhile."""
    from radio.train.teaching import build_teachers

    cfg = tiny_cfg(tmp_path / "run", steps=3, batch_size=1)
    cfg.fidelity.enabled = False
    cfg.loss.dispersion_warmup_samples = 2
    slots = build_teachers(cfg, torch.device("cpu"))
    assert {s.dispersion.warmup_samples for s in slots.values() if s.dispersion is not None} == {2}
    train(cfg, progress=False, log=lambda *a: None)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    summaries = [[r[k] for k in r if k.endswith("/summary")] for r in records]
    assert len(summaries) == 3
    assert all(0 <= v <= torch.pi**2 for v in summaries[0] + summaries[1])  # steps 1-2: Disp = 1
    assert all(v < 1e3 for v in summaries[2])


def test_resume_records_a_new_step_count(tmp_path):
    """`--resume DIR --steps N` writes N to the run's config.toml, so a later resume keeps the schedule."""
    from radio.train import load_run_config

    cfg = tiny_cfg(tmp_path / "run", steps=2)
    cfg.fidelity.enabled = False
    train(cfg, progress=False, log=lambda *a: None)
    longer = load_run_config(tmp_path / "run")
    longer.run.out, longer.run.steps = str(tmp_path / "run"), 3
    train(longer, resume=True, progress=False, log=lambda *a: None)
    assert load_run_config(tmp_path / "run").run.steps == 3


def test_damp_schedules():
    assert damp_sigma(0.0, "cosine", 0, 10) == 0.0
    assert damp_sigma(0.2, "cosine", 0, 10) == pytest.approx(0.2)
    assert damp_sigma(0.2, "cosine", 5, 10) == pytest.approx(0.1)
    assert damp_sigma(0.2, "linear", 10, 10) == 0.0
    assert damp_sigma(0.2, "constant", 7, 10) == 0.2
    with pytest.raises(ValueError, match="schedule"):
        damp_sigma(0.2, "exp", 0, 10)


def test_triton_and_torch_loss_backends_train_alike(tmp_path):
    """The loss kernels (Triton; the interpreter without a GPU) drive the same run as the references."""
    logs = {}
    for backend in ("torch", "triton"):
        cfg = tiny_cfg(tmp_path / backend, steps=2)
        cfg.fidelity.enabled = False
        cfg.loss.backend = backend
        train(cfg, progress=False, log=lambda *a: None)
        logs[backend] = _losses(tmp_path / backend)
    for a, b in zip(logs["torch"], logs["triton"]):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_the_default_config_plans_and_runs_every_resolution():
    """The demo's own resolutions: SigLIP2 tiles on the high partition, SAM3 mosaics everywhere."""
    from radio.train.build import build_student
    from radio.train.data import ImageSource, SampleSpec, ViewDataset, collate
    from radio.train.step import teacher_targets
    from radio.train.teaching import build_teachers, plan_all_views

    cfg = TrainConfig()
    slots = build_teachers(cfg, torch.device("cpu"))
    student = build_student(cfg, slots)
    plans, geometry = plan_all_views(cfg, slots, student.patch_size, student.min_resolution_step)
    assert {plans[("high", r)]["siglip2"].mode for r in cfg.data.high_resolutions} == {"tile"}
    assert {p["sam3"].mode for p in plans.values()} == {"mosaic"}
    assert {p["dinov3"].mode for p in plans.values()} == {"plain"}
    d = cfg.data
    dataset = ViewDataset(ImageSource.from_config(None), geometry, 16, 0, d.crop_scale, d.shift_std, d.max_shift, 32)
    for (part, res), plan in plans.items():
        batch = collate([dataset[SampleSpec(i, res, part, 0, i)] for i in range(3)])
        targets = teacher_targets(batch, slots, plan, 16, "cpu")
        for name, t in targets.items():
            assert t.features.shape[1:3] == (plan[name].tokens, plan[name].tokens)
            assert torch.isfinite(t.features).all()
        out = student(batch.images("student"), feature_fmt="NHWC")
        assert out["dinov3"].features.shape[1] == res // 16


def test_teachers_from_local_checkpoints(tmp_path, monkeypatch):
    """``teachers.<name>.name_or_path`` loads a checkpoint folder (the path real teachers take, offline)."""
    from radio.teachers import tiny_teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_teacher("dinov3", seed=5).save_pretrained(tmp_path / "dino")
    cfg = tiny_cfg(tmp_path / "run", steps=1)
    cfg.fidelity.enabled = False
    cfg.teachers["dinov3"].name_or_path = str(tmp_path / "dino")
    cfg.teachers["siglip2"].enabled = False
    train(cfg, progress=False, log=lambda *a: None)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert "loss/dinov3/spatial" in record and "loss/siglip2/spatial" not in record
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert [a["name"] for a in state["adaptors"]] == ["dinov3", "sam3"]


def test_grad_checkpointing_with_damp_trains_exactly_alike(tmp_path):
    """student.grad_checkpointing = true with DAMP on: the same losses and weights as without."""
    states = []
    for on in (False, True):
        cfg = tiny_cfg(tmp_path / f"ckpt-{on}", steps=3)
        cfg.fidelity.enabled = False
        cfg.damp.sigma = 0.2
        cfg.student.grad_checkpointing = on
        train(cfg, progress=False, log=lambda *a: None)
        states.append((_losses(tmp_path / f"ckpt-{on}"), load_checkpoint(latest_checkpoint(tmp_path / f"ckpt-{on}"))))
    (la, sa), (lb, sb) = states
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    for k in sa["student"]:
        torch.testing.assert_close(sb["student"][k], sa["student"][k], rtol=1e-5, atol=1e-6)


def test_teachers_load_onto_their_device_in_their_dtype_with_sdpa(tmp_path, monkeypatch):
    """No full float32 CPU copy per rank: from_pretrained gets device_map and dtype; attention is SDPA."""
    from transformers import DINOv3ViTModel

    from radio.teachers import tiny_teacher
    from radio.train.teaching import build_teachers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_teacher("dinov3", seed=5).save_pretrained(tmp_path / "dino")
    seen = {}
    real = DINOv3ViTModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(DINOv3ViTModel, "from_pretrained", classmethod(spy))
    cfg = tiny_cfg(tmp_path / "run")
    cfg.teachers["dinov3"].name_or_path = str(tmp_path / "dino")
    cfg.teachers["dinov3"].dtype = "bfloat16"
    cfg.teachers["sam3"].compile = True
    slots = build_teachers(cfg, torch.device("cpu"))
    assert seen["device_map"] == "cpu" and seen["dtype"] == torch.bfloat16 and seen["attn_implementation"] == "sdpa"
    dino = slots["dinov3"].teacher
    assert dino.dtype == torch.bfloat16 and dino.model.config._attn_implementation == "sdpa"
    assert isinstance(slots["sam3"].teacher.model, torch._dynamo.eval_frame.OptimizedModule)
    cfg.teachers["dinov3"].attn_implementation = "magic"
    with pytest.raises(ValueError, match="teachers.dinov3.attn_implementation"):
        cfg.validate()


def test_damp_perturbs_the_base_weight_of_a_lora_layer_and_keeps_its_update():
    from radio.model.lora import LoRALinear
    from radio.train.damp import _mix

    torch.manual_seed(0)
    lora = LoRALinear.from_linear(torch.nn.Linear(4, 3), rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_b.normal_()  # a non-zero update
    x = torch.randn(5, 4)
    y = damp_forward(lora, ["weight"], 0.5, torch.Generator().manual_seed(2), x)
    draw = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(2)))
    eps = torch.randn(lora.weight.shape, generator=torch.Generator().manual_seed(_mix(_mix(draw, 0), 0)))
    update = lora.lora_scale * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(y, x @ (lora.weight * (1 + 0.5 * eps)).T + lora.bias + update)
    y.sum().backward()
    assert lora.lora_a.grad is not None and lora.weight.grad is None  # frozen base, trained adapter
