"""Hostile input: every bad argument gets a clear ValueError / TypeError naming it (or documented
behaviour), before anything is written. The CLI turns those into one line and exit status 2.

Cases come from issue 17 ("Nothing lost, nothing silent", point 6) and from trying the public API
and the CLI with bad types, bools for ints, negative sizes, empty tensors, wrong devices and
non-finite scalars. Two hypothesis fuzzes close the file: ``--set`` values and the ops' arguments.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import radio_kernels._backend as backend_mod
from radio import RadioModel
from radio.cli import main
from radio.model import RadioConfig
from radio.train.config import (
    TrainConfig,
    apply_overrides,
    check_resume_compatible,
    check_runtime,
    config_to_dict,
    valid_keys,
)
from radio.train.data import ImageSource, split_holdout
from radio_kernels import angular_dispersion, angular_loss, attention, mesa_loss, shifted_mse

BACKENDS = ["torch", "triton"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_interpreter(monkeypatch):
    """As on a machine without a GPU where TRITON_INTERPRET was never set."""
    monkeypatch.setattr(backend_mod, "INTERPRETER_AT_IMPORT", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ----------------------------------------------------------------------------------------------
# config: every key checked before the run directory exists
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, key",
    [
        ("run.seed=-1", "run.seed"),
        ("run.seed=4294967296", "run.seed"),
        ("fidelity.seed=-5", "fidelity.seed"),
        ("teachers.dinov3.seed=-1", "teachers.dinov3.seed"),
        ("loss.backend=cuda", "loss.backend"),
        ("loss.mesa_weight=-1", "loss.mesa_weight"),
        ("student.preset=huge", "student.preset"),
        ("student.model.depth=-1", "depth"),
        ("student.model.window_size=true", "window_size"),
        ("student.model.global_blocks=3", "student.model"),
        ('teachers.dinov3.name_or_path=" "', "teachers.dinov3.name_or_path"),
    ],
)
def test_bad_config_values_name_the_key(item, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_overrides(TrainConfig(), [item])


def test_cli_bad_seed_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out), "--set", "run.seed=-1"]) == 2
    err = capsys.readouterr().err
    assert "run.seed" in err and "Traceback" not in err
    assert not out.exists()


def test_triton_backend_without_gpu_or_interpreter_fails_before_the_run_dir(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels")
    _no_interpreter(monkeypatch)
    cfg = apply_overrides(TrainConfig(), ["loss.backend=triton"])
    with pytest.raises(ValueError, match="loss.backend='triton'.*TRITON_INTERPRET=1"):
        check_runtime(cfg)
    check_runtime(apply_overrides(TrainConfig(), ["loss.backend=torch"]))  # the others are fine
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--steps", "1", "--out", str(out), "--set", "loss.backend=triton"]
    assert main(argv) == 2
    assert "loss.backend" in capsys.readouterr().err
    assert not out.exists()


def test_cuda_device_without_gpu_fails_in_check_runtime():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="run.device='cuda'"):
        check_runtime(apply_overrides(TrainConfig(), ["run.device=cuda"]))


def test_resume_with_a_teacher_disabled_names_the_teacher():
    saved = config_to_dict(TrainConfig())
    cfg = apply_overrides(TrainConfig(), ["teachers.sam3.enabled=false"])
    with pytest.raises(ValueError, match="teacher 'sam3'.*disabled"):
        check_resume_compatible(saved, cfg)
    with pytest.raises(ValueError, match="teachers.dinov3.kind"):
        check_resume_compatible(saved, apply_overrides(TrainConfig(), ["teachers.dinov3.kind=sam3"]))
    with pytest.raises(ValueError, match="student.model"):
        check_resume_compatible(saved, apply_overrides(TrainConfig(), ["student.model.depth=2"]))
    check_resume_compatible(saved, apply_overrides(TrainConfig(), ["optim.lr=1e-4", "run.steps=9"]))


# ----------------------------------------------------------------------------------------------
# data: a folder without a usable image
# ----------------------------------------------------------------------------------------------


def _garbage_folder(path, n: int):
    path.mkdir()
    for i in range(n):
        (path / f"img{i}.jpg").write_bytes(b"not a jpeg")
    return path


def test_folder_of_unreadable_images_is_one_clear_error_with_the_count(tmp_path):
    folder = _garbage_folder(tmp_path / "images", 5)
    with pytest.raises(ValueError, match="none of its 5 image files is usable \\(5 unreadable"):
        ImageSource.from_config(str(folder))


def test_images_all_below_min_image_side(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "a.png")
    with pytest.raises(ValueError, match="1 with a side below data.min_image_side=64"):
        ImageSource.from_config(str(folder), min_image_side=64)
    with pytest.raises(ValueError, match="bundled images"):
        ImageSource.from_config(None, min_image_side=100_000)


def test_train_on_unreadable_folder_leaves_no_run_dir(tmp_path, capsys):
    folder = _garbage_folder(tmp_path / "images", 4)
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--steps", "1", "--out", str(out), "--set", f"data.image_dir={str(folder)!r}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none of its 4 image files is usable" in err and "Traceback" not in err
    assert not out.exists()


def test_training_split_without_a_usable_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "a.png")  # the one held out
    (folder / "b.png").write_bytes(b"broken")
    source = ImageSource.from_config(str(folder))
    with pytest.raises(ValueError, match="training images"):
        split_holdout(source, 1)


# ----------------------------------------------------------------------------------------------
# kernels backend: the interpreter switched on too late
# ----------------------------------------------------------------------------------------------


def test_interpreter_set_after_import_says_to_set_it_before():
    code = (
        "import os, torch, radio_kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(1, 1, 4, 4)\n"
        "try:\n"
        "    radio_kernels.attention(x, x, x, backend='triton')\n"
        "except ValueError as e:\n"
        "    print('VALUEERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "VALUEERROR" in proc.stdout, proc.stderr[-2000:]
    assert "before importing radio_kernels" in proc.stdout


# ----------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bad_arguments(backend):
    empty_d = torch.randn(1, 2, 8, 0)
    with pytest.raises(ValueError, match="head dim"):
        attention(empty_d, empty_d, empty_d, backend=backend)
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="window_tokens"):
        attention(x, x, x, window_tokens=True, backend=backend)
    with pytest.raises(TypeError, match="num_prefix"):
        attention(x, x, x, num_prefix=True, backend=backend)
    for scale in (math.inf, math.nan, True, -1.0):
        with pytest.raises(ValueError, match="scale"):
            attention(x, x, x, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_angular_loss_without_channels_raises_on_both_backends(backend):
    y = torch.randn(4, 0)
    with pytest.raises(ValueError, match="C >= 1"):
        angular_loss(y, y, 1.0, backend=backend)
    x = torch.randn(4, 6)
    for bad in (math.inf, True, torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="dispersion"):
            angular_loss(x, x, bad, backend=backend)


def test_angular_dispersion_of_nothing_raises():
    for shape in ((4, 0), (0, 4)):
        with pytest.raises(ValueError, match="y must hold"):
            angular_dispersion(torch.randn(shape))


def test_angular_loss_inf_and_nan_rows_are_nan_on_both_backends():
    """Documented: a row holding Inf or NaN (in x or y) makes Theta NaN, so the loss is NaN, and
    gives a NaN gradient row; the other rows' gradients are the finite ones, alike on both backends."""
    torch.manual_seed(0)
    x0, y = torch.randn(5, 7), torch.randn(5, 7)
    x0[1, 2] = math.inf
    x0[3, 0] = -math.inf
    y[4, 5] = math.nan
    grads, losses = {}, {}
    for backend in BACKENDS:
        x = x0.clone().requires_grad_()
        loss = angular_loss(x, y, 1.5, backend=backend)
        loss.backward()
        losses[backend], grads[backend] = loss, x.grad
    for backend in BACKENDS:
        assert torch.isnan(losses[backend])
        g = grads[backend]
        assert torch.isnan(g[[1, 3, 4]]).all(), backend
        assert torch.isfinite(g[[0, 2]]).all(), backend
    torch.testing.assert_close(grads["torch"][[0, 2]], grads["triton"][[0, 2]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_losses_bad_scalars_and_empty_channels(backend):
    s = torch.randn(2, 3, 3, 4)
    for eps in (math.inf, True):
        with pytest.raises(ValueError, match="eps"):
            mesa_loss(s, s, eps=eps, backend=backend)
    empty = torch.randn(2, 3, 3, 0)
    with pytest.raises(ValueError, match="C >= 1"):
        shifted_mse(empty, empty, torch.zeros(2, 2, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="C >= 1"):
        mesa_loss(empty, empty, backend=backend)
    # A target grid without cells overlaps nothing: exactly 0 with a zero gradient (found by the fuzz
    # below: the reference raised IndexError).
    student, no_rows = torch.randn(1, 2, 2, 3, requires_grad=True), torch.randn(1, 0, 2, 3)
    shift = torch.zeros(1, 2, dtype=torch.long)
    for loss in (
        shifted_mse(student, no_rows, shift, backend=backend),
        mesa_loss(student, no_rows, shift, backend=backend),
    ):
        loss.backward()
        assert loss.item() == 0.0 and not student.grad.any()


# ----------------------------------------------------------------------------------------------
# model input
# ----------------------------------------------------------------------------------------------


def test_float64_images_are_cast_to_the_model_dtype():
    model = RadioModel(RadioConfig.preset("tiny")).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want, got = model(x), model(x.double())
    assert got.features.dtype == torch.float32
    torch.testing.assert_close(got.features, want.features)


def test_pixels_in_0_255_warn_once():
    model = RadioModel(RadioConfig.preset("tiny")).eval()
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # [0, 1]: silent
    with pytest.warns(UserWarning, match=r"pixels in \[0, 1\]"):
        model(x * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x * 255)  # once per model


def test_images_on_another_device_name_x():
    model = RadioModel(RadioConfig.preset("tiny"))
    with pytest.raises(ValueError, match="x is on meta"):
        model(torch.rand(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_cls_tokens", True),
        ("mlp_ratio", True),
        ("mlp_ratio", math.inf),
        ("layer_scale", math.inf),
        ("layer_scale", True),
        ("summary_idxs", [True]),
        ("global_blocks", [True]),
        ("global_blocks", 3),
        ("qkv_bias", "no"),
        ("final_norm", 0),
    ],
)
def test_radio_config_rejects_bools_for_ints_and_non_finite_numbers(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        RadioConfig.preset("tiny", **{field: value})


def test_adaptor_spec_rejects_bool_dims():
    from radio.model import AdaptorSpec

    with pytest.raises(ValueError, match="summary_dim"):
        AdaptorSpec(name="a", summary_dim=True, feature_dim=4)


def test_model_api_bad_arguments(tmp_path):
    model = RadioModel(RadioConfig.preset("tiny")).eval()
    x = torch.rand(1, 3, 32, 32)
    for indices in (True, [True], [1.0], "a"):
        with pytest.raises(TypeError, match="indices"):
            model.forward_intermediates(x, indices=indices, intermediates_only=True)
    for side in (math.inf, math.nan, True, "64"):
        with pytest.raises(ValueError, match="height"):
            model.get_nearest_supported_resolution(side, 64)
    with pytest.raises(TypeError, match="generator"):
        model.train()(x, generator=3)
    target = tmp_path / "model.bin"
    target.write_bytes(b"")
    with pytest.raises(ValueError, match="existing file"):
        model.save_pretrained(target)


def test_cli_impossible_out_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    argv = ["train", "--no-progress", "--steps", "1", "--set", "fidelity.enabled=false"]
    assert main([*argv, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radio train: error:") and "Not a directory" in err


def test_config_file_that_is_a_folder(tmp_path, capsys):
    assert main(["train", "--print-config", "--config", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# radio viz, export, export-onnx
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "image.jpg"
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_viz_truncated_jpeg_is_a_clear_error(tmp_path, image_file, capsys):
    data = image_file.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    assert main(["viz", str(truncated), "--teachers", "dinov3", "--out", str(tmp_path / "v.png")]) == 2
    assert "could not be decoded" in capsys.readouterr().err


def test_viz_image_too_large_or_a_folder(tmp_path, image_file, monkeypatch):
    from radio.viz import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48 x 48 is then a "decompression bomb"
    with pytest.raises(ValueError, match="too large"):
        load_image(image_file)
    with pytest.raises(ValueError, match="is not a file"):
        load_image(tmp_path)


def test_viz_huge_size_and_bad_out_are_refused_before_any_work(tmp_path, image_file, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("feature_panels must not run")

    monkeypatch.setattr("radio.viz.feature_panels", no_work)
    argv = ["viz", str(image_file), "--teachers", "dinov3"]
    assert main([*argv, "--size", "100000", "--out", str(tmp_path / "v.png")]) == 2
    assert "--size must be at most" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main([*argv, "--out", str(tmp_path / "folder")]) == 2
    assert "--out must be an image file" in capsys.readouterr().err


def test_viz_missing_teacher_path(tmp_path, image_file, capsys):
    missing = tmp_path / "no" / "such" / "teacher"
    assert main(["viz", str(image_file), "--teachers", f"dinov3={missing}", "--out", str(tmp_path / "v.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_to_an_existing_file(tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(target)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


def test_export_onnx_to_a_directory_or_unknown_opset_leaves_nothing(tmp_path):
    pytest.importorskip("onnxscript")
    from radio.model.onnx import export_onnx

    model = RadioModel(RadioConfig.preset("tiny"))
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(model, tmp_path, 64, 64, check=False)
    with pytest.raises(ValueError, match="opset_version must be at most"):
        export_onnx(model, tmp_path / "x.onnx", 64, 64, opset_version=99, check=False)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):  # the CLI reports OSError as one line too
        export_onnx(model, blocker / "x.onnx", 64, 64, check=False)


def test_export_onnx_failed_check_leaves_no_file(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import radio.model.onnx as onnx_mod

    def failing_check(*args, **kwargs):
        raise ValueError("check failed")

    monkeypatch.setattr(onnx_mod, "_compare_with_onnxruntime", failing_check)
    model = RadioModel(RadioConfig.preset("tiny", depth=1))
    with pytest.raises(ValueError, match="check failed"):
        onnx_mod.export_onnx(model, tmp_path / "x.onnx", 32, 32)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# fuzz: --set values (only a clean CLI error or success)
# ----------------------------------------------------------------------------------------------

_KEYS = [k for k in valid_keys() if not k.startswith("student.model.")] + [
    "student.model.depth",
    "student.model.window_size",
    "student.model.global_blocks",
    "student.model.summary_idxs",
    "student.model.mlp_ratio",
    "teachers.extra.kind",
]
_VALUES = st.one_of(
    st.sampled_from(
        [
            "-1",
            "0",
            "1",
            "true",
            "false",
            "inf",
            "nan",
            "-inf",
            "1e400",
            "none",
            "[]",
            "[1, -2]",
            '"x"',
            "{a = 1}",
            "1979-05-27",
            "[[1]]",
            "0.5",
            "99999999999999999999",
            "[0.9, 2]",
            '["a", 1]',
            "=",
            "",
            "'",
            '"',
            "[",
            "auto",
            "cuda",
            "triton",
            "dinov3",
            "1_000",
            "0x10",
            "-0.0",
        ]
    ),  # fmt: skip
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(max_examples=60)
@given(key=st.sampled_from(_KEYS), value=_VALUES)
@example(key="run.seed", value="-1")
@example(key="student.model.depth", value="-1")
@example(key="loss.backend", value="cuda")
def test_fuzz_set_values_give_a_clean_cli_error_or_a_usable_config(key, value):
    """``radio train --set KEY=VALUE`` either stops with one line and status 2, or hands ``train`` a
    config that is usable: its seeds seed numpy and torch, its student architecture builds."""
    seen = []

    def fake_train(cfg, **kwargs):
        seen.append(cfg)
        return {}

    err = io.StringIO()
    with mock.patch("radio.train.train", fake_train), contextlib.redirect_stderr(err):
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["train", "--no-progress", "--set", f"{key}={value}"])
    assert rc in (0, 2)
    assert "Traceback" not in err.getvalue()
    if rc == 2:
        assert err.getvalue().startswith("radio train: error:")
        return
    (cfg,) = seen
    for seed in (cfg.run.seed, cfg.fidelity.seed, *(t.seed for t in cfg.teachers.values())):
        np.random.default_rng([seed, 0])
        torch.Generator().manual_seed(seed * 1_000_003 + 29)  # the trainer's DAMP stream seed
    RadioConfig.preset(cfg.student.preset, **{"summary_idxs": [0], **cfg.student.model})
    assert cfg.loss.backend in ("auto", "torch", "triton")


# ----------------------------------------------------------------------------------------------
# fuzz: the public ops' arguments (only ValueError / TypeError, or a result)
# ----------------------------------------------------------------------------------------------
# Each argument starts well-formed (so calls get past the first check and reach the kernels) and
# is then, often, made bad in one way: dtype, rank, an empty or mismatched axis, layout, device,
# non-finite values; scalars become bools, floats, non-finite, negative or strings.

_MUTATIONS = [None] * 6 + ["float64", "float16", "int32", "bool", "empty", "rank", "grow", "strided", "meta", "inf"]
_BAD_SCALARS = [-1, 0.5, math.inf, -math.inf, math.nan, True, False, "1", np.int64(2), None, 10**20]


@st.composite
def _arg_tensor(draw, shape):
    t = torch.randn(shape)
    kind = draw(st.sampled_from(_MUTATIONS))
    if kind in ("float64", "float16", "int32", "bool"):
        t = t.to(getattr(torch, kind))
    elif kind == "empty" and t.dim():
        t = t.narrow(draw(st.integers(0, t.dim() - 1)), 0, 0)
    elif kind == "rank":
        t = t[None] if draw(st.booleans()) or t.dim() == 0 else t.sum(0)  # one more or one fewer axis
    elif kind == "grow" and t.dim():
        t = torch.cat([t, t], dim=draw(st.integers(0, t.dim() - 1)))
    elif kind == "strided" and t.dim() >= 2:
        t = t.transpose(0, -1).contiguous().transpose(0, -1)  # same values, another layout
    elif kind == "meta":
        t = t.to("meta")
    elif kind == "inf" and t.numel():
        t.view(-1)[0] = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    return t


def _scalar(draw, good):
    return draw(st.one_of(st.just(good), st.just(good), st.sampled_from(_BAD_SCALARS)))


def _call_expecting_clean(fn):
    try:
        fn()
    except (ValueError, TypeError):
        pass  # documented; anything else fails the test


_BACKEND = st.sampled_from(["torch", "triton", "triton", "auto", "cuda", None])
_DIM = st.sampled_from([0, 1, 1, 2, 3, 4])  # 0: empty axes are legal input too
_WIDTH = st.sampled_from([0, 1, 3, 4, 16])  # head dim D / channels C


@settings(max_examples=40)
@given(data=st.data())
def test_fuzz_ops_raise_only_value_or_type_errors(data):
    draw = data.draw
    op = draw(st.sampled_from(["attention", "shifted_mse", "mesa_loss", "angular_loss", "angular_dispersion"]))
    backend = draw(_BACKEND)
    if op == "attention":
        B, H, P, T, nw = draw(_DIM), draw(_DIM), draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(_DIM)
        N, D = P + max(T, 1) * nw, draw(_WIDTH)
        q, k, v = (draw(_arg_tensor((B, H, N, D))) for _ in range(3))
        kwargs = dict(num_prefix=_scalar(draw, P), window_tokens=_scalar(draw, T), scale=_scalar(draw, None))
        _call_expecting_clean(lambda: attention(q, k, v, backend=backend, **kwargs))
    elif op in ("shifted_mse", "mesa_loss"):
        B, C = draw(_DIM), draw(_WIDTH)
        s = draw(_arg_tensor((B, draw(_DIM), draw(_DIM), C)))
        t = draw(_arg_tensor((B, draw(_DIM), draw(_DIM), C) if op == "shifted_mse" else tuple(s.shape)))
        shift = draw(
            st.one_of(_arg_tensor((B, 2)).map(lambda x: (x * 2).to(torch.long)), st.sampled_from(_BAD_SCALARS))
        )
        if op == "shifted_mse":
            _call_expecting_clean(lambda: shifted_mse(s, t, shift, backend=backend))
        else:
            eps = _scalar(draw, 1e-6)
            _call_expecting_clean(lambda: mesa_loss(s, t, shift, eps=eps, backend=backend))
    elif op == "angular_loss":
        B, C = draw(_DIM), draw(_WIDTH)
        x, y = draw(_arg_tensor((B, C))), draw(_arg_tensor((B, C)))
        dispersion = draw(st.one_of(st.just(0.5), _arg_tensor(()), st.sampled_from(_BAD_SCALARS)))
        _call_expecting_clean(lambda: angular_loss(x, y, dispersion, backend=backend))
    else:
        y = draw(_arg_tensor((draw(_DIM), draw(_DIM))))
        _call_expecting_clean(lambda: angular_dispersion(y))
