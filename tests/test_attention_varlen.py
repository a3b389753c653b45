"""Packed variable-length attention (``attention(..., cu_seqlens=...)``): kernels against float64 references.

Same error rule as tests/test_attention.py (FlashAttention's): max|out - ref64| <= 2 max|ref_lp - ref64|
+ atol, with ref_lp the flash formulas at the input precision, here under the block-diagonal mask of
``reference.varlen_attention_mask``. On CPU the kernels run under the Triton interpreter.
"""

from __future__ import annotations

import importlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_attention import assert_error_rule, make_qkv, tf32_matmuls
from tolerance import EPS
from torch.autograd import gradcheck

from radio_kernels import _attention_configs as configs
from radio_kernels import attention, reference

attention_module = importlib.import_module("radio_kernels.attention")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True, scope="module")
def poisoned_buffers():
    """Every buffer the kernels write starts as NaN, so an element they skip shows up."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    with mock.patch.object(attention_module, "_empty", nan_empty):
        yield


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen_flash_formulas(q, k, v, grad_out, cu, scale):
    """(out, dq, dk, dv) by the flash formulas at the inputs' precision under the block-diagonal mask,
    and the float32 rounding bound of the dot products each is built from (see test_attention)."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    tf32 = q.is_cuda and q.dtype == torch.float32
    dot_eps = 2.0**-10 if tf32 else EPS[torch.float32]
    with tf32_matmuls(tf32):
        q, k, v, do = (t.detach().to(f) for t in (q, k, v, grad_out))
        mask = reference.varlen_attention_mask(cu, q.shape[2], q.device)
        s2 = (q @ k.transpose(-1, -2) * (scale * math.log2(math.e))).masked_fill(~mask, float("-inf"))
        m = s2.amax(-1, keepdim=True)
        p = torch.exp2(s2 - (m + torch.exp2(s2 - m).sum(-1, keepdim=True).log2()))
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


def check_varlen(B, H, lengths, D, dtype, packed, seed=0, scale=None):
    cu = cu_of(lengths)
    N = int(cu[-1])
    leaves, qkv = make_qkv(B, H, N, D, dtype, packed, seed)
    grad_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    s = D**-0.5 if scale is None else scale
    out = attention(*qkv, cu_seqlens=cu, scale=scale, backend="triton")
    got = [out, *torch.autograd.grad(out, leaves, grad_out)]
    lp, accumulation = varlen_flash_formulas(*qkv, grad_out, cu, s)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    qkv64 = leaves64[0].permute(2, 0, 3, 1, 4).unbind(0) if packed else leaves64
    ref = reference.varlen_attention_dense(*qkv64, cu, s)
    ref64 = [ref, *torch.autograd.grad(ref, leaves64, grad_out.double())]
    if packed:
        got = [got[0], *got[1].permute(2, 0, 3, 1, 4).unbind(0)]
        ref64 = [ref64[0], *ref64[1].permute(2, 0, 3, 1, 4).unbind(0)]
    for name, a, b, c, acc in zip(["out", "dq", "dk", "dv"], got, lp, ref64, accumulation):
        assert a.dtype == dtype and a.shape == c.shape
        assert torch.isfinite(a).all(), f"{name} has non-finite (unwritten?) elements"
        assert_error_rule(name, a, b, c, dtype, acc)
    return got


@given(
    lengths=st.lists(st.integers(0, 45), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    D=st.sampled_from((16, 32, 72, 128)),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_varlen_matches_reference(lengths, B, H, D, dtype, packed, seed):
    check_varlen(B, H, lengths, D, dtype, packed, seed)


@pytest.mark.parametrize(
    "lengths",
    [
        [1],  # a single token
        [32, 32],  # segments that are exact multiples of the 32-row interpreter tiles
        [33, 1, 31, 0, 40],  # one past a tile, a lone token, an empty segment
        [74, 10],  # a segment spanning three tiles next to a short one
    ],
)
def test_varlen_edge_lengths(lengths):
    check_varlen(1, 2, lengths, 32, torch.float32, packed=False)


def test_varlen_custom_scale_and_fp16_head_dim_80():
    check_varlen(1, 2, [20, 41], 80, torch.float16, packed=True, scale=0.3)


def test_each_segment_equals_attention_alone():
    """Packing changes nothing: each sequence's output and gradients are those of a global call on it alone."""
    lengths = [26, 45, 9]
    cu = cu_of(lengths)
    leaves, qkv = make_qkv(1, 2, sum(lengths), 32, torch.float32, packed=True, seed=4)
    out = attention(*qkv, cu_seqlens=cu, backend="triton")
    (grad,) = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = leaves[0].detach()[:, a:b].clone().requires_grad_()
        alone = attention(*part.permute(2, 0, 3, 1, 4).unbind(0), backend="triton")
        (grad_alone,) = torch.autograd.grad(alone, part, torch.ones_like(alone))
        torch.testing.assert_close(out[:, :, a:b], alone, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad[:, a:b], grad_alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("table", ["HOPPER_TABLE", "AMPERE_TABLE", "CONSUMER_TABLE"])
def test_varlen_gpu_tile_tables_under_interpreter(table):
    """The 128-row GPU tiles on segments that start and end inside tiles."""
    with mock.patch.object(configs, "active_table", lambda: getattr(configs, table)):
        check_varlen(1, 1, [70, 130, 3], 64, torch.float16, packed=True)
        if table == "AMPERE_TABLE":  # its own varlen fp32 D=64 dK/dV tile (64 keys)
            check_varlen(1, 1, [70, 60], 64, torch.float32, packed=False)
        if table == "HOPPER_TABLE":  # its own varlen fp32 D > 64 dK/dV tile (16 keys, 16-query steps)
            check_varlen(1, 1, [40, 27], 72, torch.float32, packed=False)
        if table == "CONSUMER_TABLE":  # its own varlen fp32 D = 32 dQ tile (8 warps)
            check_varlen(1, 1, [70, 60], 32, torch.float32, packed=False)


def test_varlen_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4, 4, 5, 9])
    assert gradcheck(lambda q, k, v: reference.varlen_attention(q, k, v, cu), (q, k, v), fast_mode=True)
    dense = reference.varlen_attention_dense(q, k, v, cu, 3**-0.5)
    torch.testing.assert_close(reference.varlen_attention(q, k, v, cu), dense)


def test_varlen_backward_is_deterministic():
    leaves, qkv = make_qkv(1, 2, 90, 32, torch.float16, packed=True)
    cu = cu_of([50, 40])
    grad_out = torch.randn(1, 2, 90, 32).to(DEVICE, torch.float16)
    runs = []
    for _ in range(2):
        out = attention(*qkv, cu_seqlens=cu, backend="triton")
        runs.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cu, kwargs, error, match",
    [
        ([0, 5, 20], {}, ValueError, "end at N=16"),
        ([1, 16], {}, ValueError, "start at 0"),
        ([0, 9, 4, 16], {}, ValueError, "never decrease"),
        ([0, 16], dict(num_prefix=2), ValueError, "num_prefix=0 and window_tokens=0"),
        ([[0, 16]], {}, ValueError, "1-D integer"),
        ([0.0, 16.0], {}, ValueError, "1-D integer"),
        ("0,16", {}, TypeError, "torch.Tensor"),
    ],
)
def test_varlen_bad_cu_seqlens(cu, kwargs, error, match):
    x = torch.randn(1, 1, 16, 16)
    cu = torch.tensor(cu) if not isinstance(cu, str) else cu
    for backend in ("torch", "triton"):
        with pytest.raises(error, match=match):
            attention(x, x, x, cu_seqlens=cu, backend=backend, **kwargs)
