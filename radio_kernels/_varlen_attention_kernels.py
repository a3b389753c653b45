"""Triton kernels of variable-length (packed) attention: block-diagonal over ``cu_seqlens``.

Sequences s = 0..S-1 of different lengths are concatenated along the token axis; sequence s holds
tokens [cu[s], cu[s+1]) and attends only to itself::

    o_i = softmax_j(scale q_i . k_j) v_j    over j in the segment of i

This is global attention (``_attention_kernels``' notation: base-2 scores, L_i the base-2
logsumexp, delta_i = do_i . o_i) restricted to each segment. Programs never straddle segments: the
host lays out a tile table, one entry (segment, first row) per BLOCK-row tile of a segment, so a
batch of mixed sizes launches exactly the tiles its tokens need and walks only each segment's own
blocks (no padding to the longest). A program's inner loop takes the segment's full blocks without
masks and masks its last, partial one; its own rows past the segment end are loaded as zeros and
never stored. The loops are ``_attention_kernels``' (``_fwd_keys``, ``_dq_keys``, ``_dkdv_queries``)
with the window mask off, so the numerics are those of the global mode; delta reuses its kernel.

The backward is deterministic, like the global one: dK/dV programs own a key tile and loop over the
queries of its segment, dQ programs own a query tile and loop over its keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_kernels import _dkdv_queries, _dq_keys, _fwd_keys, _load_tile


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
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: the queries of tile pid0 (inside one segment) of batch*head pid1."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, seq_end, d_mask, True, EVEN_D)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = seq_start + ((seq_end - seq_start) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, seq_start, full_end,
                              offs_m, 0, 1, qk_scale, offs_n, d_mask, False, False, EVEN_D, BLOCK_N)  # fmt: skip
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, seq_end,
                              offs_m, 0, 1, qk_scale, offs_n, d_mask, True, False, EVEN_D, BLOCK_N)  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_ok = offs_m < seq_end
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def attn_varlen_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, TILE_SEQ, TILE_ROW, CU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of the keys of tile pid0 (BLOCK_N rows inside one segment); DK and DV
    share the strides stride_g*."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    col_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    offs_n = col_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D

    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, seq_end, d_mask, True, EVEN_D)  # fmt: skip
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, seq_end, d_mask, True, EVEN_D)  # fmt: skip
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :]
    lse_ptr = LSE + pid_bh.to(tl.int64) * N
    delta_ptr = DELTA + pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full_end = seq_start + ((seq_end - seq_start) // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_queries(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                           seq_start, full_end, offs_n, 0, 1, qk_scale, offs_m, d_mask,
                           False, False, EVEN_D, BLOCK_M)  # fmt: skip
    dk, dv = _dkdv_queries(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                           full_end, seq_end, offs_n, 0, 1, qk_scale, offs_m, d_mask,
                           True, False, EVEN_D, BLOCK_M)  # fmt: skip

    mask = (offs_n < seq_end)[:, None] & d_mask[None, :]
    g_off = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def attn_varlen_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, TILE_SEQ, TILE_ROW, CU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dQ of the queries of tile pid0 (inside one segment) of batch*head pid1."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_start, seq_start, seq_end = _tile_bounds(TILE_SEQ, TILE_ROW, CU)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D
    row_ok = offs_m < seq_end

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, seq_end, d_mask, True, EVEN_D)  # fmt: skip
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, seq_end, d_mask, True, EVEN_D)  # fmt: skip
    # Rows past the segment: q = do = 0 and lse = +inf make p = 0, so they add nothing.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = seq_start + ((seq_end - seq_start) // BLOCK_N) * BLOCK_N
    dq = _dq_keys(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, seq_start, full_end,
                  offs_m, 0, 1, qk_scale, offs_n, d_mask, False, False, EVEN_D, BLOCK_N)  # fmt: skip
    dq = _dq_keys(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, seq_end,
                  offs_m, 0, 1, qk_scale, offs_n, d_mask, True, False, EVEN_D, BLOCK_N)  # fmt: skip

    g_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


def varlen_tile(table: dict, launch: str, head_dim: int, elem_size: int):
    """The tile the varlen kernels launch with: the global tile of ``table`` (see _attention_configs),
    except where ptxas spills the varlen variant (it also keeps its segment bounds in registers)."""
    from ._attention_configs import AMPERE_TABLE, Tile, block_d_of

    bd = block_d_of(head_dim)
    if table is AMPERE_TABLE and (launch, bd, elem_size) == ("dkdv", 64, 4):
        return Tile(64, 32, 8, 3)  # sm_80: the 128-key fp32 tile spills 16 B here
    return table[launch, bd, elem_size, False]


def AUDIT_CONFIGS():  # noqa: N802 (name fixed by radio_kernels._audit_registry)
    """One AuditConfig per (arch, launch, head dim, dtype) of the varlen kernels.

    They launch with the global tiles of the attention tables (``fwd`` / ``dq`` / ``dkdv``, not
    narrow) and the same stride units, so each entry mirrors the global entry of
    ``_attention_configs.AUDIT_CONFIGS``; the tile table / cu_seqlens pointers are int32.
    """
    from ._attention_configs import AUDIT_DTYPES, AUDIT_HEAD_DIMS, BLACKWELL, GPU_TABLES, HOPPER, block_d_of
    from ._audit_registry import AuditConfig, signature_of

    floats = ("qk_scale", "sm_scale")
    kernels = {"fwd": attn_varlen_fwd_kernel, "dq": attn_varlen_bwd_dq_kernel, "dkdv": attn_varlen_bwd_dkdv_kernel}
    out = []
    for arch, table in GPU_TABLES.items():
        for dtype in AUDIT_DTYPES:
            es = 4 if dtype == "fp32" else 2
            ptrs = {name: ("fp32" if name in ("LSE", "DELTA") else dtype) for name in
                    ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA")}  # fmt: skip
            ptrs.update(TILE_SEQ="i32", TILE_ROW="i32", CU="i32")
            for d in AUDIT_HEAD_DIMS:
                bd, unit = block_d_of(d), 16 if d % 16 == 0 else 8
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
                        constexprs={"HEAD_D": d, "BLOCK_D": bd, "STRIDE_UNIT": unit,
                                    rows: tile.block_m, cols: tile.block_n},
                        num_warps=tile.num_warps, num_stages=tile.num_stages, uses_dot=True, archs=(arch,),
                        expect_wgmma=arch in (HOPPER, BLACKWELL) and es == 2 and tile.block_m >= 64,
                        sample=arch == HOPPER and dtype == "bf16" and d == 64,
                    ))  # fmt: skip
    return out
