"""Smoke tests of the recipe experiments (ViTDet-mode training, DAMP robustness, SAM3 large views) and their
corruptions."""

from __future__ import annotations

import json
import math

import torch

from bench.experiments import damp_robustness, sam3_views, vitdet_training
from bench.experiments.trained import CORRUPTIONS, corrupt


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_corruptions_change_the_view_and_keep_its_format():
    views = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    for kind in CORRUPTIONS:
        out = corrupt(views, kind, seed=0)
        assert out.dtype == torch.uint8 and out.shape == views.shape
        assert torch.equal(out, views) == (kind == "clean"), kind
    assert torch.equal(corrupt(views, "noise", 3), corrupt(views, "noise", 3))  # seeded


def test_vitdet_training_smoke(tmp_path):
    result = vitdet_training.run(tmp_path, vitdet_training.Budget.smoke(), log=lambda *a: None)
    saved = json.loads((tmp_path / "vitdet_training.json").read_text())
    assert set(saved["mean_spatial"]) == set(vitdet_training.ARMS)
    for modes in saved["mean_spatial"].values():
        assert set(modes) == set(vitdet_training.INFERENCE) and all(_finite(v) for v in modes.values())
    assert "| ViTDet-mode training |" in vitdet_training.markdown(result)


def test_damp_robustness_smoke(tmp_path):
    budget = damp_robustness.Budget.smoke()
    result = damp_robustness.run(tmp_path, budget, log=lambda *a: None)
    saved = json.loads((tmp_path / "damp_robustness.json").read_text())
    assert set(saved["mean_spatial"]) == {str(s) for s in budget.sigmas}
    for values in saved["mean_spatial"].values():
        assert set(values) == set(CORRUPTIONS) and all(_finite(v) for v in values.values())
    assert "| damp.sigma |" in damp_robustness.markdown(result)


def test_sam3_views_smoke_measures_padding_against_the_view_alone(tmp_path):
    result = sam3_views.run(tmp_path, sam3_views.Budget.smoke(), log=lambda *a: None)
    saved = json.loads((tmp_path / "sam3_views.json").read_text())
    view = saved["views"]["6"]
    assert view["view_px"] == 84 and view["fraction_of_canvas"] == 0.75
    for mode in ("padded", "resized"):
        assert all(_finite(view[mode][k]) and view[mode][k] >= 0 for k in ("border", "interior"))
    # the measure can tell the two apart: resampling features is far from the view run alone
    assert view["resized"]["border"] > 10 * view["padded"]["border"] and saved["better"] == "padded"
    assert "| 84 px | 0.75 |" in sam3_views.markdown(result)
