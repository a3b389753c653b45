"""The PyTorch references are the definitions the kernels are judged by: check them on their own.

gradcheck in float64 for every op, brute-force loops for the shifted MSE, and the edge cases
(empty overlap, parallel / antiparallel / zero / tiny / huge vectors, constant features).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from radio_kernels import reference

f64 = torch.float64


def _shift(*rows):
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# shifted_mse
# ----------------------------------------------------------------------------------------
def _shifted_mse_loops(s, t, shift):
    """Literal definition: sum over valid cells of ||s - t_shifted||^2 / (C * #valid)."""
    total, count = 0.0, 0
    B, Hs, Ws, C = s.shape
    for b in range(B):
        dy, dx = (int(v) for v in shift[b])
        for i in range(Hs):
            for j in range(Ws):
                if 0 <= i + dy < t.shape[1] and 0 <= j + dx < t.shape[2]:
                    total += float((s[b, i, j] - t[b, i + dy, j + dx]).square().sum())
                    count += 1
    return total / (C * count) if count else 0.0


@pytest.mark.parametrize(
    "shapes,shift",
    [
        (((2, 4, 5, 3), (2, 4, 5, 3)), _shift([0, 0], [1, -1])),
        (((2, 3, 6, 2), (2, 5, 4, 2)), _shift([-2, 3], [4, -1])),
        (((1, 3, 3, 1), (1, 3, 3, 1)), _shift([5, 0])),  # overlap empty
        (((3, 2, 2, 4), (3, 6, 7, 4)), _shift([3, 5], [-1, -1], [0, 2])),
    ],
)
def test_shifted_mse_matches_loops(shapes, shift):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shapes[0], generator=g, dtype=f64)
    t = torch.randn(*shapes[1], generator=g, dtype=f64)
    assert reference.shifted_mse(s, t, shift).item() == pytest.approx(_shifted_mse_loops(s, t, shift), rel=1e-12)


def test_shifted_mse_gradcheck():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=f64, requires_grad=True)
    t = torch.randn(2, 4, 3, 5, generator=g, dtype=f64)
    shift = _shift([1, -1], [-2, 0])
    assert gradcheck(lambda s: reference.shifted_mse(s, t, shift), (s,))


def test_shifted_mse_empty_overlap_is_exactly_zero():
    s = torch.randn(2, 3, 3, 4, dtype=f64, requires_grad=True)
    t = torch.randn(2, 3, 3, 4, dtype=f64)
    loss = reference.shifted_mse(s, t, _shift([3, 0], [0, -3]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_overlap_bounds():
    lo, hi = reference.overlap_bounds(5, 3, torch.tensor([-2, 0, 1, 3, -9]))
    # student index i is valid when 0 <= i + shift < 3
    assert lo.tolist() == [2, 0, 0, 0, 5]
    assert hi.tolist() == [5, 3, 2, 0, 5]


# ----------------------------------------------------------------------------------------
# mesa_loss
# ----------------------------------------------------------------------------------------
def test_mesa_is_shifted_mse_of_layer_norms():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 6, generator=g, dtype=f64) * 3 + 1
    e = torch.randn(2, 4, 3, 6, generator=g, dtype=f64)
    shift = _shift([1, 0], [0, -1])
    want = reference.shifted_mse(F.layer_norm(s, (6,), eps=1e-6), F.layer_norm(e, (6,), eps=1e-6), shift)
    assert reference.mesa_loss(s, e, shift).item() == pytest.approx(want.item(), rel=1e-12)
    # shift=None is the zero shift
    e_same = torch.randn(2, 3, 4, 6, generator=g, dtype=f64)
    assert reference.mesa_loss(s, e_same, None).item() == pytest.approx(
        reference.mesa_loss(s, e_same, _shift([0, 0], [0, 0])).item(), rel=1e-14
    )


def test_mesa_gradcheck_and_scale_invariance():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, 5, generator=g, dtype=f64, requires_grad=True)
    e = torch.randn(2, 3, 3, 5, generator=g, dtype=f64)
    shift = _shift([1, 1], [0, -2])
    assert gradcheck(lambda s: reference.mesa_loss(s, e, shift), (s,), fast_mode=True)
    # LN removes per-token affine changes of the input (up to eps)
    a = reference.mesa_loss(s, e, shift, eps=1e-12)
    b = reference.mesa_loss(3 * s + 7, e, shift, eps=1e-12)
    assert a.item() == pytest.approx(b.item(), rel=1e-9)


def test_mesa_constant_features_are_finite():
    s = torch.full((1, 2, 2, 8), 0.3, dtype=f64, requires_grad=True)
    e = torch.full((1, 2, 2, 8), -2.0, dtype=f64)
    loss = reference.mesa_loss(s, e, None)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------
