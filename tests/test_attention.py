"""Fused attention kernels (forward and backward) against float64 references.

Error rule (FlashAttention's): with ref64 the float64 reference and ref_lp the reference run at
the input precision (the flash formulas, dense), max|out - ref64| <= 2 max|ref_lp - ref64| + atol,
atol = 4 eps(dtype) max|ref64| (output rounding) + eps(float32) sum|terms| (float32 accumulation of
the dot products a result is built from; see flash_formulas_reference).
On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
computes float32 dots in full precision and cannot do bfloat16: tests use float16 and float32.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerance import EPS, assert_close_to_reference

from radio_kernels import _attention_configs as configs
from radio_kernels import _attention_plan as plan
from radio_kernels import attention, reference
from radio_kernels.attention import triton_supports

# the package re-exports the function under the module's name
attention_module = importlib.import_module("radio_kernels.attention")

HEAD_DIMS = (16, 32, 64, 72, 80, 96, 128)
PREFIXES = (0, 1, 4, 10)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# float32 against SDPA / the reference: the interpreter is exact float32, a GPU runs TF32 dots.
FP32_TOL = dict(rtol=5e-3, atol=5e-3) if CUDA else dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def poisoned_buffers():
    """Every buffer the kernels write starts as NaN, so an element they skip shows up."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    with mock.patch.object(attention_module, "_empty", nan_empty):
        yield


def make_qkv(B, H, N, D, dtype, packed, seed=0):
    """q, k, v leaves; packed: views of one (B, N, 3, H, D) projection, as a ViT block makes them."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
        return [qkv], qkv.permute(2, 0, 3, 1, 4).unbind(0)
    leaves = [torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]
    return leaves, leaves


def forward_backward(fn, leaves, qkv, grad_out):
    out = fn(*qkv)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def flash_formulas_reference(q, k, v, grad_out, P, T, scale):
    """(out, dq, dk, dv) by the flash backward formulas, dense, at the inputs' precision, and the
    float32 rounding each result can inherit from the dot products it is built from.

    Math in float32 (float64 for float64 inputs), probabilities recomputed from the base-2
    logsumexp as p = exp2(c s - L), and the output rounded to the input dtype before
    delta = rowsum(dO * O), as the kernels do. Unlike autograd's softmax backward, this shows the
    amplification of the logsumexp's rounding by large logits.

    The second list bounds the dot products' rounding, eps * sum |terms| (eps of float32, or of
    TF32 inputs for float32 on a GPU): it matters where a
    result cancels, e.g. ds = p (dp - delta) is exactly 0 when a query sees a single key, while
    dp = dO . v and delta = dO . O, summed in different orders, each round at eps32 sum_d |dO v|.
    """
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    # float32 on a GPU: the kernels' dots are TF32, so the same-precision reference's are too.
    tf32 = q.is_cuda and q.dtype == torch.float32
    with tf32_matmuls(tf32):
        return _flash_formulas(q, k, v, grad_out, P, T, scale, f, 2.0**-10 if tf32 else EPS[torch.float32])


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _flash_formulas(q, k, v, grad_out, P, T, scale, f, dot_eps):
    q, k, v, do = (t.detach().to(f) for t in (q, k, v, grad_out))
    mask = reference.attention_mask(q.shape[2], P, T, device=q.device)
    s2 = (q @ k.transpose(-1, -2) * (scale * math.log2(math.e))).masked_fill(~mask, float("-inf"))
    m = s2.amax(-1, keepdim=True)
    lse2 = m + torch.exp2(s2 - m).sum(-1, keepdim=True).log2()
    p = torch.exp2(s2 - lse2)
    out = (p @ v).to(grad_out.dtype)
    delta = (do * out.to(f)).sum(-1, keepdim=True)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    grads = (ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do)
    ds_terms = p * (do.abs() @ v.abs().transpose(-1, -2) + (do * out.to(f)).abs().sum(-1, keepdim=True))
    terms = (
        v.abs().amax(),
        (ds_terms @ k.abs() * scale).amax(),
        (ds_terms.transpose(-1, -2) @ q.abs() * scale).amax(),
        (p.transpose(-1, -2) @ do.abs()).amax(),
    )
    return [out, *(g.to(grad_out.dtype) for g in grads)], [dot_eps * x.item() for x in terms]


def assert_error_rule(name, got, ref_lp, ref64, dtype, accumulation):
    """tests/tolerance.py's rule with its default 4 ulps at max|ref64| plus float32 accumulation."""
    atol = 4 * EPS[dtype] * ref64.abs().max().item() + accumulation
    assert_close_to_reference(got, ref64, ref_lp, atol=atol, what=name)


