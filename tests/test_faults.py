"""Reliability: a run that goes wrong says so, nothing non-finite is saved, nothing is silently lost.

Each test is one failure a user can meet: a diverging run, a NaN batch, a truncated checkpoint, a
second writer, a partial metrics line, a resume to fewer steps, NaN weights at export, a kill -9.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from radio import RadioConfig, RadioModel
from radio.cli import main
from radio.finite import NonFiniteError, check_finite, nonfinite_entries
from radio.normalize import PHISNormalizer
from radio.train import export_run, load_run_config, train
from radio.train import loop as loop_module
from radio.train.checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    save_checkpoint,
)
from radio.train.plots import read_metrics
from radio.train.runlock import LOCK_FILE, RunLock, RunLockedError
from radio_kernels import DispersionMeter, angular_loss
from tests.test_train import tiny_cfg

QUIET = {"progress": False, "log": lambda *a: None}
SMALL = ["--no-progress", "--set", "data.batch_size=2", "--set", "data.num_workers=0",
         "--set", "data.low_resolutions=[32]", "--set", "data.high_resolutions=[64]",
         "--set", "fidelity.enabled=false"]  # fmt: skip


def _cfg(out, steps=4, **run):
    cfg = tiny_cfg(out, steps=steps)
    cfg.fidelity.enabled = False
    cfg.run.checkpoint_every = 1
    cfg.run.keep_last = 20
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _poison(monkeypatch, bad_steps: set[int], accum: int = 1) -> None:
    """Make the loss of the given optimizer steps (1-based) NaN, as a broken batch would."""
    real = loop_module.micro_step_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        objective, parts = real(*args, **kwargs)
        calls["n"] += 1
        if (calls["n"] - 1) // accum + 1 in bad_steps:
            nan = torch.tensor(float("nan"))
            parts = dict(parts, **{"loss/mesa": parts["loss/mesa"] * nan, "loss": parts["loss"] * nan})
            objective = objective * nan
        return objective, parts

    monkeypatch.setattr(loop_module, "micro_step_losses", poisoned)


# ----------------------------------------------------------------------------------------------
# 1. the non-finite guard
# ----------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_non_zero_and_saves_nothing_non_finite(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", *SMALL, "--steps", "30", "--out", str(run), "--set", "optim.lr=1e6",
                 "--set", "optim.warmup_steps=0", "--set", "run.checkpoint_every=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "step 2: non-finite" in err and "loss/siglip2/spatial" in err and "gradient norm" in err
    assert "step_00000001.pt" in err  # names the last good checkpoint
    assert [s for s, _ in list_checkpoints(run)] == [1]  # the bad step wrote nothing
    assert nonfinite_entries(load_checkpoint(run / "checkpoints" / "step_00000001.pt")["ema"]) == []
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["applied"] is False
    # NaN is logged as NaN, the summary terms included (they used to read pi^2/4 = 2.4674)
    assert math.isnan(records[1]["loss"]) and math.isnan(records[1]["loss/siglip2/summary"])
    # and what exists exports
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 0


def test_skip_mode_drops_the_step_counts_it_and_keeps_the_weights(tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    logs = []
    result = train(_cfg(tmp_path / "run", steps=5, nonfinite="skip"), progress=False, log=logs.append)
    assert result["step"] == 5
    assert any("step 3 skipped" in line for line in logs)
    records = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert records[3]["applied"] is False and math.isnan(records[3]["loss"])
    assert records[3]["skipped_steps"] == 1 and records[5]["skipped_steps"] == 1
    two, three = (load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_0000000{s}.pt") for s in (2, 3))
    for part in ("student", "ema"):  # the skipped step changed no weight, no moment
        for k in two[part]:
            assert torch.equal(two[part][k], three[part][k]), (part, k)
    for k, v in two["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], three["optimizer"]["state"][k]["exp_avg"])
    assert three["scheduler"]["last_epoch"] == two["scheduler"]["last_epoch"] + 1  # the LR schedule moved on
    assert three["guard"] == {"skipped_steps": 1, "consecutive": 1}
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")["guard"]["consecutive"] == 0


def test_skip_mode_stops_after_max_skipped_consecutive_steps(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"step 4: 3 consecutive non-finite steps \(run.max_skipped=3\)"):
        train(_cfg(tmp_path / "run", steps=8, nonfinite="skip", max_skipped=3), **QUIET)
    assert max(s for s, _ in list_checkpoints(tmp_path / "run")) == 3


def test_stop_mode_names_the_step_and_term_with_accumulation(tmp_path, monkeypatch):
    _poison(monkeypatch, {2}, accum=2)
    cfg = _cfg(tmp_path / "run", steps=4)
    cfg.optim.accum_steps = 2
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss/mesa .*the step was not applied"):
        train(cfg, **QUIET)


def test_a_teacher_with_non_finite_output_is_named(tmp_path, monkeypatch):
    from radio.train import step as step_module

    real = step_module.run_teacher

    def broken(teacher, images, plan, *rest):
        out = real(teacher, images, plan, *rest)
        if type(teacher).__name__ == "SiglipTeacher":
            out.features[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(step_module, "run_teacher", broken)
    with pytest.raises(NonFiniteError, match="output of teacher 'siglip2'"):
        train(_cfg(tmp_path / "run", steps=2), **QUIET)


def test_checkpoints_and_exports_refuse_non_finite_weights(tmp_path):
    model = RadioModel(RadioConfig.preset("tiny"))
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    from radio.model.onnx import export_onnx

    with pytest.raises(NonFiniteError, match="ONNX"):
        export_onnx(model, tmp_path / "m.onnx", 32, 32)
    assert not (tmp_path / "m.onnx").exists()
    # a run whose EMA went NaN (as a pre-guard run could leave it) is not exported
    train(_cfg(tmp_path / "run", steps=1), **QUIET)
    path = list_checkpoints(tmp_path / "run")[-1][1]
    state = load_checkpoint(path)
    state["ema"]["cls_token"] = state["ema"].get("cls_token", next(iter(state["ema"].values()))) * float("nan")
    atomic_save(state, path)
    with pytest.raises(NonFiniteError, match="refusing to write an export"):
        export_run(tmp_path / "run", tmp_path / "model")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 1
    assert check_finite({"a": torch.ones(2), "b": [torch.zeros(1, dtype=torch.long)]}, "x") is None


def test_the_onnx_check_fails_above_its_tolerance(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from radio.model import onnx as onnx_module

    model = RadioModel(RadioConfig.preset("tiny")).eval()
    real = onnx_module._Flattened.forward
    calls = {"n": 0}

    def off_by_a_bit(self, pixels):  # the traced graph is right; PyTorch's answer at check time is not
        calls["n"] += 1
        out = real(self, pixels)
        return out if calls["n"] == 1 else tuple(o + 1e-2 * o.abs().max() for o in out)

    monkeypatch.setattr(onnx_module._Flattened, "forward", off_by_a_bit)
    with pytest.raises(onnx_module.OnnxCheckError, match="disagree on output 'summary'"):
        onnx_module.export_onnx(model, tmp_path / "m.onnx", 32, 32)
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------------------------
# 2. statistics that survive bad samples
# ----------------------------------------------------------------------------------------------


def test_dispersion_meter_ignores_non_finite_rows():
    """One broken batch used to leave the running sum NaN for the rest of the run."""
    torch.manual_seed(0)
    clean, dirty = DispersionMeter(16, warmup_samples=6), DispersionMeter(16, warmup_samples=6)
    for i in range(8):
        b = torch.randn(6, 16) + 2
        clean.update(b)
        dirty.update(torch.cat([b, torch.full((2, 16), float("nan"))]) if i % 2 else b)
    assert torch.isfinite(dirty.value) and torch.isfinite(dirty.sum_y).all()
    assert dirty.nonfinite_rows.item() == 4 * 2
    torch.testing.assert_close(dirty.sum_y, clean.sum_y)
    torch.testing.assert_close(dirty.value, clean.value)
    assert dirty.count.item() == clean.count.item() == 48


def test_dispersion_meter_matches_a_meter_fed_only_the_finite_rows():
    torch.manual_seed(1)
    a, b = DispersionMeter(8, warmup_samples=4), DispersionMeter(8, warmup_samples=4)
    for _ in range(5):
        y = torch.randn(5, 8) + 1
        bad = y.clone()
        bad[2, 0] = float("nan")
        a.update(torch.cat([y[:2], y[3:]]))
        b.update(bad)
    torch.testing.assert_close(a.value, b.value)
    torch.testing.assert_close(a.sum_theta2, b.sum_theta2)
    assert b.nonfinite_rows.item() == 5 and a.nonfinite_rows.item() == 0
    old = {k: v for k, v in a.state_dict().items() if k != "nonfinite_rows"}  # a checkpoint from before
    c = DispersionMeter(8, warmup_samples=4)
    c.load_state_dict(old)
    assert c.nonfinite_rows.item() == 0


def test_phis_ignores_non_finite_rows_and_fits_once_a_finite_batch_arrives():
    torch.manual_seed(2)
    x = torch.randn(64, 12) * torch.linspace(0.5, 3, 12) + 1
    bad = x.clone()
    bad[::7, 4] = float("nan")
    bad[3, 0] = float("-inf")
    ref, phis = PHISNormalizer(12), PHISNormalizer(12)
    finite_rows = torch.isfinite(bad).all(1)
    ref.update(x[finite_rows])
    phis.update(bad)
    assert phis.nonfinite_rows.item() == int((~finite_rows).sum())
    torch.testing.assert_close(phis(x), ref(x))
    # a first batch of nothing but broken rows: not fitted (and no error), fitted by the next one
    late = PHISNormalizer(12)
    assert late.update(torch.full((4, 12), float("nan"))) is False and not late.fitted
    assert late.update(x) is True and late.fitted
    assert torch.isfinite(late.forward_matrix).all()
    old = {k: v for k, v in ref.state_dict().items() if k != "nonfinite_rows"}
    fresh = PHISNormalizer(12)
    fresh.load_state_dict(old)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["x", "y"])
def test_angular_loss_on_non_finite_rows_is_nan_on_both_backends(backend, bad_value, side):
    torch.manual_seed(3)
    x, y = torch.randn(4, 24), torch.randn(4, 24)
    (x if side == "x" else y)[1, 5] = bad_value
    xr = x.clone().requires_grad_()
    loss = angular_loss(xr, y, 0.5, backend=backend)
    loss.backward()
    assert math.isnan(loss.item())
    assert xr.grad[1].isnan().all()  # the broken row's gradient is NaN, not a zero row's 0
    keep = [0, 2, 3]
    xk = x[keep].clone().requires_grad_()
    angular_loss(xk, y[keep], 0.5, backend=backend).backward()
    torch.testing.assert_close(xr.grad[keep], xk.grad * 3 / 4)  # the other rows are unaffected


# ----------------------------------------------------------------------------------------------
# 3. checkpoints, locks, metrics
# ----------------------------------------------------------------------------------------------


def _run_to(tmp_path, steps=3, name="run"):
    cfg = _cfg(tmp_path / name, steps=steps)
    train(cfg, **QUIET)
    return tmp_path / name


def _resume(run, steps=None, log=None):
    cfg = load_run_config(run)
    cfg.run.out = str(run)
    if steps is not None:
        cfg.run.steps = steps
    return train(cfg, resume=True, progress=False, log=log or (lambda *a: None))


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "garbage-without-digest"])
def test_resume_and_export_fall_back_past_a_broken_latest_checkpoint(tmp_path, damage):
    run = _run_to(tmp_path, steps=3)
    latest = run / "checkpoints" / "step_00000003.pt"
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        latest.write_bytes(b"")
    elif damage == "flip":
        latest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        latest.write_bytes(b"not a checkpoint")
        (run / "checkpoints" / "step_00000003.pt.sha256").unlink()
    logs = []
    path, state = load_latest_good(run, log=logs.append)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000003.pt" in logs[0] and "falling back to step_00000002.pt" in logs[-1]
    export_run(run, tmp_path / "model", log=logs.append)  # export falls back alike
    assert RadioModel.from_pretrained(tmp_path / "model") is not None
    logs.clear()
    _resume(run, steps=4, log=logs.append)
    assert any("falling back" in line for line in logs)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step_00000003.pt").is_file()  # rewritten by the resumed run
    assert load_checkpoint(run / "checkpoints" / "step_00000004.pt")["step"] == 4


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 1, {"step": 1}, keep_last=2)
    (run / "checkpoints" / "step_00000001.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint.*does not match its SHA-256"):
        load_latest_good(run, log=lambda *a: None)


def test_resume_to_fewer_steps_is_refused_and_overwrites_nothing(tmp_path, capsys):
    run = _run_to(tmp_path, steps=3)
    before = (run / "checkpoints" / "step_00000001.pt").read_bytes()
    assert main(["train", "--resume", str(run), "--steps", "1", "--no-progress"]) == 2
    assert "below the step of the checkpoint to resume from (3" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000001.pt").read_bytes() == before
    assert load_run_config(run).run.steps == 3  # the run's config is unchanged too


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path):
    run = _run_to(tmp_path, steps=2)
    with RunLock(run):
        owner = json.loads((run / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} on host"):
            _resume(run, steps=3)
        assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 1
    assert not (run / LOCK_FILE).exists()  # released
    _resume(run, steps=3)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_lock_held_by_another_process_is_refused_and_freed_by_its_death(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from radio.train.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: no cleanup; the kernel frees the flock, the file stays
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    logs = []
    RunLock(tmp_path, log=logs.append).acquire().release()
    assert "taking over a stale lock" in logs[0] and str(holder.pid) in logs[0]


def test_a_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunLockedError, match="locked by pid 1 on host elsewhere"):
        RunLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_FILE, (old, old))
    logs = []
    lock = RunLock(tmp_path, log=logs.append, stale_after=60).acquire()
    assert "stale lock of pid 1 on host elsewhere" in logs[0]
    lock.release()


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path):
    run = _run_to(tmp_path, steps=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the run died mid-write
    logs = []
    _resume(run, steps=3, log=logs.append)
    assert any("partial last line" in line for line in logs)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_corrupt_metrics_line_inside_the_file_names_the_file(tmp_path):
    run = _run_to(tmp_path, steps=2)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("{broken\n" + "".join(lines))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not valid JSON"):
        _resume(run, steps=3)
    assert not (run / LOCK_FILE).exists()  # a failed start releases the lock


# ----------------------------------------------------------------------------------------------
# kill -9 at random steps, then an exact resume
# ----------------------------------------------------------------------------------------------

_ARGS = [*SMALL, "--steps", "8", "--set", "run.checkpoint_every=1", "--set", "run.log_every=1"]


def _cli(*args, **popen):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "radio", "train", *args], env=env, text=True, **popen)


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    assert _cli(*_ARGS, "--out", str(full)).wait() == 0
    run = tmp_path / "run"
    rng = random.Random(1234)
    proc = _cli(*_ARGS, "--out", str(run))
    for _ in range(2):  # two kills at random points, each followed by a resume
        target = rng.randint(1, 6)
        while not any(s >= target for s, _ in list_checkpoints(run)):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _cli("--resume", str(run), "--no-progress")
    assert proc.wait() == 0
    want = load_checkpoint(list_checkpoints(full)[-1][1])
    got = load_checkpoint(list_checkpoints(run)[-1][1])
    assert got["step"] == want["step"] == 8
    for part in ("student", "ema"):
        for k in want[part]:
            torch.testing.assert_close(got[part][k], want[part][k], rtol=1e-6, atol=1e-6)
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6)
