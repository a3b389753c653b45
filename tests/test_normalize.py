"""PHI-S normaliser and Hadamard construction."""

import math

import pytest
import torch

from radio.normalize import PHISNormalizer, hadamard, hadamard_or_orthogonal


def _anisotropic(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Correlated features with a wide spectrum and a non-zero mean, like a real teacher's."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, dim, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix.T) * scales + 3.0


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 32, 36, 48, 64, 768, 1024, 1152, 1280, 1536, 4096])
def test_hadamard_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-12)
    # Entries are +-1 after scaling, so the Gram matrix is exact in float32 (fast for n = 4096).
    signs = (h * math.sqrt(n)).round().float()
    assert torch.equal(signs @ signs.T, n * torch.eye(n))


def test_hadamard_rejects_orders_without_construction():
    for n in (3, 6, 10, 52):
        with pytest.raises(ValueError, match="n="):
            hadamard(n)
    with pytest.raises(ValueError, match="positive int"):
        hadamard(0)


def test_orthogonal_fallback_is_deterministic_and_orthogonal():
    with pytest.warns(UserWarning, match="random rotation"):
        a = hadamard_or_orthogonal(10, seed=3)
    with pytest.warns(UserWarning):
        b = hadamard_or_orthogonal(10, seed=3)
    assert torch.equal(a, b)
    assert torch.allclose(a @ a.T, torch.eye(10, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dim", [48, 64])
def test_unit_channel_variance_and_exact_inverse(dim):
    x = _anisotropic(4000, dim)
    phis = PHISNormalizer(dim)
    phis.update(x[:2000])
    phis.update(x[2000:])
    phis.fit()  # fit on everything seen (update 2 alone would not refit)
    y = phis(x)
    assert torch.allclose(y.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(y.var(0, unbiased=False), torch.ones(dim, dtype=torch.float64), atol=1e-8)
    # The raw data is far from unit variance, so this is not vacuous.
    assert x.var(0).max() > 100 and x.var(0).min() < 1e-2
    # ...and PHI-S mixes channels (it is not a per-channel standardisation).
    assert not torch.allclose(y, (x - x.mean(0)) / x.std(0, unbiased=False), atol=1e-3)
    assert torch.allclose(phis.inverse(y), x, atol=1e-9)
    # float32 path: matrices are cast to the input dtype.
    y32 = phis(x.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(phis.inverse(y32), x.float(), rtol=1e-4, atol=1e-3)


def test_non_hadamard_dim_still_invertible():
    with pytest.warns(UserWarning):
        phis = PHISNormalizer(10)
    x = _anisotropic(500, 10)
    phis.update(x)
    assert torch.allclose(phis.inverse(phis(x)), x, atol=1e-9)


def test_leading_dims_and_errors():
    phis = PHISNormalizer(32)
    with pytest.raises(RuntimeError, match="update"):
        phis(torch.randn(4, 32))
    x = torch.randn(2, 5, 7, 32)
    phis.update(x)
    assert phis(x).shape == x.shape
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\)"):
        phis.update(torch.randn(4, 31))
    with pytest.raises(TypeError, match="floating-point"):
        phis.update(torch.ones(4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="refresh_every"):
        PHISNormalizer(32, refresh_every=0)


def test_constant_features_stay_finite():
    phis = PHISNormalizer(32)
    x = torch.full((100, 32), 7.0)
    phis.update(x)
    y = phis(x)
    assert torch.isfinite(y).all() and torch.isfinite(phis.forward_matrix).all()
    assert torch.allclose(y, torch.zeros_like(y))
    assert torch.allclose(phis.inverse(y), x)


def test_refresh_and_freeze_schedule():
    phis = PHISNormalizer(32, refresh_every=3, freeze_after=7)
    refits = [phis.update(torch.randn(16, 32) * (i + 1)) for i in range(10)]
    # Update 1 always fits, then every 3rd, then the freezing update 7; 8.. are ignored.
    assert refits == [True, False, True, False, False, True, True, False, False, False]
    assert int(phis.num_updates) == 7 and int(phis.num_fits) == 4
    assert phis.frozen and float(phis.count) == 7 * 16
    frozen_matrix = phis.forward_matrix.clone()
    phis.update(torch.randn(16, 32) * 100)
    assert torch.equal(phis.forward_matrix, frozen_matrix) and float(phis.count) == 7 * 16


def test_transform_only_changes_on_refresh():
    phis = PHISNormalizer(32, refresh_every=2)
    phis.update(torch.randn(64, 32))
    m1 = phis.forward_matrix.clone()
    phis.update(torch.randn(64, 32) * 5)
    m2 = phis.forward_matrix.clone()
    phis.update(torch.randn(64, 32) * 5)
    assert not torch.equal(m1, m2)  # update 2 refits
    assert torch.equal(m2, phis.forward_matrix)  # update 3 does not


def test_state_dict_round_trip():
    a = PHISNormalizer(32, refresh_every=2, freeze_after=5)
    for i in range(3):
        a.update(_anisotropic(200, 32, seed=i))
    b = PHISNormalizer(32, refresh_every=2, freeze_after=5)
    b.load_state_dict(a.state_dict())
    for key in ("sum", "sum_outer", "count", "num_updates", "mean", "forward_matrix", "inverse_matrix"):
        assert key in a.state_dict()
    x = _anisotropic(50, 32, seed=9)
    assert torch.equal(a(x), b(x))
    # The restored one continues the same schedule: update 4 refits in both.
    nxt = _anisotropic(200, 32, seed=7)
    assert a.update(nxt) and b.update(nxt)
    assert torch.equal(a.forward_matrix, b.forward_matrix)


def test_refresh_keeps_eigenvector_signs():
    """A refit on statistics from the same distribution barely moves the targets.

    eigh fixes each eigenvector only up to its sign; without aligning the new basis with the old
    one a refresh can negate whole output channels that the student has already learnt.
    """
    phis = PHISNormalizer(32, refresh_every=1)
    phis.update(_anisotropic(4000, 32, seed=0))
    x = _anisotropic(500, 32, seed=1)
    before = phis(x)
    for seed in range(2, 6):  # several refits, each a chance for eigh to flip a sign
        phis.update(_anisotropic(4000, 32, seed=seed))
        after = phis(x)
        per_channel = torch.nn.functional.cosine_similarity(before, after, dim=0)
        assert per_channel.min() > 0.9, per_channel


def test_non_advancing_updates_add_statistics_without_ticking_the_schedule():
    """Gradient accumulation: one advancing update per optimizer step, the other micro-batches only add data."""
    a = PHISNormalizer(32, refresh_every=2, freeze_after=6)
    b = PHISNormalizer(32, refresh_every=2, freeze_after=6)
    batches = [_anisotropic(100, 32, seed=i) for i in range(6)]
    for step in range(3):  # accum = 2: micro-batches 2*step (advancing) and 2*step + 1 (not)
        first, second = batches[2 * step], batches[2 * step + 1]
        assert a.update(first) == (step in (0, 1))  # refits at schedule updates 1 and 2 only
        assert not a.update(second, advance=False)
        b.update(torch.cat([first, second]) if step else first)
        if step == 0:
            b.update(second, advance=False)
    assert int(a.num_updates) == 3 and float(a.count) == 600
    # the advancing update of step 1 fitted on everything seen so far (3 micro-batches)
    assert int(a.num_fits) == 2
