"""bench/experiments/featsharp.py: the seam measures and a seconds-long end-to-end run."""

import json

import pytest
import torch

from bench.experiments import featsharp
from bench.experiments.featsharp import seam_deviation_ratio, seam_jump_ratio

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_seam_measures_see_stitched_discontinuities():
    smooth = torch.linspace(0, 1, 12)[None, :, None, None].expand(1, 12, 12, 4).clone()
    assert abs(seam_jump_ratio(smooth, 3) - 1.0) < 1e-5  # a linear ramp: equal steps everywhere
    stitched = smooth.clone()
    stitched[:, 4:8] += 0.5  # the middle tile row offset: jumps at the seams after tokens 3 and 7
    assert seam_jump_ratio(stitched, 3) > 10
    assert seam_deviation_ratio(smooth, smooth, 3) is None
    bump = smooth.clone()
    bump[:, 3:5] += 0.2  # deviation beside the first seam only
    assert seam_deviation_ratio(bump, smooth, 3) > 10


def test_featsharp_experiment_smoke(tmp_path):
    result = featsharp.run(tmp_path, featsharp.Budget.smoke(), log=lambda *a: None)
    saved = json.loads((tmp_path / "featsharp.json").read_text())
    assert saved["targets"].keys() == saved["students"].keys() == set(featsharp.METHODS)
    for group in ("targets", "students"):
        for scores in saved[group].values():
            assert scores["consistency_identity"] >= 0 and scores["consistency_jitter"] >= 0
            assert scores["seam_jump_ratio"] > 0
    assert saved["targets"]["bilinear"]["seam_deviation_ratio"] is None  # the reference itself
    assert "| target | featsharp |" in featsharp.markdown(result)