def check_against_reference(B, H, N, D, P, T, dtype, packed, scale=None, seed=0):
    leaves, qkv = make_qkv(B, H, N, D, dtype, packed, seed)
    grad_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    s = D**-0.5 if scale is None else scale
    got = forward_backward(
        lambda q, k, v: attention(q, k, v, num_prefix=P, window_tokens=T, scale=scale, backend="triton"),
        leaves, qkv, grad_out,
    )  # fmt: skip
    lp, accumulation = flash_formulas_reference(*qkv, grad_out, P, T, s)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    qkv64 = leaves64[0].permute(2, 0, 3, 1, 4).unbind(0) if packed else leaves64
    ref64 = forward_backward(
        lambda q, k, v: reference.attention_dense(q, k, v, P, T, s), leaves64, qkv64, grad_out.double()
    )
    if packed:  # compare per q / k / v gradient
        got = [got[0], *got[1].permute(2, 0, 3, 1, 4).unbind(0)]
        ref64 = [ref64[0], *ref64[1].permute(2, 0, 3, 1, 4).unbind(0)]
    for name, a, b, c, acc in zip(["out", "dq", "dk", "dv"], got, lp, ref64, accumulation):
        assert a.dtype == dtype and a.shape == c.shape
        assert torch.isfinite(a).all(), f"{name} has non-finite (unwritten?) elements"
        assert_error_rule(name, a, b, c, dtype, acc)
    return got


# ----------------------------------------------------------------------------------------
# property tests
# ----------------------------------------------------------------------------------------
common = dict(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    D=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)


@given(N=st.integers(1, 150), P=st.sampled_from(PREFIXES), **common)
def test_global_matches_reference(B, H, N, D, P, dtype, packed, seed):
    check_against_reference(B, H, N, D, min(P, N), 0, dtype, packed, seed=seed)


