"""Triton loss kernels (interpreter on CPU, compiled on a GPU) against the float64 references.

Values and gradients, with a grad_output that is not 1, over random shapes, shifts (including
shifts that leave no overlap), dtypes, non-contiguous layouts and block sizes small enough that
the kernels loop over C in several chunks. Low-precision results are judged against the same
precision's reference (tests/tolerance.py).
"""

import contextlib
import importlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerance import assert_close_to_reference

from radio_kernels import angular_loss, mesa_loss, reference, shifted_mse
from radio_kernels.loss_plan import KernelPlan

# The package re-exports functions named like their modules: fetch the modules themselves.
smse_mod = importlib.import_module("radio_kernels.shifted_mse")
mesa_mod = importlib.import_module("radio_kernels.mesa")
angular_mod = importlib.import_module("radio_kernels.angular")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def feature_map(shape, dtype, layout, gen, scale=1.0, offset=0.0):
    """(B, H, W, C) tensor of ``dtype`` in one of three memory layouts."""
    B, H, W, C = shape
    if layout == "nchw":  # a channels-first map viewed as NHWC: channel stride H * W
        base = torch.randn(B, C, H, W, generator=gen) * scale + offset
        return base.to(DEVICE, dtype).permute(0, 2, 3, 1)
    if layout == "slice":  # every other channel of a wider map: channel stride 2
        base = torch.randn(B, H, W, 2 * C, generator=gen) * scale + offset
        return base.to(DEVICE, dtype)[..., ::2]
    return (torch.randn(B, H, W, C, generator=gen) * scale + offset).to(DEVICE, dtype)


def loss_and_grad(fn, x, *args, grad_output=1.0, **kwargs):
    """(loss, d(grad_output * loss)/dx) for a loss differentiable in its first argument."""
    x = x.detach().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(grad_output, dtype=loss.dtype, device=loss.device))
    return loss.detach(), grad


def check_against_reference(kernel_fn, ref_fn, x, others, grad_output, what, ulps=4.0, math_ulps=0.0):
    """Kernel loss and gradient vs float64 reference, with the same-precision reference's error
    as the budget (the reference computes in float32 for float32/16 inputs)."""
    loss, grad = loss_and_grad(kernel_fn, x, *others, grad_output=grad_output)
    loss64, grad64 = loss_and_grad(ref_fn, x.double(), *(o.double() for o in others), grad_output=grad_output)
    loss_lp, grad_lp = loss_and_grad(ref_fn, x, *others, grad_output=grad_output)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close_to_reference(loss, loss64, loss_lp, ulps=ulps, math_ulps=math_ulps, what=f"{what} loss")
    assert_close_to_reference(grad, grad64, grad_lp, ulps=ulps, math_ulps=math_ulps, what=f"{what} grad")
    return loss, grad


PLAN_NAMES = {smse_mod: "shifted_mse_plan", mesa_mod: "mesa_plan", angular_mod: "angular_plan"}


def small_blocks(module, block_r, block_c):
    """Force tiny chunked tiles so that small C still takes several trips through the channel loops
    (for MESA and angular: the 3-sweep fallback that C > 4096 takes)."""
    passes = 1 if module is smse_mod else 3
    plan = KernelPlan(block_r=block_r, block_c=block_c, num_warps=4, resident=False, passes=passes)
    return mock.patch.object(module, PLAN_NAMES[module], lambda C: plan)


def resident_rows(module, block_r):
    """Force the register-resident layout with ``block_r`` rows per program (several programs on small maps)."""
    real = PLAN_NAMES[module]
    plan_of = getattr(module, real)

    def plan(C):
        base = plan_of(C)
        assert base.resident, "the register-resident plan covers every C the tests use"
        return KernelPlan(block_r=block_r, block_c=base.block_c, num_warps=1, resident=True, passes=1)

    return mock.patch.object(module, real, plan)


def tiles_context(module, tiles: str, chunk_rows: int):
    if tiles == "chunked":
        return small_blocks(module, chunk_rows, 16)
    if tiles == "resident":
        return resident_rows(module, 2)
    return contextlib.nullcontext()  # the plan the wrapper picks


