"""Triton kernels of fused attention with ViTDet windows and global prefix tokens.

Notation (one batch element and head; P = num_prefix, T = window_tokens)::

    s_ij = q_i . k_j                       raw scores
    c    = scale * log2(e)                 scores are kept in base 2: exp(scale s) = exp2(c s)
    m_i  = max_j c s_ij,  l_i = sum_j exp2(c s_ij - m_i)
    o_i  = sum_j exp2(c s_ij - m_i) v_j / l_i
    L_i  = m_i + log2 l_i                  base-2 logsumexp, saved for the backward
    p_ij = exp2(c s_ij - L_i)              recomputed in the backward
    delta_i = do_i . o_i                   (= sum_j p_ij dp_ij)
    dp_ij   = do_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
    dv_j = sum_i p_ij do_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j

Only visible pairs enter the sums. Visibility is symmetric (query i sees key j iff key j's row
would see query i): with T > 0, i sees j iff i < P or j < P or both lie in one window. So one
helper, ``_visible_ranges``, gives for a tile of rows (queries in the forward and dQ, keys in dK/dV)
the blocks of the other side to visit:

    prefix range  [0, P)                               every patch row sees it
    window range  [P + w_lo T, P + (w_hi + 1) T)       the windows w_lo..w_hi the tile overlaps

Blocks of no other window are never loaded. Rows of the prefix are run in a separate launch that
visits all N columns (``WINDOWED=False``), with a small BLOCK_M so the long pass costs little.
Blocks wholly inside a range that serves a single window are visible to every row of the tile and
run without masks; only a range's last partial block and tiles straddling windows are masked.

The backward is deterministic: dK/dV programs own a key tile and loop over the queries that see
it, dQ programs own a query tile and loop over keys; nothing is accumulated across programs.

Strides arrive divided by STRIDE_UNIT (the largest power of two <= 16 dividing all of them) and
are multiplied back by that constexpr: Triton only detects divisibility by 16 of integer arguments,
so without this a head stride of 72 (D = 72) would hide that every row starts 16-byte aligned, and
the loads would neither vectorise nor go through cp.async (seen with ptxas: spills, no LDGSTS).

float32 inputs: ``tl.dot`` uses TF32 tensor cores on the GPU (10-bit mantissa products, fp32
accumulate), like cuDNN/cuBLAS with TF32 enabled; the interpreter computes in full fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible_ranges(row_start, row_end, N, P, T, WINDOWED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """Column ranges seen by rows [row_start, row_end) (row_end clipped to N).

    Returns (pre_full, pre_end, win_start, win_full, win_end): blocks in [0, pre_full) and
    [win_start, win_full) need no mask, [pre_full, pre_end) and [win_full, win_end) do. The prefix
    range is walked in blocks of BLOCK_P (small: P is ~10), the window range in blocks of BLOCK.
    Without WINDOWED the rows see all N columns, expressed as the "prefix" range [0, N) in
    blocks of BLOCK (BLOCK_P is then BLOCK).
    """
    if WINDOWED:
        pre_end = P
        w_lo = (row_start - P) // T
        w_hi = (row_end - 1 - P) // T
        win_start = P + w_lo * T
        win_end = P + (w_hi + 1) * T
        # A tile straddling windows masks every block: each of its rows sees only its own window.
        win_full = tl.where(w_lo == w_hi, win_start + ((win_end - win_start) // BLOCK) * BLOCK, win_start)
    else:
        pre_end = N
        win_start = 0
        win_full = 0
        win_end = 0
    pre_full = (pre_end // BLOCK_P) * BLOCK_P
    return pre_full, pre_end, win_start, win_full, win_end


@triton.jit
def _load_tile(ptrs, rows, limit, d_mask, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (BLOCK, BLOCK_D) tile, zero outside rows < limit (if MASK_ROWS) and d < HEAD_D."""
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=(rows < limit)[:, None], other=0.0)
        return tl.load(ptrs, mask=(rows < limit)[:, None] & d_mask[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_mask[None, :], other=0.0)


@triton.jit
def _window_of(idx, P, T):
    return (idx - P) // T


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_keys(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    lo, hi, row_win, P, T, qk_scale, offs_n, d_mask,
    MASKED: tl.constexpr, WINDOW_MASK: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) with the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols, hi, d_mask, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            visible = (cols < hi)[None, :]
            if WINDOW_MASK:
                visible = visible & (_window_of(cols, P, T)[None, :] == row_win[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_shift = m_new
        p = tl.math.exp2(s * qk_scale - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols, hi, d_mask, MASKED, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, P, T, q_start, q_end, qk_scale,
    WINDOWED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: queries [q_start + pid0 * BLOCK_M, ...) < q_end of batch*head pid1."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_start = q_start + tl.program_id(0) * BLOCK_M
    row_end = tl.minimum(row_start + BLOCK_M, q_end)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, q_end, d_mask, True, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    k_ptrs, v_ptrs = k_base + offs_n[:, None] * stride_kn, v_base + offs_n[:, None] * stride_vn
    kp_ptrs, vp_ptrs = k_base + offs_p[:, None] * stride_kn, v_base + offs_p[:, None] * stride_vn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_win = _window_of(offs_m, P, T) if WINDOWED else offs_m
    pre_full, pre_end, win_start, win_full, win_end = _visible_ranges(
        row_start, row_end, N, P, T, WINDOWED, BLOCK_P, BLOCK_N
    )
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, kp_ptrs, vp_ptrs, stride_kn, stride_vn, 0, pre_full,
                              row_win, P, T, qk_scale, offs_p, d_mask, False, False, EVEN_D, BLOCK_P)  # fmt: skip
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, kp_ptrs, vp_ptrs, stride_kn, stride_vn, pre_full, pre_end,
                              row_win, P, T, qk_scale, offs_p, d_mask, True, False, EVEN_D, BLOCK_P)  # fmt: skip
    if WINDOWED:
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, win_start, win_full,
                                  row_win, P, T, qk_scale, offs_n, d_mask, False, True, EVEN_D, BLOCK_N)  # fmt: skip
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, win_full, win_end,
                                  row_win, P, T, qk_scale, offs_n, d_mask, True, True, EVEN_D, BLOCK_N)  # fmt: skip

    # Rows past q_end saw only zeros or nothing (l = 0); they are not stored.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_ok = offs_m < q_end
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, N, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d do_id o_id in float32, stored (B*H, N)."""
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dkdv_queries(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
    lo, hi, col_win, P, T, qk_scale, offs_m, d_mask,
    MASKED: tl.constexpr, WINDOW_MASK: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key tile over the query blocks starting in [lo, hi).

    Works on transposed scores (keys x queries) so dK, dV come out as (BLOCK_N, BLOCK_D).
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_ptrs + start_m * stride_qn, rows, hi, d_mask, MASKED, EVEN_D)
        do = _load_tile(do_ptrs + start_m * stride_don, rows, hi, d_mask, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows < hi, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rows < hi, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASKED:
            visible = (rows < hi)[None, :]
            if WINDOW_MASK:
                visible = visible & (_window_of(rows, P, T)[None, :] == col_win[:, None])
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, P, T, k_start, k_end, qk_scale, sm_scale,
    WINDOWED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of keys [k_start + pid0 * BLOCK_N, ...) < k_end of batch*head pid1.

    DK and DV share the strides (stride_g*) of one output layout.
    """
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    col_start = k_start + tl.program_id(0) * BLOCK_N
    col_end = tl.minimum(col_start + BLOCK_N, k_end)
    offs_n = col_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D

    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, k_end, d_mask, True, EVEN_D)  # fmt: skip
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, k_end, d_mask, True, EVEN_D)  # fmt: skip
    q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
    do_base = DO + b * stride_dob + h * stride_doh + offs_d[None, :]
    q_ptrs, do_ptrs = q_base + offs_m[:, None] * stride_qn, do_base + offs_m[:, None] * stride_don
    qp_ptrs, dop_ptrs = q_base + offs_p[:, None] * stride_qn, do_base + offs_p[:, None] * stride_don
    lse_ptr = LSE + pid_bh.to(tl.int64) * N
    delta_ptr = DELTA + pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    col_win = _window_of(offs_n, P, T) if WINDOWED else offs_n
    pre_full, pre_end, win_start, win_full, win_end = _visible_ranges(
        col_start, col_end, N, P, T, WINDOWED, BLOCK_P, BLOCK_M
    )
    dk, dv = _dkdv_queries(dk, dv, k, v, qp_ptrs, dop_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                           0, pre_full, col_win, P, T, qk_scale, offs_p, d_mask,
                           False, False, EVEN_D, BLOCK_P)  # fmt: skip
    dk, dv = _dkdv_queries(dk, dv, k, v, qp_ptrs, dop_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                           pre_full, pre_end, col_win, P, T, qk_scale, offs_p, d_mask,
                           True, False, EVEN_D, BLOCK_P)  # fmt: skip
    if WINDOWED:
        dk, dv = _dkdv_queries(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                               win_start, win_full, col_win, P, T, qk_scale, offs_m, d_mask,
                               False, True, EVEN_D, BLOCK_M)  # fmt: skip
        dk, dv = _dkdv_queries(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                               win_full, win_end, col_win, P, T, qk_scale, offs_m, d_mask,
                               True, True, EVEN_D, BLOCK_M)  # fmt: skip

    mask = (offs_n < k_end)[:, None] & d_mask[None, :]
    g_off = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_keys(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
    lo, hi, row_win, P, T, qk_scale, offs_n, d_mask,
    MASKED: tl.constexpr, WINDOW_MASK: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ (unscaled) of one query tile over the key blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols, hi, d_mask, MASKED, EVEN_D)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols, hi, d_mask, MASKED, EVEN_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            visible = (cols < hi)[None, :]
            if WINDOW_MASK:
                visible = visible & (_window_of(cols, P, T)[None, :] == row_win[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, P, T, q_start, q_end, qk_scale, sm_scale,
    WINDOWED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dQ of queries [q_start + pid0 * BLOCK_M, ...) < q_end of batch*head pid1."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_start = q_start + tl.program_id(0) * BLOCK_M
    row_end = tl.minimum(row_start + BLOCK_M, q_end)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_D
    row_ok = offs_m < q_end

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, q_end, d_mask, True, EVEN_D)  # fmt: skip
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, q_end, d_mask, True, EVEN_D)  # fmt: skip
    # Rows past q_end: q = do = 0 and lse = +inf make p = 0, so they add nothing anywhere.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    k_ptrs, v_ptrs = k_base + offs_n[:, None] * stride_kn, v_base + offs_n[:, None] * stride_vn
    kp_ptrs, vp_ptrs = k_base + offs_p[:, None] * stride_kn, v_base + offs_p[:, None] * stride_vn

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_win = _window_of(offs_m, P, T) if WINDOWED else offs_m
    pre_full, pre_end, win_start, win_full, win_end = _visible_ranges(
        row_start, row_end, N, P, T, WINDOWED, BLOCK_P, BLOCK_N
    )
    dq = _dq_keys(dq, q, do, lse, delta, kp_ptrs, vp_ptrs, stride_kn, stride_vn, 0, pre_full,
                  row_win, P, T, qk_scale, offs_p, d_mask, False, False, EVEN_D, BLOCK_P)  # fmt: skip
    dq = _dq_keys(dq, q, do, lse, delta, kp_ptrs, vp_ptrs, stride_kn, stride_vn, pre_full, pre_end,
                  row_win, P, T, qk_scale, offs_p, d_mask, True, False, EVEN_D, BLOCK_P)  # fmt: skip
    if WINDOWED:
        dq = _dq_keys(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, win_start, win_full,
                      row_win, P, T, qk_scale, offs_n, d_mask, False, True, EVEN_D, BLOCK_N)  # fmt: skip
        dq = _dq_keys(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, win_full, win_end,
                      row_win, P, T, qk_scale, offs_n, d_mask, True, True, EVEN_D, BLOCK_N)  # fmt: skip

    g_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


# The static GPU audit compiles these kernels with every tile attention.py can launch:
# see AUDIT_CONFIGS in _attention_configs.
