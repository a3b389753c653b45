"""Triton kernels of variable-length (packed) attention: block-diagonal over ``cu_seqlens``.

Sequences s = 0..S-1 of different lengths are concatenated along the token axis; sequence s holds
tokens [cu[s], cu[s+1]) and attends only to itself::

    o_i = softmax_j(scale q_i . k_j) v_j    over j in the segment of i

This is global attention (``_attention_kernels``' notation: base-2 scores, L_i the base-2
logsumexp, delta_i = do_i . o_i) restricted to each segment. Programs never straddle segments: the
host lays out a tile table, one entry (segment, first row) per BLOCK-row tile of a segment, so a
batch of mixed sizes launches exactly the tiles its tokens need and walks only each segment's own
blocks (no padding to the longest). A program's inner loop takes the segment's full blocks without
masks and masks its last, partial one (in 16-wide steps); its own rows past the segment end are loaded as
zeros and never stored. The loops and head-dim chunks are ``_attention_kernels``' (``_fwd_range``,
``_dq_range``, ``_dkdv_range``), so the numerics are those of the global mode; delta reuses its kernel.

The backward is deterministic, like the global one: dK/dV programs own a key tile and loop over the
queries of its segment, dQ programs own a query tile and loop over its keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_kernels import (
    _bh_offsets,
    _dkdv_range,
    _dq_range,
    _fwd_init,
    _fwd_range,
    _load_pair,
    _store_rows,
)


@triton.jit
def _tile_bounds(TILE_SEQ, TILE_ROW, CU):
    """(first row of this program's tile, its segment's start, its segment's end)."""
    tile = tl.program_id(0)
    seq = tl.load(TILE_SEQ + tile)
    row_start = tl.load(TILE_ROW + tile)
    return row_start, tl.load(CU + seq), tl.load(CU + seq + 1)


@triton.jit
def attn_varlen_fwd_kernel(
    Q, K, V, O, LSE, TILE_SEQ, TILE_ROW, CU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: the queries of tile pid0 (inside one segment) of batch*head pid1."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    row_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    rows = row_start + tl.arange(0, BLOCK_M)
    q0, q1, acc0, acc1, l_i, m_i = _fwd_init(rows, Q + b * stride_qb + h * stride_qh, stride_qn, rows < seq_end,
                                             BLOCK_M, HEAD_D, D0, D1, DC1)  # fmt: skip
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    acc0, acc1, l_i, m_i = _fwd_range(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, seq_start,
                                      seq_end, qk_scale, Kh, Kh, Vh, Vh, BLOCK_N, BLOCK_S, False,
                                      HEAD_D, D0, D1, DC1)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    Oh = O + b * stride_ob + h * stride_oh
    _store_rows(Oh, rows, stride_on, rows < seq_end, acc0 / l_safe[:, None], 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(Oh, rows, stride_on, rows < seq_end, acc1 / l_safe[:, None], D0, D1, HEAD_D)
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, m_i + tl.math.log2(l_safe), mask=rows < seq_end)


@triton.jit
def attn_varlen_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, TILE_SEQ, TILE_ROW, CU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of the keys of tile pid0 (BLOCK_N rows inside one segment); DK and DV
    share the strides stride_g*."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    col_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    keys = col_start + tl.arange(0, BLOCK_N)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    k0, k1, v0, v1 = _load_pair(Kh, Vh, keys, stride_kn, stride_vn, seq_end, HEAD_D, D0, DC1)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dk0, dk1, dv0, dv1 = _dkdv_range(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q + b * stride_qb + h * stride_qh,
                                     DO + b * stride_dob + h * stride_doh, stride_qn, stride_don,
                                     LSE + pid_bh.to(tl.int64) * N, DELTA + pid_bh.to(tl.int64) * N,
                                     seq_start, seq_end, qk_scale, BLOCK_M, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
    DKh = DK + b * stride_gb + h * stride_gh
    DVh = DV + b * stride_gb + h * stride_gh
    _store_rows(DKh, keys, stride_gn, keys < seq_end, dk0 * sm_scale, 0, D0, HEAD_D)
    _store_rows(DVh, keys, stride_gn, keys < seq_end, dv0, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(DKh, keys, stride_gn, keys < seq_end, dk1 * sm_scale, D0, D1, HEAD_D)
        _store_rows(DVh, keys, stride_gn, keys < seq_end, dv1, D0, D1, HEAD_D)


@triton.jit
def attn_varlen_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, TILE_SEQ, TILE_ROW, CU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dQ of the queries of tile pid0 (inside one segment) of batch*head pid1."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    row_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_end
    Qh = Q + b * stride_qb + h * stride_qh
    DOh = DO + b * stride_dob + h * stride_doh
    q0, q1, do0, do1 = _load_pair(Qh, DOh, rows, stride_qn, stride_don, seq_end, HEAD_D, D0, DC1)
    # Rows past the segment: q = do = 0 and lse = +inf make p = 0, so they add nothing.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    dq0, dq1 = _dq_range(dq0, dq1, q0, q1, do0, do1, lse, delta, K + b * stride_kb + h * stride_kh,
                         V + b * stride_vb + h * stride_vh, stride_kn, stride_vn, seq_start, seq_end, qk_scale,
                         BLOCK_N, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
    DQh = DQ + b * stride_gb + h * stride_gh
    _store_rows(DQh, rows, stride_gn, rows < seq_end, dq0 * sm_scale, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(DQh, rows, stride_gn, rows < seq_end, dq1 * sm_scale, D0, D1, HEAD_D)


def varlen_tile(table: dict, launch: str, head_dim: int, elem_size: int):
    """The tile the varlen kernels launch with: the global tile of ``table`` (see _attention_configs),
    except where ptxas spills the varlen variant (it also keeps its segment bounds in registers)."""
    from ._attention_configs import AMPERE_TABLE, CONSUMER_TABLE, HOPPER_TABLE, Tile, block_d_of

    bd = block_d_of(head_dim)
    if table is AMPERE_TABLE and (launch, bd, elem_size) == ("dkdv", 64, 4):
        return Tile(64, 32, 8, 3)  # sm_80: the 128-key fp32 tile spills 16 B here
    if table is HOPPER_TABLE and (launch, bd, elem_size) == ("dkdv", 128, 4):
        return Tile(16, 16, 8, 3)  # sm_90: the 32-key fp32 tile spills 8 B at D = 72 (1 or 2 stages)
    if table is CONSUMER_TABLE and (launch, bd, elem_size) == ("dq", 32, 4):
        return Tile(128, 32, 8, 3)  # sm_120: the 4-warp fp32 tile spills 4 B here
    if table is CONSUMER_TABLE and (launch, bd, elem_size) == ("fwd", 128, 4):
        return Tile(32, 32, 8, 2)  # sm_86: the 4-warp fp32 tile spills 16 B at D = 128
    return table[launch, bd, elem_size, False]


def AUDIT_CONFIGS():  # noqa: N802 (name fixed by radio_kernels._audit_registry)
    """One AuditConfig per (arch, launch, head dim, dtype) of the varlen kernels.

    They launch with the global tiles of the attention tables (``fwd`` / ``dq`` / ``dkdv``, not
    narrow) and the same stride units, so each entry mirrors the global entry of
    ``_attention_configs.AUDIT_CONFIGS``; the tile table / cu_seqlens pointers are int32.
    """
    from ._attention_configs import (
        AUDIT_DTYPES,
        AUDIT_HEAD_DIMS,
        BLACKWELL,
        GPU_TABLES,
        HOPPER,
        SHIPPED_ARCHS,
    )
    from ._attention_plan import SMALL, chunk_constexprs
    from ._audit_registry import AuditConfig, signature_of

    floats = ("qk_scale", "sm_scale")
    kernels = {"fwd": attn_varlen_fwd_kernel, "dq": attn_varlen_bwd_dq_kernel, "dkdv": attn_varlen_bwd_dkdv_kernel}
    out = []
    for arch, table in GPU_TABLES.items():
        if arch not in SHIPPED_ARCHS:
            continue  # not launched there (see _attention_configs.SHIPPED_ARCHS)
        for dtype in AUDIT_DTYPES:
            es = 4 if dtype == "fp32" else 2
            ptrs = {name: ("fp32" if name in ("LSE", "DELTA") else dtype) for name in
                    ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA")}  # fmt: skip
            ptrs.update(TILE_SEQ="i32", TILE_ROW="i32", CU="i32")
            for d in AUDIT_HEAD_DIMS:
                unit = 16 if d % 16 == 0 else 8
                for launch, kernel in kernels.items():
                    names = [p.name for p in kernel.params]
                    sig = signature_of(
                        kernel, ptrs={n: ptrs[n] for n in names if n in ptrs},
                        ints=tuple(n for n in names if n not in ptrs and n not in floats), floats=floats,
                    )  # fmt: skip
                    tile = varlen_tile(table, launch, d, es)
                    rows, cols = ("BLOCK_N", "BLOCK_M") if launch == "dkdv" else ("BLOCK_M", "BLOCK_N")
                    out.append(AuditConfig(
                        kernel=kernel,
                        label=f"varlen {launch} {dtype} D={d} {rows}={tile.block_m} {cols}={tile.block_n}",
                        signature=sig,
                        constexprs={**chunk_constexprs(d), "BLOCK_S": SMALL, "STRIDE_UNIT": unit,
                                    rows: tile.block_m, cols: tile.block_n},
                        num_warps=tile.num_warps, num_stages=tile.num_stages, uses_dot=True, archs=(arch,),
                        expect_wgmma=arch in (HOPPER, BLACKWELL) and es == 2 and tile.block_m >= 64,
                        sample=arch == HOPPER and dtype == "bf16" and d == 64,
                    ))  # fmt: skip
    return out