def check_no_grad_loss(kernel_fn, x, others, loss):
    """The loss-only kernels (no gradient stored) give the gradient path's loss."""
    with torch.no_grad():
        plain = kernel_fn(x, *others)
    if DEVICE == "cpu":  # same sums in the same order
        assert torch.equal(plain, loss), (plain, loss)
    else:
        torch.testing.assert_close(plain, loss, rtol=1e-6, atol=0)


shapes_hw = st.integers(1, 6)
channels = st.sampled_from([1, 3, 16, 17, 40, 70])
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(["contiguous", "nchw", "slice"])
grad_outputs = st.sampled_from([1.0, -0.37, 3.5])


# ----------------------------------------------------------------------------------------
# shifted_mse
# ----------------------------------------------------------------------------------------
@given(
    B=st.integers(1, 3),
    Hs=shapes_hw,
    Ws=shapes_hw,
    Ht=shapes_hw,
    Wt=shapes_hw,
    C=channels,
    dtype=dtypes,
    layout=layouts,
    fp32_target=st.booleans(),
    go=grad_outputs,
    tiny_tiles=st.booleans(),
    data=st.data(),
)
def test_shifted_mse_matches_reference(B, Hs, Ws, Ht, Wt, C, dtype, layout, fp32_target, go, tiny_tiles, data):
    gen = torch.Generator().manual_seed(B * 1000 + Hs * 100 + C)
    # |shift| up to 7 > grid size: some samples (or all) have an empty overlap
    shift = torch.tensor(data.draw(st.lists(st.tuples(st.integers(-7, 7), st.integers(-7, 7)), min_size=B, max_size=B)))
    s = feature_map((B, Hs, Ws, C), dtype, layout, gen)
    t = feature_map((B, Ht, Wt, C), torch.float32 if fp32_target else dtype, "contiguous", gen)
    kernel = lambda s, t: shifted_mse(s, t, shift.to(DEVICE), backend="triton")
    ref = lambda s, t: reference.shifted_mse(s, t, shift.to(DEVICE))
    with small_blocks(smse_mod, 4, 16) if tiny_tiles else contextlib.nullcontext():
        loss, _ = check_against_reference(kernel, ref, s, (t,), go, "shifted_mse")
        check_no_grad_loss(kernel, s, (t,), loss)


def test_shifted_mse_multi_chunk_channels():
    gen = torch.Generator().manual_seed(11)
    s = feature_map((2, 3, 2, 300), torch.float32, "contiguous", gen)  # 2 chunks of 256 channels
    t = feature_map((2, 2, 3, 300), torch.float32, "nchw", gen)
    shift = torch.tensor([[0, 1], [-1, 0]], device=DEVICE)
    kernel = lambda s, t: shifted_mse(s, t, shift, backend="triton")
    check_against_reference(kernel, lambda s, t: reference.shifted_mse(s, t, shift), s, (t,), 0.5, "C=300")


