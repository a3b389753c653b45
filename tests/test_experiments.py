"""Smoke test of bench/experiments: every experiment end to end at a seconds-long budget.

The numbers at this budget mean nothing; what is checked is that each experiment runs, writes its
files, and reports the documented keys as finite numbers of the right type.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.experiments import balanced_summary, fixed_pattern, resolution_consistency
from bench.experiments.fixed_pattern import blurred_pattern, shift_probabilities


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_fixed_pattern_smoke(tmp_path):
    result = fixed_pattern.run(tmp_path, fixed_pattern.Budget.smoke(), log=lambda *a: None)
    saved = json.loads((tmp_path / "fixed_pattern.json").read_text())
    assert (tmp_path / "fixed_pattern.png").stat().st_size > 1000
    for key in ("noise_reproduced_with_shift", "noise_reproduced_without_shift", "noise_reproduced_ideal_with_shift"):
        assert _finite(saved[key]) and saved[key] == pytest.approx(result[key])
    assert 0 < saved["noise_reproduced_ideal_with_shift"] < 1
    assert saved["p_no_shift"] == pytest.approx(0.4661, abs=1e-3)  # P(round(N(0, 0.5)) = 0)^2


def test_shift_probabilities_and_blur():
    p = shift_probabilities(0.5, 2)
    assert p.sum().item() == pytest.approx(1.0) and torch.equal(p, p.flip(0))
    assert shift_probabilities(0.0, 2).tolist() == [0, 0, 1, 0, 0]
    g = torch.randn(5, 5, 3)
    torch.testing.assert_close(blurred_pattern(g, shift_probabilities(0.0, 2)), g)  # no shifts: no blur
    flat = torch.ones(5, 5, 3)
    torch.testing.assert_close(blurred_pattern(flat, p), flat)  # an average keeps constants


def test_balanced_summary_smoke(tmp_path):
    budget = balanced_summary.Budget.smoke()
    result = balanced_summary.run(tmp_path, budget, log=lambda *a: None)
    saved = json.loads((tmp_path / "balanced_summary.json").read_text())
    for loss in ("cosine", "balanced"):  # the shape: {loss: {teacher: value}}
        assert set(saved[loss]) == {"siglip2", "dinov3"}
        assert all(_finite(v) and v >= 0 for v in saved[loss].values())
        assert _finite(saved["spread"][loss]) and saved["spread"][loss] >= 1
        assert set(saved["training_images"][loss]) == {"siglip2", "dinov3"}
    for split in ("heldout", "training_images"):
        tab = saved[split]
        assert set(tab["relative_error"]) == {"cosine", "balanced", "alone"}
        assert set(tab["penalty"]) == {"cosine", "balanced"}
        for v in tab["relative_error"]["alone"].values():
            assert v["min"] <= v["mean"] <= v["max"]
        assert 0 <= tab["seeds_more_even"] <= len(budget.seeds)
    # The constructed teachers hit their target dispersions (on the calibration crops).
    (seed,) = saved["per_seed"]
    for name, target in budget.dispersions.items():
        assert seed["dispersion"][name] == pytest.approx(target, rel=1e-3)
    assert "| held-out images | balanced |" in balanced_summary.markdown(result)


def test_balanced_summary_student_paired_and_inputs_checked():
    """Every arm of a seed starts from the same student (paired design); bad arms and targets raise."""
    budget = balanced_summary.Budget.smoke()
    bank = torch.rand(16, 3, 64, 64)
    teachers = {
        name: balanced_summary.SummaryTeacher("siglip2", i, bank, d)
        for i, (name, d) in enumerate(budget.dispersions.items())
    }
    a, b = (balanced_summary.make_student(teachers, budget, seed=0) for _ in range(2))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert a.adaptors["siglip2"].spec.cls_index == a.adaptors["dinov3"].spec.cls_index == 0  # shared CLS
    targets = {n: t.summary(bank) for n, t in teachers.items()}
    with pytest.raises(ValueError, match="loss_kind"):
        balanced_summary.train_student(teachers, bank, targets, budget, 0, "alone:sam3")
    with pytest.raises(ValueError, match="dispersion target"):
        balanced_summary.SummaryTeacher("siglip2", 0, bank, 3.5)  # wider than a centred cloud can be


def test_resolution_consistency_smoke(tmp_path):
    budget = resolution_consistency.Budget.smoke()
    result = resolution_consistency.run(tmp_path, budget, log=lambda *a: None)
    saved = json.loads((tmp_path / "resolution_consistency.json").read_text())
    assert (tmp_path / "resolution_consistency.png").stat().st_size > 1000
    assert saved["resolutions"] == [64, 80, 96, 112, 128] and saved["partitions"] == ["low"] * 3 + ["high"] * 2
    assert set(saved["teachers"]) == {"siglip2", "dinov3", "sam3"}
    for name, t in saved["teachers"].items():
        for model in ("before", "after", "ema"):
            assert len(t["spatial"][model]) == 5 and all(_finite(v) for v in t["spatial"][model])
            summaries = t["summary"][model]
            assert all(v is None for v in summaries) if name == "sam3" else all(_finite(v) for v in summaries)
    assert saved["teachers"]["siglip2"]["view_mode"] == ["plain"] * 3 + ["tile"] * 2
    assert result["run_dir"] is None  # temporary run removed
