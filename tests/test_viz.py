"""radio.viz (PCA-to-RGB) and the ``radio viz`` subcommand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radio.cli import main as radio_main
from radio.cli_viz import parse_teacher_spec
from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.viz import feature_panels, fit_size, pca_rgb


def test_pca_rgb_shape_range_and_dtype():
    torch.manual_seed(0)
    (rgb,) = pca_rgb(torch.randn(5, 7, 16))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert rgb.min() == 0 and rgb.max() == 1  # quantile scaling uses the full range


def test_pca_rgb_constant_map_is_grey():
    for value in (0.0, 3.0, -1e6):
        (rgb,) = pca_rgb(torch.full((4, 4, 8), value))
        assert np.all(rgb == 0.5)


def test_pca_rgb_nearly_constant_map_shows_no_roundoff_noise():
    x = torch.full((4, 4, 8), 1000.0, dtype=torch.float64)
    x += torch.randn(4, 4, 8, dtype=torch.float64) * 1e-12  # far below rtol * ||x||
    (rgb,) = pca_rgb(x)
    assert np.all(rgb == 0.5)


def test_pca_rgb_rank_one_varies_in_red_only():
    t = torch.linspace(-1, 1, 12).reshape(3, 4, 1)
    x = t * torch.randn(1, 1, 6) + 2.0  # every token on one line through a point
    (rgb,) = pca_rgb(x)
    assert rgb[..., 0].std() > 0.2
    assert np.all(rgb[..., 1:] == 0.5)
    # The red channel follows the (sign-fixed) position on the line monotonically.
    red = rgb[..., 0].reshape(-1)
    assert np.all(np.diff(red) >= 0) or np.all(np.diff(red) <= 0)


def test_pca_rgb_is_invariant_to_sign_shift_and_scale():
    torch.manual_seed(1)
    x = torch.randn(6, 6, 10) ** 3  # skewed, so the sign rule is well defined
    (ref,) = pca_rgb(x)
    for y in (-x, x + 5.0, 3.0 * x):
        np.testing.assert_allclose(pca_rgb(y)[0], ref, atol=1e-5)


def test_pca_rgb_joint_fit_shares_one_basis():
    torch.manual_seed(2)
    a, b = torch.randn(4, 4, 8) ** 3, torch.randn(3, 5, 8) ** 3
    joint = pca_rgb([a, b])
    assert [m.shape for m in joint] == [(4, 4, 3), (3, 5, 3)]
    # One map repeated: both copies get identical colours, equal to its own per-map fit (min/max
    # scaling, quantile=0: duplicating every token leaves the basis and the range unchanged).
    twice = pca_rgb([a, a.clone()], quantile=0.0)
    np.testing.assert_array_equal(twice[0], twice[1])
    np.testing.assert_allclose(twice[0], pca_rgb(a, quantile=0.0)[0], atol=1e-5)


def test_pca_rgb_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        pca_rgb(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match=r"\(h, w, C\)"):
        pca_rgb(torch.randn(4, 4))
    with pytest.raises(ValueError, match="channels"):
        pca_rgb([torch.randn(2, 2, 4), torch.randn(2, 2, 5)])
    with pytest.raises(TypeError):
        pca_rgb([])
    with pytest.raises(ValueError, match="quantile"):
        pca_rgb(torch.randn(2, 2, 3), quantile=0.5)


def test_fit_size_snaps_and_keeps_aspect():
    assert fit_size(300, 450, 256, 16) == (176, 256)
    assert fit_size(10, 1000, 64, 16) == (16, 64)  # never below one step
    with pytest.raises(ValueError):
        fit_size(0, 10, 64, 16)


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    model = RadioModel(RadioConfig.preset("tiny"), [AdaptorSpec("dinov3", 32, 32), AdaptorSpec("sam3", None, 32)])
    model.save_pretrained(tmp_path / "model")
    return model


def test_feature_panels_lists_every_map(tmp_path):
    model = _tiny_model(tmp_path)
    image = torch.rand(3, 40, 70)
    panels = feature_panels(image, model, long_side=64)
    assert [t for t, _ in panels] == ["input", "student backbone", "student -> dinov3", "student -> sam3"]
    assert panels[1][1].shape == (2, 4, 3)  # 40x70 -> 32x64 pixels -> 2x4 tokens
    with pytest.raises(ValueError, match="nothing to show"):
        feature_panels(image)


def test_radio_viz_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    _tiny_model(tmp_path)
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out" / "viz.png"
    argv = ["viz", str(image), "--model", str(tmp_path / "model"), "--teachers", "dinov3", "sam3"]
    assert radio_main([*argv, "--size", "64", "--out", str(out)]) == 0
    assert "5 feature maps" in capsys.readouterr().out  # backbone, 2 adaptors, 2 teachers
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_radio_viz_cli_errors(tmp_path, capsys):
    image = tmp_path / "missing.png"
    assert radio_main(["viz", str(image), "--teachers", "dinov3", "--out", str(tmp_path / "o.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"not an image")
    assert radio_main(["viz", str(tmp_path / "x.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert "nothing to show" in capsys.readouterr().err
    assert radio_main(["viz", str(tmp_path / "x.png"), "--teachers", "dinov3", "--out", "o.png"]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_parse_teacher_spec():
    assert parse_teacher_spec("dinov3") == ("dinov3", None)
    assert parse_teacher_spec("sam3=facebook/sam3") == ("sam3", "facebook/sam3")
    for bad in ("clip", "dinov3=", "=path"):
        with pytest.raises(ValueError, match="--teachers"):
            parse_teacher_spec(bad)