@given(T=st.integers(1, 70), windows=st.integers(1, 4), P=st.sampled_from(PREFIXES), **common)
def test_windowed_matches_reference(B, H, T, windows, D, P, dtype, packed, seed):
    windows = max(1, min(windows, 150 // T))
    check_against_reference(B, H, P + windows * T, D, P, T, dtype, packed, seed=seed)


# ----------------------------------------------------------------------------------------
# boundaries the random draws may miss
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N, P, T",
    [
        (1, 0, 0),  # a single token
        (1, 1, 1),  # only a prefix token, no window
        (64, 0, 32),  # windows that are exact multiples of the 32-wide interpreter tiles
        (74, 10, 32),  # ... shifted by the prefix
        (42, 10, 0),  # global with prefix: P is ignored
        (100, 4, 96),  # one window longer than three tiles
        (36, 0, 1),  # one-token windows: each query sees itself only
    ],
)
def test_edge_shapes(N, P, T):
    check_against_reference(1, 2, N, 72, P, T, torch.float32, packed=False)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_head_dim_float16(D):
    check_against_reference(1, 1, 61, D, 4, 19, torch.float16, packed=True)


@pytest.mark.parametrize("P, T", [(17, 16), (20, 48), (33, 36), (40, 64)])
def test_more_than_sixteen_prefix_tokens(P, T):
    """P > 16 walks the prefix columns in several 16-wide blocks (full ones, then a masked tail)."""
    check_against_reference(1, 2, P + 2 * T, 32, P, T, torch.float16, packed=True)


@pytest.mark.parametrize(
    "T, wide, tail",
    [
        (25, 0, 2),  # shorter than one 32-key tile: two 16-key tiles, the second masked (9 keys)
        (36, 1, 1),  # 6 x 6 window: a 32-key tile, then a 16-key tile of 4 keys
        (48, 1, 1),  # the rest is one whole 16-key tile
        (80, 2, 1),
    ],
)
def test_per_window_backward_with_ragged_key_tiles(T, wide, tail):
    """Windows that are not whole key tiles of the per-window backward kernel (the interpreter's
    32-key tile): its full tiles, then 16-key tiles, the last one masked where 16 does not divide
    the rest; dQ summed over tiles of both widths. D = 72: head-dim chunks 64 + 8."""
    P, D = 10, 72
    (launch,) = [x for x in plan.backward_plan(P + 2 * T, P, T, D, 2) if x.kernel == "window"]
    assert (launch.tiles_per_seg, launch.tail_tiles) == (wide, tail)
    check_against_reference(1, 2, P + 2 * T, D, P, T, torch.float16, packed=True)


@pytest.mark.skipif(CUDA, reason="the interpreter's 32-key window tile leaves a masked 16-key tile at T = 36")
def test_masked_keys_of_a_window_tile_add_nothing_when_exp2_overflows():
    """Every score strongly negative (lse ~ -30): a masked key (k = 0, score 0) would get
    p = exp2(-lse) ~ 2**27, which overflows float16, and its dQ share inf * 0 = NaN; the kernel gives
    masked keys p = 0."""
    B, H, P, T, D = 1, 1, 4, 36, 32
    N = P + 2 * T
    g = torch.Generator().manual_seed(5)
    q = (2.0 + 0.1 * torch.randn(B, H, N, D, generator=g)).half().requires_grad_()
    k = (-2.0 + 0.1 * torch.randn(B, H, N, D, generator=g)).half().requires_grad_()
    v = torch.randn(B, H, N, D, generator=g).half().requires_grad_()
    grad_out = torch.randn(B, H, N, D, generator=g).half()
    out = attention(q, k, v, num_prefix=P, window_tokens=T, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = reference.attention_dense(*x64, P, T, D**-0.5)
    ref = torch.autograd.grad(out64, x64, grad_out.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item(), msg=name)


def test_custom_scale():
    check_against_reference(1, 2, 45, 32, 10, 35, torch.float32, packed=False, scale=0.3)


@pytest.mark.parametrize("table", ["HOPPER_TABLE", "BLACKWELL_TABLE", "AMPERE_TABLE", "CONSUMER_TABLE"])
def test_gpu_tile_tables_under_interpreter(table):
    """Each shipped GPU tile table (128-row, BLOCK_P, narrow variant) on shapes that cross its edges."""
    with mock.patch.object(configs, "active_table", lambda: getattr(configs, table)):
        # every table has its own float32 tiles (16- and 32-row dK/dV of 16-query steps on 8 warps, ...)
        check_against_reference(1, 1, 10 + 2 * 48, 72, 10, 48, torch.float32, packed=False)  # narrow
        check_against_reference(1, 1, 10 + 2 * 144, 128, 10, 144, torch.float32, packed=True)
        check_against_reference(1, 1, 10 + 3 * 64, 64, 10, 64, torch.float16, packed=True)  # narrow
        check_against_reference(1, 1, 10 + 2 * 144, 80, 10, 144, torch.float16, packed=False)
        check_against_reference(1, 1, 201, 128, 0, 0, torch.float32, packed=False)
        check_against_reference(1, 1, 10 + 3 * 48, 16, 10, 48, torch.float16, packed=True)  # narrow, D 16
        check_against_reference(1, 1, 20 + 2 * 144, 64, 20, 144, torch.float16, packed=True)  # 2 prefix blocks


def test_windows_without_prefix_equal_vitdet_partition():
    """P = 0: the same as ViTDet's window partition of a token grid + SDPA in each window."""
    B, H, D, w, gh, gw = 2, 2, 16, 4, 2, 3  # 2 x 3 windows of 4 x 4 tokens
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, gh * w, gw * w, D, generator=g).to(DEVICE) for _ in range(3))

    def partition(x):  # (B, H, gh*w, gw*w, D) -> (B, H, nw, w*w, D), windows in raster order
        return x.reshape(B, H, gh, w, gw, w, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, gh * gw, w * w, D)

    expected = F.scaled_dot_product_attention(partition(q), partition(k), partition(v))
    got = attention(*(partition(t).reshape(B, H, -1, D) for t in (q, k, v)), window_tokens=w * w, backend="triton")
    torch.testing.assert_close(got.reshape(expected.shape), expected, **FP32_TOL)