@pytest.mark.parametrize("dtype", DTYPES)
def test_shifted_mse_empty_overlap_and_identical_inputs(dtype):
    gen = torch.Generator().manual_seed(12)
    s = feature_map((2, 3, 4, 5), dtype, "contiguous", gen)
    far = torch.tensor([[3, 0], [0, -4]], device=DEVICE)  # no cell lands inside the target
    loss, grad = loss_and_grad(shifted_mse, s, s.clone(), far, backend="triton")
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # shifts far outside int32 (clamped in the kernel) and just off the edges: no overlap either
    for huge in ([[2**40, 0], [0, -(2**40)]], [[3, 0], [0, 4]], [[-3, 0], [0, -4]], [[-(2**62), 2**62], [2, 2**33]]):
        loss, grad = loss_and_grad(shifted_mse, s, s + 1, torch.tensor(huge, device=DEVICE), backend="triton")
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), huge
    zero = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)  # int32 shifts work too
    loss, grad = loss_and_grad(shifted_mse, s, s.clone(), zero, backend="triton")
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_shifted_mse_writes_every_gradient_element():
    gen = torch.Generator().manual_seed(13)
    s = feature_map((2, 3, 3, 19), torch.float32, "slice", gen)
    t = feature_map((2, 3, 3, 19), torch.float32, "contiguous", gen)
    shift = torch.tensor([[1, 0], [0, 5]], device=DEVICE)
    poisoned = torch.full((2, 3, 3, 19), float("nan"), device=DEVICE)
    loss, inv_n, grad = smse_mod.shifted_mse_forward(s, t, shift, grad=poisoned)
    assert grad.data_ptr() == poisoned.data_ptr() and torch.isfinite(grad).all()
    assert inv_n.item() == pytest.approx(1 / (19 * 6), rel=1e-7)  # 6 valid cells, counted by the kernel
    s64 = s.double().requires_grad_()
    ref_sum = reference.shifted_mse(s64, t.double(), shift) * (19 * 6)
    ref_sum.backward()
    torch.testing.assert_close(loss.double() * (19 * 6), ref_sum.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------
# mesa_loss
# ----------------------------------------------------------------------------------------
@given(
    B=st.integers(1, 3),
    Hs=shapes_hw,
    Ws=shapes_hw,
    C=st.sampled_from([1, 2, 7, 16, 40, 130]),
    dtype=dtypes,
    layout=layouts,
    use_shift=st.booleans(),
    go=grad_outputs,
    tiles=st.sampled_from(["plan", "resident", "chunked"]),
    offset=st.sampled_from([0.0, 20.0]),  # a large common offset tests the variance merge / two-pass variance
    data=st.data(),
)
def test_mesa_matches_reference(B, Hs, Ws, C, dtype, layout, use_shift, go, tiles, offset, data):
    gen = torch.Generator().manual_seed(B * 1000 + Hs * 100 + C)
    if use_shift:
        Ht, Wt = data.draw(shapes_hw), data.draw(shapes_hw)
        pairs = st.tuples(st.integers(-7, 7), st.integers(-7, 7))
        shift = torch.tensor(data.draw(st.lists(pairs, min_size=B, max_size=B)), device=DEVICE)
    else:
        Ht, Wt, shift = Hs, Ws, None
    s = feature_map((B, Hs, Ws, C), dtype, layout, gen, scale=3.0, offset=offset)
    e = feature_map((B, Ht, Wt, C), dtype, "contiguous", gen, offset=offset)
    kernel = lambda s, e: mesa_loss(s, e, shift, backend="triton")
    ref = lambda s, e: reference.mesa_loss(s, e, shift)
    with tiles_context(mesa_mod, tiles, chunk_rows=2):
        loss, _ = check_against_reference(kernel, ref, s, (e,), go, "mesa")
        check_no_grad_loss(kernel, s, (e,), loss)


@pytest.mark.parametrize("C", [2100, 4200])  # a register-resident row over 2-4 warps; 3 chunks of 2048 in the fallback
def test_mesa_wide_rows(C):
    assert mesa_mod.mesa_plan(C).resident == (C <= 4096)
    gen = torch.Generator().manual_seed(21)
    s = feature_map((1, 2, 1, C), torch.float32, "nchw", gen, scale=2.0, offset=5.0)
    e = feature_map((1, 2, 1, C), torch.float32, "contiguous", gen)
    kernel = lambda s, e: mesa_loss(s, e, backend="triton")
    check_against_reference(kernel, lambda s, e: reference.mesa_loss(s, e, None), s, (e,), -2.0, f"C={C}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mesa_constant_and_identical_features(dtype):
    # constant tokens: variance 0, LN output 0; finite loss and gradient
    s = torch.full((2, 2, 3, 9), 0.75, device=DEVICE, dtype=dtype)
    e = torch.full((2, 2, 3, 9), -3.0, device=DEVICE, dtype=dtype)
    loss, grad = loss_and_grad(mesa_loss, s, e, backend="triton")
    assert torch.isfinite(grad).all()
    loss64, grad64 = loss_and_grad(reference.mesa_loss, s.double(), e.double(), None)
    assert_close_to_reference(loss, loss64, atol=1e-6)
    assert_close_to_reference(grad, grad64, atol=1e-4)  # rstd = 1/sqrt(eps) amplifies mean rounding
    # student == EMA: exactly zero up to rounding, zero gradient
    x = feature_map((2, 3, 3, 10), dtype, "contiguous", torch.Generator().manual_seed(22))
    loss, grad = loss_and_grad(mesa_loss, x, x.clone(), backend="triton")
    assert loss.item() < 1e-10 and grad.abs().max().item() < 1e-5


def test_mesa_writes_every_gradient_element():
    gen = torch.Generator().manual_seed(23)
    s = feature_map((1, 3, 4, 21), torch.float16, "nchw", gen)
    e = feature_map((1, 3, 4, 21), torch.float16, "contiguous", gen)
    shift = torch.tensor([[1, -2]], device=DEVICE)
    for tiles in ("plan", "resident", "chunked"):
        poisoned = torch.full((1, 3, 4, 21), float("nan"), dtype=torch.float32, device=DEVICE)  # fp16 sums: fp32
        with tiles_context(mesa_mod, tiles, chunk_rows=4):
            _, inv_n, grad = mesa_mod.mesa_forward(s, e, shift, 1e-6, grad=poisoned)
        assert torch.isfinite(grad).all(), tiles
        assert (grad[:, 2:] == 0).all() and (grad[:, :, :2] == 0).all()  # off the overlap
        assert (grad[:, :2, 2:] != 0).any()
        assert inv_n.item() == pytest.approx(1 / (21 * 2 * 2), rel=1e-7)  # 2 x 2 cells overlap


# ----------------------------------------------------------------------------------------
# angular_loss
# ----------------------------------------------------------------------------------------
def summaries(B, C, dtype, layout, gen, scale=1.0):
    if layout == "transposed":  # (C, B) storage viewed as (B, C)
        return (torch.randn(C, B, generator=gen) * scale).to(DEVICE, dtype).t()
    if layout == "slice":
        return (torch.randn(B, 3 * C, generator=gen) * scale).to(DEVICE, dtype)[:, 1::3]
    return (torch.randn(B, C, generator=gen) * scale).to(DEVICE, dtype)


@given(
    B=st.integers(1, 40),
    C=st.sampled_from([1, 2, 7, 16, 33, 130]),
    dtype=dtypes,
    layout=st.sampled_from(["contiguous", "transposed", "slice"]),
    go=grad_outputs,
    dispersion=st.sampled_from([0.694, 2.186]),
    tiles=st.sampled_from(["plan", "resident", "chunked"]),
    near=st.sampled_from(["random", "near_parallel", "near_antiparallel"]),
)
def test_angular_matches_reference(B, C, dtype, layout, go, dispersion, tiles, near):
    gen = torch.Generator().manual_seed(B * 100 + C)
    x = summaries(B, C, dtype, layout, gen)
    y = summaries(B, C, torch.float32, "contiguous", gen)
    if near != "random":  # y close to +-x: the regime where arccos(cos) loses all accuracy
        sign = 1.0 if near == "near_parallel" else -1.0
        y = sign * x.float() + 0.01 * y
    kernel = lambda x, y: angular_loss(x, y, dispersion, backend="triton")
    ref = lambda x, y: reference.angular_loss(x, y, dispersion)
    with tiles_context(angular_mod, tiles, chunk_rows=4):
        # Near +-x the angle is ill-conditioned: unit vectors carry ~eps absolute error, so Theta
        # has relative error ~eps / Theta (~1e-4 here) on any float32 path, and the two paths
        # round independently. Allow that (still far below what a wrong formula gives).
        # The slack is in float32 ulps (the math's precision), not in the storage dtype's.
        check_against_reference(kernel, ref, x, (y,), go, "angular", math_ulps=0.0 if near == "random" else 1024.0)


@pytest.mark.parametrize("C", [2100, 4200])  # a register-resident row over 2-4 warps; 3 chunks of 2048 in the fallback
def test_angular_wide_rows_and_tensor_dispersion(C):
    assert angular_mod.angular_plan(C).resident == (C <= 4096)
    gen = torch.Generator().manual_seed(31)
    x = summaries(3, C, torch.float32, "transposed", gen)
    y = summaries(3, C, torch.float32, "contiguous", gen)
    disp = torch.tensor(0.9, device=DEVICE)
    kernel = lambda x, y: angular_loss(x, y, disp, backend="triton")
    check_against_reference(kernel, lambda x, y: reference.angular_loss(x, y, 0.9), x, (y,), 1.5, f"C={C}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_angular_edge_rows(dtype):
    gen = torch.Generator().manual_seed(32)
    x = summaries(6, 24, dtype, "contiguous", gen)
    x[2] = 0  # zero student row
    y = x.float() * torch.tensor([1.0, -1.0, 1.0, 0.0, 2.0, 0.25], device=DEVICE)[:, None]
    # rows: parallel, antiparallel, zero student, zero teacher, parallel (x2), parallel (/4)
    loss, grad = loss_and_grad(angular_loss, x, y, 2.0, backend="triton")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    theta2 = torch.tensor([0, torch.pi**2, (torch.pi / 2) ** 2, (torch.pi / 2) ** 2, 0, 0])
    assert loss.item() == pytest.approx(theta2.sum().item() / (6 * 2.0), rel=1e-5)
    # parallel, antiparallel, zero rows: gradient 0 (a zero row's direction is undefined)
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_angular_tiny_and_huge_norms(scale):
    gen = torch.Generator().manual_seed(33)
    x = summaries(8, 40, torch.float32, "contiguous", gen)
    y = summaries(8, 40, torch.float32, "contiguous", gen)
    loss, grad = loss_and_grad(angular_loss, x * scale, y, 1.0, backend="triton")
    loss64, grad64 = loss_and_grad(reference.angular_loss, x.double(), y.double(), 1.0)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
    # d/dx of a scale-invariant loss scales as 1/scale
    torch.testing.assert_close(grad.double() * scale, grad64, rtol=1e-4, atol=1e-6 * grad64.abs().max().item())


def test_angular_writes_every_gradient_element():
    gen = torch.Generator().manual_seed(34)
    x = summaries(5, 37, torch.bfloat16, "slice", gen)
    y = summaries(5, 37, torch.bfloat16, "transposed", gen)
    poisoned = torch.full((5, 37), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    loss, inv_n, grad = angular_mod.angular_forward(x, y, 0.5, grad=poisoned)
    assert torch.isfinite(grad).all() and loss.item() > 0 and inv_n.item() == pytest.approx(1 / (5 * 0.5))


def test_atan2_polynomial_accuracy():
    """The core-tl atan2 used by the kernel, over many decades of both arguments."""
    import triton
    import triton.language as tl

    @triton.jit
    def atan2_kernel(y_ptr, x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(y_ptr + offs, mask=mask, other=1.0)
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        tl.store(out_ptr + offs, angular_mod.atan2_nonneg(y, x), mask=mask)

    gen = torch.Generator().manual_seed(35)
    n = 4096
    y = (torch.rand(n, generator=gen) * 10.0 ** torch.randint(-12, 12, (n,), generator=gen)).to(DEVICE)
    x = (torch.rand(n, generator=gen) * 10.0 ** torch.randint(-12, 12, (n,), generator=gen)).to(DEVICE)
    y[:4] = torch.tensor([0.0, 1.0, 1.0, 2.0])
    x[:4] = torch.tensor([1.0, 0.0, 1.0, 2.0 * 0.41421356])
    out = torch.empty_like(x)
    atan2_kernel[(triton.cdiv(n, 1024),)](y, x, out, n, BLOCK=1024)
    want = torch.atan2(y.double(), x.double())
    rel = ((out.double() - want).abs() / want.clamp(min=1e-30)).max().item()
    assert rel < 4 * 2.0**-23, rel


def test_backward_twice_with_retained_graph():
    gen = torch.Generator().manual_seed(36)
    s = feature_map((1, 3, 3, 8), torch.float32, "contiguous", gen).requires_grad_()
    t = feature_map((1, 3, 3, 8), torch.float32, "contiguous", gen)
    loss = shifted_mse(s, t, torch.tensor([[1, 0]], device=DEVICE), backend="triton")
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    s = torch.randn(2, 3, 3, 4)
    shift = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="student"):
        shifted_mse(s[0], s, shift, backend="triton")
    with pytest.raises(ValueError, match="target"):
        shifted_mse(s, torch.randn(2, 3, 3, 5), shift, backend="triton")
    with pytest.raises(ValueError, match="shift"):
        shifted_mse(s, s, shift.float(), backend="triton")
    with pytest.raises(ValueError, match="shift"):
        shifted_mse(s, s, shift[:1], backend="triton")
    with pytest.raises(ValueError, match="one device"):
        shifted_mse(s, s.to("meta"), shift, backend="triton")
    with pytest.raises(ValueError, match="ema"):
        mesa_loss(s, torch.randn(2, 3, 4, 4), backend="triton")  # shapes differ and shift is None
    with pytest.raises(ValueError, match="eps"):
        mesa_loss(s, s, eps=0.0, backend="triton")
    x = torch.randn(4, 6)
    for bad in (0.0, -1.0, torch.tensor(-0.5), float("nan")):
        with pytest.raises(ValueError, match="dispersion"):
            angular_loss(x, x, bad, backend="triton")
    with pytest.raises(ValueError, match="dispersion must be on"):
        angular_loss(x, x, torch.tensor(1.0, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="x and y"):
        angular_loss(x, x[:, :5], 1.0, backend="triton")
    with pytest.raises(ValueError, match="rank"):
        angular_loss(x[0], x[0], 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        angular_loss(x, x, 1.0, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: needs > 2**31 elements of device memory")
def test_shifted_mse_int64_offsets_on_gpu():
    # 2**31 + elements: offsets past int32 range must address the right cells
    s = torch.randn(2, 256, 256, 16400, device="cuda", dtype=torch.bfloat16)
    t = s.clone()
    t[-1, -1, -1] += 1
    loss = shifted_mse(s, t, torch.zeros(2, 2, dtype=torch.long, device="cuda"), backend="triton")
    assert loss.item() == pytest.approx(16400 / s.numel(), rel=1e-2)


def test_float16_gradients_do_not_overflow_in_the_summed_store():
    """The kernels store the gradient of the sum (N x the gradient); in fp16 that sum can pass 65504.

    A near-constant student token (LayerNorm factor ~1e3) against a one-hot EMA token, and a
    difference of 4e4, both gave inf before the summed gradient was kept in fp32 for fp16 inputs.
    """
    gen = torch.Generator().manual_seed(3)
    C = 1280
    s = (0.5 + 1e-4 * torch.randn(1, 1, 1, C, generator=gen)).to(DEVICE, torch.float16).requires_grad_()
    e = torch.zeros(1, 1, 1, C, device=DEVICE, dtype=torch.float16)
    e[..., 30] = 1.0
    mesa_loss(s, e, backend="triton").backward()
    ref = s.detach().double().requires_grad_()
    reference.mesa_loss(ref, e.double(), None).backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad.double(), ref.grad, rtol=2e-2, atol=1e-2 * ref.grad.abs().max().item())

    a = torch.full((1, 2, 2, 4), 40000.0, device=DEVICE, dtype=torch.float16, requires_grad=True)
    b = torch.zeros(1, 2, 2, 4, device=DEVICE, dtype=torch.float16)
    shifted_mse(a, b, torch.zeros(1, 2, dtype=torch.long, device=DEVICE), backend="triton").backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad.float(), torch.full_like(a.grad, 2 * 40000.0 / 16, dtype=torch.float32))
    assert a.grad.dtype == torch.float16