# angle, angular_loss, angular_dispersion
# ----------------------------------------------------------------------------------------
def test_angle_matches_arccos_where_well_conditioned():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 9, generator=g, dtype=f64)
    y = torch.randn(64, 9, generator=g, dtype=f64)
    want = torch.arccos(F.cosine_similarity(x, y, dim=-1))
    torch.testing.assert_close(reference.angle(x, y), want, rtol=1e-10, atol=1e-10)


def test_angle_edge_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    y = torch.randn(6, 7, generator=g, dtype=f64)
    x = torch.stack([3 * y[0], -0.5 * y[1], torch.zeros(7, dtype=f64), 1e-35 * y[3], 1e200 * y[4], y[5]])
    y = y.clone()
    y[5] = 0  # zero teacher row
    x.requires_grad_()
    theta = reference.angle(x, y)
    want = [0.0, math.pi, math.pi / 2, 0.0, 0.0, math.pi / 2]
    # parallel rows bottom out at Theta ~ 2**-20 (the chord clamp), not 0
    torch.testing.assert_close(theta.detach(), torch.tensor(want, dtype=f64), rtol=0, atol=2e-6)
    (theta.square().sum()).backward()
    assert torch.isfinite(x.grad).all()
    # parallel / antiparallel: zero gradient of Theta^2; zero rows: zero gradient by convention
    assert x.grad[[0, 1, 2, 5]].abs().max().item() < 1e-6


def test_angle_tiny_and_huge_norms_in_float32():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 33, generator=g)
    y = torch.randn(4, 33, generator=g)
    want = reference.angle(x.double(), y.double())
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(reference.angle(x * scale, y).double(), want, rtol=1e-5, atol=1e-6)


def test_angular_gradchecks():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, generator=g, dtype=f64, requires_grad=True)
    y = torch.randn(5, 6, generator=g, dtype=f64)
    assert gradcheck(lambda x: reference.angular_loss(x, y, 0.8), (x,))
    yy = torch.randn(7, 4, generator=g, dtype=f64, requires_grad=True)
    assert gradcheck(reference.angular_dispersion, (yy,))
    # near-parallel and near-antiparallel rows: still smooth enough for finite differences
    x2 = (y + 1e-3 * torch.randn(5, 6, generator=g, dtype=f64)).requires_grad_()
    x2.data[1] = -y[1] + 1e-3
    assert gradcheck(lambda x: reference.angular_loss(x, y, 1.3), (x2,))


def test_angular_loss_and_dispersion_values():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 5, generator=g, dtype=f64)
    y = torch.randn(10, 5, generator=g, dtype=f64)
    theta = torch.arccos(F.cosine_similarity(x, y, dim=-1))
    assert reference.angular_loss(x, y, 0.5).item() == pytest.approx((theta.square().mean() / 0.5).item())
    mu = y.mean(0) / y.mean(0).norm()
    disp = torch.arccos(F.cosine_similarity(y, mu.expand_as(y), dim=-1)).square().mean()
    assert reference.angular_dispersion(y).item() == pytest.approx(disp.item(), rel=1e-10)
    # identical directions: dispersion 0
    assert reference.angular_dispersion(torch.rand(1, 5, dtype=f64) * torch.rand(6, 1, dtype=f64)).item() < 1e-11


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
ATTN_CASES = [  # (N, num_prefix, window_tokens)
    (9, 0, 0),
    (12, 0, 4),
    (11, 3, 4),
    (7, 7, 0),
]


@pytest.mark.parametrize("n,prefix,window", ATTN_CASES)
def test_attention_reference_matches_dense(n, prefix, window):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g, dtype=f64) for _ in range(3))
    out = reference.attention(q, k, v, num_prefix=prefix, window_tokens=window, scale=0.7)
    want = reference.attention_dense(q, k, v, prefix, window, 0.7)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_attention_mask_semantics():
    m = reference.attention_mask(7, 1, 3)
    assert m[0].all() and m[:, 0].all()  # prefix sees all, seen by all
    assert m[1, 3] and not m[1, 4] and m[4, 6] and not m[6, 2]


@pytest.mark.parametrize("n,prefix,window", [(6, 0, 0), (8, 0, 4), (7, 1, 3)])
def test_attention_reference_gradcheck(n, prefix, window):
    g = torch.Generator().manual_seed(10 + n)
    q, k, v = (torch.randn(1, 1, n, 3, generator=g, dtype=f64, requires_grad=True) for _ in range(3))
    assert gradcheck(lambda q, k, v: reference.attention(q, k, v, prefix, window), (q, k, v), fast_mode=True)


def test_attention_flops_counts_visible_pairs():
    for n, p, t in [(9, 0, 0), (11, 3, 4)]:
        pairs = int(reference.attention_mask(n, p, t).sum())
        assert reference.attention_flops(n, p, t, d=8, batch_heads=6) == 4.0 * 6 * pairs * 8
