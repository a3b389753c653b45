"""Packed variable-length attention (``attention(..., cu_seqlens=...)``): checks, launchers, autograd.

Sequences of different lengths concatenated on the token axis, ``cu_seqlens`` (S + 1,) their
boundaries (cu[0] = 0, non-decreasing, cu[S] = N); every token attends to the tokens of its own
sequence only (see ``_varlen_attention_kernels``). The same boundaries hold for every batch
element and head. The host turns ``cu_seqlens`` into a tile table (segment, first row) per launch
block size, so a mixed batch costs the tiles its tokens need, not those of padding to the longest.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from . import _attention_configs as configs
from . import _attention_plan as plan
from . import reference
from ._attention_kernels import LOG2E
from ._backend import device_guard, resolve_backend
from ._varlen_attention_kernels import (
    attn_varlen_bwd_dkdv_kernel,
    attn_varlen_bwd_dq_kernel,
    attn_varlen_fwd_kernel,
    varlen_tile,
)


def check_cu_seqlens(cu_seqlens, n: int) -> list[int]:
    """Validate ``cu_seqlens`` for N = n tokens; return it as a list of ints."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor of S + 1 >= 2 boundaries, got dtype {cu_seqlens.dtype}, "
            f"shape {tuple(cu_seqlens.shape)}"
        )
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != n or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at N={n}, got {bounds[:4]}...{bounds[-2:]}"
            if len(bounds) > 6
            else f"cu_seqlens must start at 0, never decrease and end at N={n}, got {bounds}"
        )
    return bounds


def tile_table(bounds: list[int], block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment index, first row) int32 of every ``block``-row tile of every segment, on ``device``."""
    return _device_tables(tuple(bounds), block, torch.device(device))[1:]


@functools.lru_cache(maxsize=64)
def _device_tables(bounds: tuple[int, ...], block: int, device: torch.device):
    """(cu_seqlens, tile segments, tile rows) on ``device``: every block of a model's forward and backward
    sees the same boundaries, so the host-to-device copies happen once per batch layout, not per call.
    Pass block 0 for cu_seqlens alone."""
    seqs, rows = [], []
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        starts = range(a, b, block) if block else ()
        seqs.extend([s] * len(starts))
        rows.extend(starts)
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (bounds, seqs, rows))


def varlen_attention(q, k, v, cu_seqlens, scale, backend: str, triton_supports) -> torch.Tensor:
    """Dispatch of ``attention(q, k, v, cu_seqlens=...)`` (arguments already checked but cu_seqlens)."""
    bounds = check_cu_seqlens(cu_seqlens, q.shape[2])
    chosen = resolve_backend(backend, q.device)
    unsupported = triton_supports(q, k, v) if chosen == "triton" else None
    if unsupported and backend == "triton":
        raise ValueError(f"{unsupported}; use backend='torch'")
    if chosen == "torch" or unsupported or q.shape[2] == 0:
        return reference.varlen_attention(q, k, v, cu_seqlens, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cu = _device_tables(tuple(bounds), 0, q.device)[0]
    with device_guard(q.device):
        return _VarlenAttention.apply(q, k, v, cu, tuple(bounds), scale)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, bounds, scale):
        from .attention import _unit_d

        q, k, v = (_unit_d(t) for t in (q, k, v))
        out, lse = varlen_forward(q, k, v, cu, list(bounds), scale)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.args = (list(bounds), scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from .attention import _unit_d

        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = varlen_backward(_unit_d(grad_out), q, k, v, out, lse, cu, *ctx.args)
        return dq, dk, dv, None, None, None


def varlen_forward(q, k, v, cu, bounds: list[int], scale: float):
    """Forward kernel; (out (B, H, N, D) stored (B, N, H, D), lse2 (B*H, N) fp32)."""
    from .attention import _bnhd_empty_like, _empty, _scaled, _stride_unit, _strides

    B, H, N, D = q.shape
    out = _bnhd_empty_like(q)
    lse = _empty((B * H, N), torch.float32, q.device)
    unit = _stride_unit(q, k, v, out)
    strides = [x for t in (q, k, v, out) for x in _scaled(_strides(t), unit)]
    tile = varlen_tile(configs.active_table(), "fwd", D, q.element_size())
    seqs, rows = tile_table(bounds, tile.block_m, q.device)
    if seqs.numel():
        attn_varlen_fwd_kernel[(seqs.numel(), B * H)](
            q, k, v, out, lse, seqs, rows, cu, *strides, H, N, scale * LOG2E,
            **plan.chunk_constexprs(D), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_S=plan.SMALL,
            STRIDE_UNIT=unit, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return out, lse


def varlen_backward(do, q, k, v, out, lse, cu, bounds: list[int], scale: float):
    """(dq, dk, dv), each (B, H, N, D) stored (B, N, H, D); deterministic (no atomics)."""
    from .attention import backward_setup

    B, H, N, D = q.shape
    es = q.element_size()
    delta, (dq, dk, dv), strides, common = backward_setup(do, q, k, v, out, lse)
    common = dict(**plan.chunk_constexprs(D), BLOCK_S=plan.SMALL, STRIDE_UNIT=common["STRIDE_UNIT"])
    # dK, dV: rows are keys (the kernel's BLOCK_N), columns queries (BLOCK_M).
    tile = varlen_tile(configs.active_table(), "dkdv", D, es)
    seqs, rows = tile_table(bounds, tile.block_m, q.device)
    if seqs.numel():
        attn_varlen_bwd_dkdv_kernel[(seqs.numel(), B * H)](
            q, k, v, do, dk, dv, lse, delta, seqs, rows, cu, *strides, H, N, scale * LOG2E, scale,
            BLOCK_M=tile.block_n, BLOCK_N=tile.block_m, num_warps=tile.num_warps,
            num_stages=tile.num_stages, **common,
        )  # fmt: skip
    tile = varlen_tile(configs.active_table(), "dq", D, es)
    seqs, rows = tile_table(bounds, tile.block_m, q.device)
    if seqs.numel():
        attn_varlen_bwd_dq_kernel[(seqs.numel(), B * H)](
            q, k, v, do, dq, lse, delta, seqs, rows, cu, *strides, H, N, scale * LOG2E, scale,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
            num_stages=tile.num_stages, **common,
        )  # fmt: skip
    return dq, dk, dv
