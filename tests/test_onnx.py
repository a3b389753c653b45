"""ONNX export (radio.model.onnx, `radio export-onnx`): the graph onnxruntime runs equals the PyTorch model."""

import numpy as np
import pytest
import torch

from radio import AdaptorSpec, RadioConfig, RadioModel
from radio.cli import main as cli_main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from radio.model.onnx import export_onnx  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


def windowed_student() -> RadioModel:
    """ViTDet windows, an MLP and an attention head, and a head without a summary but upsampled x2."""
    torch.manual_seed(0)
    specs = [
        AdaptorSpec("siglip2", 24, 20, hidden_dim=40),
        AdaptorSpec("dinov3", 16, 12, head="attn", hidden_dim=40),
        AdaptorSpec("sam3", None, 12, hidden_dim=40, upsample_factor=2),
    ]
    return RadioModel(RadioConfig.preset("tiny", window_size=2, num_global=1), specs)


def run_onnx(path, pixels: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"pixels": pixels.numpy()})]


def test_exported_graph_matches_the_model_at_any_batch(tmp_path):
    """The default export (batch_size=1) has a dynamic batch axis: batches 1 and 3 both run."""
    model = windowed_student()
    result = export_onnx(model, tmp_path / "m.onnx", 64, 96, feature_fmt="NCHW")
    assert result.output_names == [
        "summary", "features", "siglip2.summary", "siglip2.features",
        "dinov3.summary", "dinov3.features", "sam3.features",
    ]  # fmt: skip
    assert result.normalizes_input and result.opset >= 18
    assert set(result.max_abs_diff) == set(result.output_names)
    assert all(d < 1e-4 for d in result.max_abs_diff.values()), result.max_abs_diff
    # the model is left as it was: training mode, its own attention backend
    assert model.training and model.config.attention_backend == "auto"

    model.eval()
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 96, generator=torch.Generator().manual_seed(batch))
        got = run_onnx(result.path, x)
        with torch.no_grad():
            out = model(x, feature_fmt="NCHW")
        want = [out["backbone"].summary, out["backbone"].features, out["siglip2"].summary, out["siglip2"].features,
                out["dinov3"].summary, out["dinov3"].features, out["sam3"].features]  # fmt: skip
        assert len(got) == len(want)
        assert got[-1].shape == (batch, 12, 8, 12)  # sam3 features upsampled x2 on the 4 x 6 grid
        for name, g, w in zip(result.output_names, got, want):
            torch.testing.assert_close(g, w, **TOL, msg=name)


def test_external_preprocessor_graph_takes_normalised_pixels(tmp_path):
    torch.manual_seed(2)
    model = RadioModel(RadioConfig.preset("tiny")).eval()
    norm = model.make_preprocessor_external()
    result = export_onnx(model, tmp_path / "e.onnx", 32, 32)
    assert not result.normalizes_input
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model(norm(x)).features
    torch.testing.assert_close(run_onnx(result.path, norm(x))[1], want, **TOL)


def test_static_batch_and_backbone_only(tmp_path):
    torch.manual_seed(1)
    model = RadioModel(RadioConfig.preset("tiny")).eval()
    result = export_onnx(model, tmp_path / "b.onnx", 48, 32, batch_size=2, dynamic_batch=False, check=False)
    assert result.output_names == ["summary", "features"] and result.max_abs_diff == {}
    x = torch.rand(2, 3, 48, 32)
    summary, features = run_onnx(result.path, x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(summary, want.summary, **TOL)
    torch.testing.assert_close(features, want.features, **TOL)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="dimensions"):
        run_onnx(result.path, torch.rand(3, 3, 48, 32))  # the batch axis is fixed at 2


def test_bad_arguments_name_what_was_expected(tmp_path):
    model = RadioModel(RadioConfig.preset("tiny", window_size=2, num_global=1))
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, tmp_path / "x.onnx", 64, 80)
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        export_onnx(model, tmp_path / "x.onnx", 0, 64)
    with pytest.raises(ValueError, match="feature_fmt"):
        export_onnx(model, tmp_path / "x.onnx", 64, 64, feature_fmt="NCL")
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, tmp_path / "x.onnx", 64, 64, batch_size=0)
    with pytest.raises(ValueError, match="opset_version must be None or an int >= 18"):
        export_onnx(model, tmp_path / "x.onnx", 64, 64, opset_version=17)
    with pytest.raises(ValueError, match="float32 model"):
        export_onnx(RadioModel(RadioConfig.preset("tiny")).to(torch.bfloat16), tmp_path / "x.onnx", 64, 64)
    with pytest.raises(TypeError, match="RadioModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", 64, 64)
    assert not (tmp_path / "x.onnx").exists()  # every refusal comes before anything is written


def test_model_is_restored_when_the_export_fails(tmp_path, monkeypatch):
    model = RadioModel(RadioConfig.preset("tiny", attention_backend="auto"))

    def broken(*args, **kwargs):
        assert not model.training and model.config.attention_backend == "torch"
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, tmp_path / "x.onnx", np.int64(32), 32)  # numpy ints are ints
    assert model.training and model.config.attention_backend == "auto"


def test_cli_export_onnx(tmp_path, capsys):
    windowed_student().save_pretrained(tmp_path / "model")
    out = tmp_path / "model.onnx"
    assert (
        cli_main(["export-onnx", "--model", str(tmp_path / "model"), "--out", str(out), "--resolution", "64", "64"])
        == 0
    )
    printed = capsys.readouterr().out
    assert out.exists() and "sam3.features" in printed and "max |onnxruntime - torch|" in printed
    assert len(run_onnx(out, torch.rand(3, 3, 64, 64))) == 7  # the CLI's default export takes any batch
    assert (
        cli_main(["export-onnx", "--model", str(tmp_path / "model"), "--out", str(out), "--resolution", "64", "70"])
        == 2
    )
    assert "multiples of 32" in capsys.readouterr().err