def test_backward_is_deterministic():
    leaves, qkv = make_qkv(2, 2, 10 + 3 * 40, 64, torch.float16, packed=True)
    grad_out = torch.randn(2, 2, 130, 64).to(DEVICE, torch.float16)
    fn = lambda q, k, v: attention(q, k, v, num_prefix=10, window_tokens=40, backend="triton")
    first = forward_backward(fn, leaves, qkv, grad_out)
    second = forward_backward(fn, leaves, qkv, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_output_and_grads_are_stored_bnhd():
    leaves, qkv = make_qkv(2, 3, 20, 16, torch.float32, packed=False)
    out = attention(*qkv, backend="triton")
    assert out.shape == (2, 3, 20, 16) and out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)


def test_non_unit_head_stride_is_copied_not_misread():
    q, k, v = (torch.randn(1, 2, 16, 24).to(DEVICE).transpose(-1, -2) for _ in range(3))  # D stride 24
    torch.testing.assert_close(attention(q, k, v, backend="triton"), reference.attention(q, k, v), **FP32_TOL)


def test_triton_backend_rejects_what_the_kernels_lack():
    x = torch.randn(1, 1, 8, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        attention(x, x, x, backend="triton")
    y = torch.randn(1, 1, 8, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        attention(y, y, y, backend="triton")
    # B * H beyond the CUDA grid's second axis (65535)
    z = torch.zeros(1, 1, 4, 16, dtype=torch.float16, device=DEVICE).expand(65536, 1, 4, 16)
    with pytest.raises(ValueError, match="B \\* H up to 65535"):
        attention(z, z, z, backend="triton")
    # token stride x N beyond int32 (a sequence-major view of a huge tensor)
    big = torch.empty_strided((1, 1, 2, 16), (16, 16, 2**31, 1), dtype=torch.float16, device="meta")
    assert "2**31" in triton_supports(big, big, big)
    # auto falls back to the reference for both
    torch.testing.assert_close(attention(x, x, x), reference.attention(x, x, x))


def test_attention_is_once_differentiable():
    """A second derivative through the fused backward would be silently wrong: it raises instead."""
    x = torch.randn(1, 1, 16, 16, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(attention(x, x, x, backend="triton").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_tokens=7), "multiple of window_tokens"),
        (dict(num_prefix=-1), "num_prefix"),
        (dict(num_prefix=99), "num_prefix"),
        (dict(scale=0.0), "scale"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = torch.randn(1, 1, 20, 16)
    with pytest.raises(ValueError, match=match):
        attention(x, x, x, **kwargs)


@pytest.mark.skipif(not CUDA, reason="bfloat16 needs a GPU (the interpreter cannot do bf16 dots)")
@pytest.mark.parametrize("D, P, T", [(64, 10, 64), (72, 10, 144), (80, 0, 0), (128, 10, 256)])
def test_bfloat16_on_gpu(D, P, T):
    check_against_reference(2, 4, P + 2 * max(T, 100), D, P, T, torch.bfloat16, packed=True)


# ----------------------------------------------------------------------------------------
# the tensor-descriptor (TMA) path of the forward
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="compares the two load paths under the interpreter")
@pytest.mark.parametrize("N, P, T, D", [(150, 0, 0, 80), (10 + 2 * 144, 10, 144, 72), (4 + 3 * 36, 4, 36, 64)])
def test_forward_tma_and_pointer_paths_agree(N, P, T, D):
    """Full key blocks through tensor descriptors (zero-filled past D) give the pointer path's output
    bit for bit, on the Hopper tiles (TMA on) and the Ampere ones (pointer path)."""
    _, (q, k, v) = make_qkv(1, 2, N, D, torch.float16, packed=True)
    outs = []
    for tma in (True, False):
        with mock.patch.object(configs, "uses_tma", lambda table, es, tma=tma: tma):
            outs.append(attention(q, k, v, num_prefix=P, window_tokens=T, backend="triton"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_tma_needs_16_byte_aligned_rows():
    _, (q, k, v) = make_qkv(1, 2, 40, 72, torch.float16, packed=True)  # row stride 3 * 2 * 72 * 2 B
    assert attention_module._tma_ready(k, v)
    _, (q, k, v) = make_qkv(1, 2, 40, 20, torch.float16, packed=True)  # head stride 40 B
    assert not attention_module._tma_ready(k, v)
    assert not attention_module._tma_ready(torch.empty(2, 3, 40, 64, dtype=torch.float16)[..., 1:-7])
