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

Only visible pairs enter the sums. With T > 0, i sees j iff i < P or j < P or both lie in one
window; visibility is symmetric, so queries (forward, dQ) and keys (dK/dV) are tiled alike.

Tiling (the launch plan is ``_attention_plan``; it is also what the static model counts):

- Rows come in *segments*: the whole sequence (global), or one window of T rows. A program owns
  BLOCK rows of one segment, never two: segment = pid0 // tiles_per_seg, and its rows start at
  segment start + seg_offset + (pid0 % tiles_per_seg) * BLOCK. A segment is covered by wide
  tiles and, for its last L mod BLOCK rows, 16-row tiles (a second launch in the backward, the
  same launch in the windowed forward), so at most 15 rows of a segment are computed and dropped.
  The global forward takes ceil(N / BLOCK) wide tiles, the last one partial.
- Columns are walked per range: full BLOCK_C blocks without masks, then the range's last
  L mod BLOCK_C columns in BLOCK_S (16) wide masked blocks. Windowed rows walk the prefix range
  [0, P) and their own window; other rows walk [0, N).
- Head dim D is split into chunks that cover it (``_attention_plan.head_chunks``): D0 = the largest
  power of two <= D, then D1 >= D - D0 (80 = 64 + 16, 72 = 64 + 8, 96 = 64 + 32). Products that
  contract over D (q k^T, do v^T) need K >= 16 and read chunk 1 DC1 = max(D1, 16) wide (masked);
  products whose output is D wide (p v, p^T do, ds^T q, ds k) use D1 exactly. No tile is padded
  to the next power of two.
- USE_TMA (Hopper, 16-bit, 16-byte aligned rows): the forward's full K / V blocks load through
  tensor descriptors (the tensor-memory accelerator), which zero-fill past HEAD_D; masked blocks and
  every other path load through pointers.
- Windowed forward: one launch (``attn_fwd_window_kernel``) holds both tile sizes (each window's
  wide tiles and 16-row tails) and the prefix queries, which see all N keys but get no pass of
  their own over K and V: a few programs walk the windows' keys for them, a group of windows each,
  and leave fp32 partial states (m, l, acc); one small combine program per (batch, head) adds the
  prefix keys and merges the groups in order (deterministic). All programs reading a window's K
  and V are in one launch, so they share them through L2.

The backward is deterministic: dK/dV programs own a key tile and loop over the queries that see
it, dQ programs own a query tile and loop over keys (recomputing S and dP: 7 products a pair);
nothing is accumulated across programs. The prefix rows' dQ and the prefix keys' dK/dV are
global-mode launches of 16-row tiles. Windowed, where the tile table ships its tiles, one program
owns a whole window (``attn_bwd_window_kernel``): it walks the window's keys in full BLOCK_N
tiles, then the rest (T mod BLOCK_N) in 16-key tiles, the last one masked (any T: a 144-token
window is 64 + 64 + 16 keys), and for each tile adds its share of the window's dQ to fp32 rows
only it touches (5 products a pair, summed in a fixed order, no atomics).

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


# ----------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------
@triton.jit
def _load_rows_where(
    base, rows, stride, row_ok,
    OFF: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr, MASK_ROWS: tl.constexpr,
):  # fmt: skip
    """(len(rows), W) tile of head-dim columns [OFF, OFF + W); zero where d >= HEAD_D or, with
    MASK_ROWS, where not row_ok. ``base`` points at row 0, column 0 of one (batch, head)."""
    cols = OFF + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if OFF + W <= HEAD_D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs)
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None] & (cols < HEAD_D)[None, :], other=0.0)
    return tl.load(ptrs, mask=(cols < HEAD_D)[None, :], other=0.0)


@triton.jit
def _load_rows(
    base, rows, stride, limit,
    OFF: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr, MASK_ROWS: tl.constexpr,
):  # fmt: skip
    """``_load_rows_where`` with rows >= limit masked."""
    return _load_rows_where(base, rows, stride, rows < limit, OFF, W, HEAD_D, MASK_ROWS)


@triton.jit
def _store_rows(base, rows, stride, row_ok, x, OFF: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr):
    """Store x (len(rows), W) into head-dim columns [OFF, OFF + W) of the rows where row_ok."""
    cols = OFF + tl.arange(0, W)
    mask = row_ok[:, None]
    if OFF + W > HEAD_D:
        mask = mask & (cols < HEAD_D)[None, :]
    tl.store(base + rows[:, None] * stride + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_pair(
    A, B, rows, stride_a, stride_b, limit,
    HEAD_D: tl.constexpr, D0: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """(a0, a1, b0, b1): head-dim chunk 0 (D0 wide) and chunk 1 (DC1 wide, the contraction width) of
    two tensors' rows < limit, as the products that contract over D read them. With one chunk, a1 and
    b1 are a0 and b0 (unused)."""
    a0 = _load_rows(A, rows, stride_a, limit, 0, D0, HEAD_D, True)
    b0 = _load_rows(B, rows, stride_b, limit, 0, D0, HEAD_D, True)
    if DC1 > 0:
        a1 = _load_rows(A, rows, stride_a, limit, D0, DC1, HEAD_D, True)
        b1 = _load_rows(B, rows, stride_b, limit, D0, DC1, HEAD_D, True)
    else:
        a1 = a0
        b1 = b0
    return a0, a1, b0, b1


@triton.jit
def _row_tile(row_base, seg_len, seg_offset, tiles_per_seg, BLOCK: tl.constexpr):
    """(segment index, segment start, segment end, first row) of this program's tile."""
    pid = tl.program_id(0)
    seg = pid // tiles_per_seg
    seg_start = row_base + seg * seg_len
    row_start = seg_start + seg_offset + (pid % tiles_per_seg) * BLOCK
    return seg, seg_start, seg_start + seg_len, row_start


@triton.jit
def _bh_offsets(H):
    pid_bh = tl.program_id(1)
    return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_update(acc0, acc1, l_i, m_i, s, v0, v1, qk_scale, MASKED: tl.constexpr, D1: tl.constexpr):
    """One online-softmax step: fold scores s (rows x keys, -inf where masked) and the keys' values
    (v0, v1: the two head-dim chunks) into (acc0, acc1, l_i, m_i)."""
    if MASKED:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_shift = m_new
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
    if D1 > 0:
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
    return acc0, acc1, l_i, m_new


@triton.jit
def _fwd_keys(
    acc0, acc1, l_i, m_i, q0, q1, K, V, stride_kn, stride_vn, lo, hi, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (acc0, acc1, l_i, m_i) with the key blocks starting in [lo, hi),
    loaded through pointers."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k0 = _load_rows(K, cols, stride_kn, hi, 0, D0, HEAD_D, MASKED)
        s = tl.dot(q0, tl.trans(k0))
        if DC1 > 0:
            k1 = _load_rows(K, cols, stride_kn, hi, D0, DC1, HEAD_D, MASKED)
            s = tl.dot(q1, tl.trans(k1), s)
        if MASKED:
            s = tl.where((cols < hi)[None, :], s, float("-inf"))
        v0 = _load_rows(V, cols, stride_vn, hi, 0, D0, HEAD_D, MASKED)
        if D1 > 0:
            v1 = _load_rows(V, cols, stride_vn, hi, D0, D1, HEAD_D, MASKED)
        else:
            v1 = v0  # unused
        acc0, acc1, l_i, m_i = _fwd_update(acc0, acc1, l_i, m_i, s, v0, v1, qk_scale, MASKED, D1)
    return acc0, acc1, l_i, m_i


@triton.jit
def _fwd_keys_tma(
    acc0, acc1, l_i, m_i, q0, q1, kd0, kd1, vd0, vd1, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """``_fwd_keys`` over full (unmasked) key blocks, loaded by the tensor-memory accelerator through
    the descriptors of the head's K and V chunks (``_kv_descriptors``)."""
    for start_n in range(lo, hi, BLOCK_N):
        s = tl.dot(q0, tl.trans(kd0.load([start_n, 0])))
        if DC1 > 0:
            s = tl.dot(q1, tl.trans(kd1.load([start_n, D0])), s)
        v0 = vd0.load([start_n, 0])
        if D1 > 0:
            v1 = vd1.load([start_n, D0])
        else:
            v1 = v0  # unused
        acc0, acc1, l_i, m_i = _fwd_update(acc0, acc1, l_i, m_i, s, v0, v1, qk_scale, False, D1)
    return acc0, acc1, l_i, m_i


@triton.jit
def _kv_descriptors(
    Kh, Vh, N, stride_kn, stride_vn,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Tensor descriptors of one head's K and V (N x HEAD_D, zero-filled past HEAD_D): the chunk-0
    blocks (BLOCK_N, D0), K's chunk 1 at its contraction width DC1 and V's at its exact width D1."""
    kd0 = tl.make_tensor_descriptor(Kh, shape=[N, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, D0])
    vd0 = tl.make_tensor_descriptor(Vh, shape=[N, HEAD_D], strides=[stride_vn, 1], block_shape=[BLOCK_N, D0])
    if DC1 > 0:
        kd1 = tl.make_tensor_descriptor(Kh, shape=[N, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, DC1])
        vd1 = tl.make_tensor_descriptor(Vh, shape=[N, HEAD_D], strides=[stride_vn, 1], block_shape=[BLOCK_N, D1])
    else:
        kd1 = kd0  # unused
        vd1 = vd0
    return kd0, kd1, vd0, vd1


@triton.jit
def _fwd_range(
    acc0, acc1, l_i, m_i, q0, q1, K, V, stride_kn, stride_vn, lo, hi, qk_scale, kd0, kd1, vd0, vd1,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Keys [lo, hi): full BLOCK_N blocks unmasked (through the descriptors with USE_TMA), the rest
    in masked BLOCK_S blocks."""
    full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    if USE_TMA:
        acc0, acc1, l_i, m_i = _fwd_keys_tma(acc0, acc1, l_i, m_i, q0, q1, kd0, kd1, vd0, vd1, lo, full, qk_scale,
                                             BLOCK_N, D0, D1, DC1)  # fmt: skip
    else:
        acc0, acc1, l_i, m_i = _fwd_keys(acc0, acc1, l_i, m_i, q0, q1, K, V, stride_kn, stride_vn, lo, full,
                                         qk_scale, False, BLOCK_N, HEAD_D, D0, D1, DC1)  # fmt: skip
    return _fwd_keys(acc0, acc1, l_i, m_i, q0, q1, K, V, stride_kn, stride_vn, full, hi,
                     qk_scale, True, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip


@triton.jit
def _fwd_init(rows, Q, stride_qn, row_ok, BLOCK: tl.constexpr,
              HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr):  # fmt: skip
    """(q0, q1, acc0, acc1, l, m) of a fresh online softmax over rows ``rows`` (zero where not row_ok)."""
    q0 = _load_rows_where(Q, rows, stride_qn, row_ok, 0, D0, HEAD_D, True)
    if DC1 > 0:
        q1 = _load_rows_where(Q, rows, stride_qn, row_ok, D0, DC1, HEAD_D, True)
    else:
        q1 = q0  # unused
    acc0 = tl.zeros([BLOCK, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK, D1 if D1 > 0 else 16], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    return q0, q1, acc0, acc1, l_i, m_i


@triton.jit
def _scale_strides(stride_b, stride_h, stride_n, STRIDE_UNIT: tl.constexpr):
    return stride_b * STRIDE_UNIT, stride_h * STRIDE_UNIT, stride_n * STRIDE_UNIT


@triton.jit
def _fwd_finish(Oh, lse_ptr, rows, stride_on, row_ok, acc0, acc1, l_i, m_i,
                HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):  # fmt: skip
    """Normalise and store the output rows and their base-2 logsumexp where row_ok. Rows that are not
    stored saw only zeros (l > 0, finite) or nothing (l = 0: divided by 1)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(Oh, rows, stride_on, row_ok, acc0 / l_safe[:, None], 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(Oh, rows, stride_on, row_ok, acc1 / l_safe[:, None], D0, D1, HEAD_D)
    tl.store(lse_ptr + rows, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Global attention, one program: queries [pid0 * BLOCK_M, ...) < N of batch*head pid1 over all N keys.
    (The last tile is partial: a separate tail launch would stream K and V a second time.)"""
    stride_qb, stride_qh, stride_qn = _scale_strides(stride_qb, stride_qh, stride_qn, STRIDE_UNIT)
    stride_kb, stride_kh, stride_kn = _scale_strides(stride_kb, stride_kh, stride_kn, STRIDE_UNIT)
    stride_vb, stride_vh, stride_vn = _scale_strides(stride_vb, stride_vh, stride_vn, STRIDE_UNIT)
    stride_ob, stride_oh, stride_on = _scale_strides(stride_ob, stride_oh, stride_on, STRIDE_UNIT)
    pid_bh, b, h = _bh_offsets(H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    q0, q1, acc0, acc1, l_i, m_i = _fwd_init(rows, Q + b * stride_qb + h * stride_qh, stride_qn, row_ok, BLOCK_M,
                                             HEAD_D, D0, D1, DC1)  # fmt: skip
    if USE_TMA:
        kd0, kd1, vd0, vd1 = _kv_descriptors(Kh, Vh, N, stride_kn, stride_vn, BLOCK_N, HEAD_D, D0, D1, DC1)
    else:
        kd0, kd1, vd0, vd1 = Kh, Kh, Vh, Vh  # unused
    acc0, acc1, l_i, m_i = _fwd_range(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, 0, N, qk_scale,
                                      kd0, kd1, vd0, vd1, BLOCK_N, BLOCK_S, USE_TMA, HEAD_D, D0, D1, DC1)  # fmt: skip
    _fwd_finish(O + b * stride_ob + h * stride_oh, LSE + pid_bh.to(tl.int64) * N, rows, stride_on, row_ok,
                acc0, acc1, l_i, m_i, HEAD_D, D0, D1)  # fmt: skip


@triton.jit
def _fwd_window_rows(
    Qh, Kh, Vh, Oh, lse_ptr, stride_qn, stride_kn, stride_vn, stride_on, kd0, kd1, vd0, vd1,
    P, seg_start, seg_end, row_start, qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Queries [row_start, row_start + BLOCK) < seg_end of the window [seg_start, seg_end): softmax over
    the prefix keys and the window's keys; O and LSE stored."""
    rows = row_start + tl.arange(0, BLOCK)
    row_ok = rows < seg_end
    q0, q1, acc0, acc1, l_i, m_i = _fwd_init(rows, Qh, stride_qn, row_ok, BLOCK, HEAD_D, D0, D1, DC1)
    # The prefix keys (~10) in masked BLOCK_S steps.
    acc0, acc1, l_i, m_i = _fwd_keys(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, 0, P, qk_scale,
                                     True, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
    acc0, acc1, l_i, m_i = _fwd_range(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, seg_start,
                                      seg_end, qk_scale, kd0, kd1, vd0, vd1, BLOCK_N, BLOCK_S, USE_TMA,
                                      HEAD_D, D0, D1, DC1)  # fmt: skip
    _fwd_finish(Oh, lse_ptr, rows, stride_on, row_ok, acc0, acc1, l_i, m_i, HEAD_D, D0, D1)


@triton.jit
def _fwd_prefix_partial(
    Qh, Kh, Vh, part_acc, part_ml, stride_qn, stride_kn, stride_vn, kd0, kd1, vd0, vd1,
    P, T, first_window, end_window, prefix_tile, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Prefix queries [prefix_tile * BLOCK_S, ...) < P over the keys of windows [first_window, end_window):
    their unnormalised state (acc, m, l) stored to part_acc (P, HEAD_D) and part_ml (2, P), fp32."""
    rows = prefix_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < P
    q0, q1, acc0, acc1, l_i, m_i = _fwd_init(rows, Qh, stride_qn, row_ok, BLOCK_S, HEAD_D, D0, D1, DC1)
    for w in range(first_window, end_window):
        seg_start = P + w * T
        acc0, acc1, l_i, m_i = _fwd_range(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, seg_start,
                                          seg_start + T, qk_scale, kd0, kd1, vd0, vd1, BLOCK_N, BLOCK_S, USE_TMA,
                                          HEAD_D, D0, D1, DC1)  # fmt: skip
    # Every window holds >= 1 key, so m is finite in every row (rows >= P read q = 0: s = 0).
    _store_rows(part_acc, rows, HEAD_D, row_ok, acc0, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(part_acc, rows, HEAD_D, row_ok, acc1, D0, D1, HEAD_D)
    tl.store(part_ml + rows, m_i, mask=row_ok)
    tl.store(part_ml + P + rows, l_i, mask=row_ok)


@triton.jit
def attn_fwd_window_kernel(
    Q, K, V, O, LSE, PART_ACC, PART_ML,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, P, T, wide_tiles, tail_tiles, windows_per_part, n_part, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """The whole windowed forward but the prefix keys' share of the prefix queries, in one launch, so
    that the programs reading a window's K and V run together (they share them through L2).

    Programs of batch*head pid1, in pid0 order:
    - n_part * ceil(P / BLOCK_S) *prefix* programs: part j's program for prefix tile i walks the keys of
      windows [j * windows_per_part, (j + 1) * windows_per_part) for prefix queries [16 i, 16 i + 16) and
      stores their partial state to PART_ACC (BH, n_part, P, HEAD_D) / PART_ML (BH, n_part, 2, P), fp32;
      the combine kernel adds the prefix keys and merges the parts in order (deterministic). They come
      first: they walk the most keys.
    - per window, wide_tiles tiles of BLOCK_M queries, then tail_tiles of BLOCK_S (16) queries, so no
      tile spans two windows and at most 15 rows a window are computed and dropped. Each walks the
      prefix keys and its window's keys and stores its rows' O and LSE.

    The 16-row programs (prefix and tails) walk keys in BLOCK_S steps through pointers: with the wide
    tiles' BLOCK_N steps their mma.sync tiles need ~180 registers (sm_90) and the kernel, sized by
    its widest branch, would lose its second block per SM or spill.
    """
    stride_qb, stride_qh, stride_qn = _scale_strides(stride_qb, stride_qh, stride_qn, STRIDE_UNIT)
    stride_kb, stride_kh, stride_kn = _scale_strides(stride_kb, stride_kh, stride_kn, STRIDE_UNIT)
    stride_vb, stride_vh, stride_vn = _scale_strides(stride_vb, stride_vh, stride_vn, STRIDE_UNIT)
    stride_ob, stride_oh, stride_on = _scale_strides(stride_ob, stride_oh, stride_on, STRIDE_UNIT)
    pid_bh, b, h = _bh_offsets(H)
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    if USE_TMA:
        kd0, kd1, vd0, vd1 = _kv_descriptors(Kh, Vh, N, stride_kn, stride_vn, BLOCK_N, HEAD_D, D0, D1, DC1)
    else:
        kd0, kd1, vd0, vd1 = Kh, Kh, Vh, Vh  # unused
    prefix_tiles = (P + BLOCK_S - 1) // BLOCK_S
    pid = tl.program_id(0)
    if pid < n_part * prefix_tiles:
        part = pid // prefix_tiles
        n_seg = (N - P) // T
        first = part * windows_per_part
        offset = (pid_bh.to(tl.int64) * n_part + part) * P
        _fwd_prefix_partial(Qh, Kh, Vh, PART_ACC + offset * HEAD_D, PART_ML + offset * 2, stride_qn, stride_kn,
                            stride_vn, kd0, kd1, vd0, vd1, P, T, first, tl.minimum(first + windows_per_part, n_seg),
                            pid % prefix_tiles, qk_scale, BLOCK_S, BLOCK_S, False,
                            HEAD_D, D0, D1, DC1)  # fmt: skip
    else:
        tile = pid - n_part * prefix_tiles
        seg = tile // (wide_tiles + tail_tiles)
        j = tile % (wide_tiles + tail_tiles)
        seg_start = P + seg * T
        Oh = O + b * stride_ob + h * stride_oh
        lse_ptr = LSE + pid_bh.to(tl.int64) * N
        if j < wide_tiles:
            _fwd_window_rows(Qh, Kh, Vh, Oh, lse_ptr, stride_qn, stride_kn, stride_vn, stride_on,
                             kd0, kd1, vd0, vd1, P, seg_start, seg_start + T, seg_start + j * BLOCK_M, qk_scale,
                             BLOCK_M, BLOCK_N, BLOCK_S, USE_TMA, HEAD_D, D0, D1, DC1)  # fmt: skip
        else:
            row_start = seg_start + wide_tiles * BLOCK_M + (j - wide_tiles) * BLOCK_S
            _fwd_window_rows(Qh, Kh, Vh, Oh, lse_ptr, stride_qn, stride_kn, stride_vn, stride_on,
                             kd0, kd1, vd0, vd1, P, seg_start, seg_start + T, row_start, qk_scale,
                             BLOCK_S, BLOCK_S, BLOCK_S, False, HEAD_D, D0, D1, DC1)  # fmt: skip


@triton.jit
def attn_fwd_prefix_combine_kernel(
    Q, K, V, O, LSE, PART_ACC, PART_ML,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, P, n_part, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: prefix queries [pid0 * BLOCK_S, ...) < P of batch*head pid1. Their softmax over
    the prefix keys, merged with the n_part partial states of PART_ACC / PART_ML (``attn_fwd_window_kernel``)
    in part order."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    Qh = Q + b * stride_qb + h * stride_qh
    q0, q1, acc0, acc1, l_i, m_i = _fwd_init(rows, Qh, stride_qn, rows < P, BLOCK_S, HEAD_D, D0, D1, DC1)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    acc0, acc1, l_i, m_i = _fwd_range(acc0, acc1, l_i, m_i, q0, q1, Kh, Vh, stride_kn, stride_vn, 0, P, qk_scale,
                                      Kh, Kh, Vh, Vh, BLOCK_N, BLOCK_S, False, HEAD_D, D0, D1, DC1)  # fmt: skip
    # Every row < P saw a prefix key, so m_i is finite there; rows >= P read zeros and are not stored.
    row_ok = rows < P
    for j in range(0, n_part):
        part = (pid_bh.to(tl.int64) * n_part + j) * P
        m_w = tl.load(PART_ML + part * 2 + rows, mask=row_ok, other=0.0)
        l_w = tl.load(PART_ML + part * 2 + P + rows, mask=row_ok, other=0.0)
        m_new = tl.maximum(m_i, m_w)
        a = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(m_w - m_new)
        l_i = l_i * a + l_w * w
        part_acc = PART_ACC + part * HEAD_D
        acc0 = acc0 * a[:, None] + _load_rows(part_acc, rows, HEAD_D, P, 0, D0, HEAD_D, True) * w[:, None]
        if D1 > 0:
            acc1 = acc1 * a[:, None] + _load_rows(part_acc, rows, HEAD_D, P, D0, D1, HEAD_D, True) * w[:, None]
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    Oh = O + b * stride_ob + h * stride_oh
    _store_rows(Oh, rows, stride_on, rows < P, acc0 / l_safe[:, None], 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(Oh, rows, stride_on, rows < P, acc1 / l_safe[:, None], D0, D1, HEAD_D)
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, m_i + tl.math.log2(l_safe), mask=row_ok)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, N, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d do_id o_id in float32, stored (B*H, N). Elementwise: masked columns cost no
    bytes, so one BLOCK_D >= HEAD_D tile serves."""
    stride_ob, stride_oh, stride_on = stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT, stride_on * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_on, N, 0, BLOCK_D, HEAD_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, N, 0, BLOCK_D, HEAD_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dq_rmw(dq_ptr, rows, row_ok, x, first, OFF: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr):
    """dq_ptr[rows, OFF:OFF+W] += x (fp32 rows of HEAD_D), or = x when ``first``. Only the program that
    owns these rows touches them, so no atomics: the sums run in a fixed order."""
    cols = OFF + tl.arange(0, W)
    mask = row_ok[:, None]
    if OFF + W > HEAD_D:
        mask = mask & (cols < HEAD_D)[None, :]
    ptrs = dq_ptr + rows[:, None] * HEAD_D + cols[None, :]
    old = tl.load(ptrs, mask=mask & (first == 0), other=0.0)
    tl.store(ptrs, old + x, mask=mask)


@triton.jit
def _dkdv_queries(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, stride_qn, stride_don, lse_ptr, delta_ptr,
    lo, hi, qk_scale, dq_ptr, dq_first, k1x, key_ok,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, WITH_DQ: tl.constexpr, MASK_KEYS: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key tile over the query blocks starting in [lo, hi).

    Works on transposed scores (keys x queries) so dK, dV come out as (keys, D chunk). WITH_DQ also
    adds this key tile's share of dQ (ds k, unscaled) to the fp32 rows of ``dq_ptr`` (``_dq_rmw``);
    k1x is chunk 1 of the keys at its exact width D1. MASK_KEYS: p = 0 for keys where not key_ok (their
    k = 0 would zero their dQ share, but exp2(-lse) can overflow to inf, and inf * 0 is NaN).
    """
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q0 = _load_rows(Q, rows, stride_qn, hi, 0, D0, HEAD_D, MASKED)
        do0 = _load_rows(DO, rows, stride_don, hi, 0, D0, HEAD_D, MASKED)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows < hi, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rows < hi, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        s_t = tl.dot(k0, tl.trans(q0))
        dp_t = tl.dot(v0, tl.trans(do0))
        if DC1 > 0:
            q1c = _load_rows(Q, rows, stride_qn, hi, D0, DC1, HEAD_D, MASKED)
            do1c = _load_rows(DO, rows, stride_don, hi, D0, DC1, HEAD_D, MASKED)
            s_t = tl.dot(k1, tl.trans(q1c), s_t)
            dp_t = tl.dot(v1, tl.trans(do1c), dp_t)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where((rows < hi)[None, :], p_t, 0.0)
        if MASK_KEYS:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
        p_t = p_t.to(do0.dtype)
        dv0 = tl.dot(p_t, do0, dv0)
        dk0 = tl.dot(ds_t, q0, dk0)
        if D1 > 0:
            if D1 == DC1:
                q1 = q1c
                do1 = do1c
            else:  # the 8-wide chunk of D = 8 mod 16: exact for the products it is the output of
                q1 = _load_rows(Q, rows, stride_qn, hi, D0, D1, HEAD_D, MASKED)
                do1 = _load_rows(DO, rows, stride_don, hi, D0, D1, HEAD_D, MASKED)
            dv1 = tl.dot(p_t, do1, dv1)
            dk1 = tl.dot(ds_t, q1, dk1)
        if WITH_DQ:
            ds = tl.trans(ds_t)
            row_ok = rows < hi
            _dq_rmw(dq_ptr, rows, row_ok, tl.dot(ds, k0), dq_first, 0, D0, HEAD_D)
            if D1 > 0:
                _dq_rmw(dq_ptr, rows, row_ok, tl.dot(ds, k1x), dq_first, D0, D1, HEAD_D)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_range(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, stride_qn, stride_don, lse_ptr, delta_ptr,
    lo, hi, qk_scale, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Queries [lo, hi): full BLOCK_M blocks unmasked, the rest in masked BLOCK_S blocks."""
    full = lo + ((hi - lo) // BLOCK_M) * BLOCK_M
    dk0, dk1, dv0, dv1 = _dkdv_queries(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, stride_qn, stride_don,
                                       lse_ptr, delta_ptr, lo, full, qk_scale, delta_ptr, 0, k1, 0,
                                       False, BLOCK_M, False, False, HEAD_D, D0, D1, DC1)  # fmt: skip
    return _dkdv_queries(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DO, stride_qn, stride_don,
                         lse_ptr, delta_ptr, full, hi, qk_scale, delta_ptr, 0, k1, 0,
                         True, BLOCK_S, False, False, HEAD_D, D0, D1, DC1)  # fmt: skip


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, P, row_base, seg_len, seg_offset, tiles_per_seg, qk_scale, sm_scale,
    WINDOWED: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of one BLOCK_N tile of keys of one segment of batch*head pid1; the inner
    loop walks queries in BLOCK_M blocks. DK and DV share the strides (stride_g*) of one layout."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    seg, seg_start, seg_end, col_start = _row_tile(row_base, seg_len, seg_offset, tiles_per_seg, BLOCK_N)
    keys = col_start + tl.arange(0, BLOCK_N)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    k0, k1, v0, v1 = _load_pair(Kh, Vh, keys, stride_kn, stride_vn, seg_end, HEAD_D, D0, DC1)
    Qh = Q + b * stride_qb + h * stride_qh
    DOh = DO + b * stride_dob + h * stride_doh
    lse_ptr = LSE + pid_bh.to(tl.int64) * N
    delta_ptr = DELTA + pid_bh.to(tl.int64) * N

    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    if WINDOWED:
        dk0, dk1, dv0, dv1 = _dkdv_range(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                         lse_ptr, delta_ptr, 0, P, qk_scale, BLOCK_M, BLOCK_S,
                                         HEAD_D, D0, D1, DC1)  # fmt: skip
        dk0, dk1, dv0, dv1 = _dkdv_range(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                         lse_ptr, delta_ptr, seg_start, seg_end, qk_scale, BLOCK_M, BLOCK_S,
                                         HEAD_D, D0, D1, DC1)  # fmt: skip
    else:
        dk0, dk1, dv0, dv1 = _dkdv_range(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                         lse_ptr, delta_ptr, 0, N, qk_scale, BLOCK_M, BLOCK_S,
                                         HEAD_D, D0, D1, DC1)  # fmt: skip

    DKh = DK + b * stride_gb + h * stride_gh
    DVh = DV + b * stride_gb + h * stride_gh
    _store_rows(DKh, keys, stride_gn, keys < seg_end, dk0 * sm_scale, 0, D0, HEAD_D)
    _store_rows(DVh, keys, stride_gn, keys < seg_end, dv0, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(DKh, keys, stride_gn, keys < seg_end, dk1 * sm_scale, D0, D1, HEAD_D)
        _store_rows(DVh, keys, stride_gn, keys < seg_end, dv1, D0, D1, HEAD_D)


@triton.jit
def _dq_keys(
    dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, stride_kn, stride_vn, lo, hi, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ (unscaled) of one query tile over the key blocks starting in [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k0 = _load_rows(K, cols, stride_kn, hi, 0, D0, HEAD_D, MASKED)
        v0 = _load_rows(V, cols, stride_vn, hi, 0, D0, HEAD_D, MASKED)
        s = tl.dot(q0, tl.trans(k0))
        dp = tl.dot(do0, tl.trans(v0))
        if DC1 > 0:
            k1c = _load_rows(K, cols, stride_kn, hi, D0, DC1, HEAD_D, MASKED)
            v1c = _load_rows(V, cols, stride_vn, hi, D0, DC1, HEAD_D, MASKED)
            s = tl.dot(q1, tl.trans(k1c), s)
            dp = tl.dot(do1, tl.trans(v1c), dp)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where((cols < hi)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0)
        if D1 > 0:
            if D1 == DC1:
                k1 = k1c
            else:
                k1 = _load_rows(K, cols, stride_kn, hi, D0, D1, HEAD_D, MASKED)
            dq1 = tl.dot(ds, k1, dq1)
    return dq0, dq1


@triton.jit
def _dq_range(
    dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, stride_kn, stride_vn, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
):  # fmt: skip
    """Keys [lo, hi): full BLOCK_N blocks unmasked, the rest in masked BLOCK_S blocks."""
    full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    dq0, dq1 = _dq_keys(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, stride_kn, stride_vn, lo, full, qk_scale,
                        False, BLOCK_N, HEAD_D, D0, D1, DC1)  # fmt: skip
    return _dq_keys(dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, stride_kn, stride_vn, full, hi, qk_scale,
                    True, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, P, row_base, seg_len, seg_offset, tiles_per_seg, qk_scale, sm_scale,
    WINDOWED: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: dQ of one BLOCK_M tile of queries of one segment of batch*head pid1."""
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    seg, seg_start, seg_end, row_start = _row_tile(row_base, seg_len, seg_offset, tiles_per_seg, BLOCK_M)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_end
    Qh = Q + b * stride_qb + h * stride_qh
    DOh = DO + b * stride_dob + h * stride_doh
    q0, q1, do0, do1 = _load_pair(Qh, DOh, rows, stride_qn, stride_don, seg_end, HEAD_D, D0, DC1)
    # Rows past the segment: q = do = 0 and lse = +inf make p = 0, so they add nothing anywhere.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh

    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    if WINDOWED:
        dq0, dq1 = _dq_range(dq0, dq1, q0, q1, do0, do1, lse, delta, Kh, Vh, stride_kn, stride_vn, 0, P,
                             qk_scale, BLOCK_N, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
        dq0, dq1 = _dq_range(dq0, dq1, q0, q1, do0, do1, lse, delta, Kh, Vh, stride_kn, stride_vn,
                             seg_start, seg_end, qk_scale, BLOCK_N, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
    else:
        dq0, dq1 = _dq_range(dq0, dq1, q0, q1, do0, do1, lse, delta, Kh, Vh, stride_kn, stride_vn, 0, N,
                             qk_scale, BLOCK_N, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip

    DQh = DQ + b * stride_gb + h * stride_gh
    _store_rows(DQh, rows, stride_gn, rows < seg_end, dq0 * sm_scale, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(DQh, rows, stride_gn, rows < seg_end, dq1 * sm_scale, D0, D1, HEAD_D)


@triton.jit
def attn_bwd_window_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, DQACC,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    H, N, P, T, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, STRIDE_UNIT: tl.constexpr,
):  # fmt: skip
    """One program: the backward of window pid0 of batch*head pid1, in 5 products a pair.

    The window's keys are walked in T // BLOCK_N full tiles of BLOCK_N keys and its last T mod
    BLOCK_N keys in BLOCK_S (16) key tiles, the last one masked (these run first): a 144-token
    window is 64 + 64 + 16 keys, not three 64-key tiles (192 keys) nor separate dK/dV and dQ
    launches (7 products a pair).
    For each key tile: dK, dV over the prefix queries and the window's queries, and, for the
    window's queries, their share of dQ (ds k) added to DQACC (B*H, N, HEAD_D) fp32 rows that only
    this program touches (deterministic, no atomics; the first key tile starts the sums). Then the
    window's dQ gets the prefix keys' share and is scaled and stored. (The prefix queries' dQ and the
    prefix keys' dK, dV are the 16-row global-mode launches.)
    """
    stride_qb, stride_qh, stride_qn = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qn * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_dob, stride_doh, stride_don = stride_dob * STRIDE_UNIT, stride_doh * STRIDE_UNIT, stride_don * STRIDE_UNIT
    stride_gb, stride_gh, stride_gn = stride_gb * STRIDE_UNIT, stride_gh * STRIDE_UNIT, stride_gn * STRIDE_UNIT
    pid_bh, b, h = _bh_offsets(H)
    seg_start = P + tl.program_id(0) * T
    seg_end = seg_start + T
    Qh = Q + b * stride_qb + h * stride_qh
    Kh = K + b * stride_kb + h * stride_kh
    Vh = V + b * stride_vb + h * stride_vh
    DOh = DO + b * stride_dob + h * stride_doh
    DKh = DK + b * stride_gb + h * stride_gh
    DVh = DV + b * stride_gb + h * stride_gh
    lse_ptr = LSE + pid_bh.to(tl.int64) * N
    delta_ptr = DELTA + pid_bh.to(tl.int64) * N
    dq_ptr = DQACC + pid_bh.to(tl.int64) * N * HEAD_D

    full_keys = seg_start + (T // BLOCK_N) * BLOCK_N
    # The ragged rest, T mod BLOCK_N keys, in 16-key tiles (mma.sync: wgmma needs 64 rows), so at most
    # 15 keys are computed and dropped where one more BLOCK_N tile would compute up to BLOCK_N - 16.
    # They run before the full tiles (the first tile run starts the dQ sums): in this order ptxas
    # allocates 153 registers at D = 64, not 176 (3 blocks per SM, not 2), and stays spill-free.
    for kb in range(full_keys, seg_end, BLOCK_S):
        _window_key_tile(Qh, Kh, Vh, DOh, DKh, DVh, lse_ptr, delta_ptr, dq_ptr, stride_qn, stride_kn, stride_vn,
                         stride_don, stride_gn, kb, kb == full_keys, seg_start, seg_end, P, T, qk_scale, sm_scale,
                         HEAD_D, D0, D1, DC1, BLOCK_S, True, BLOCK_M, BLOCK_S)  # fmt: skip
        # dQ rows are read back in the next key tile (and below) by threads of other layouts.
        tl.debug_barrier()
    for kb in range(seg_start, full_keys, BLOCK_N):
        first = (kb == seg_start) & (full_keys == seg_end)
        _window_key_tile(Qh, Kh, Vh, DOh, DKh, DVh, lse_ptr, delta_ptr, dq_ptr, stride_qn, stride_kn, stride_vn,
                         stride_don, stride_gn, kb, first, seg_start, seg_end, P, T, qk_scale, sm_scale,
                         HEAD_D, D0, D1, DC1, BLOCK_N, False, BLOCK_M, BLOCK_S)  # fmt: skip
        tl.debug_barrier()

    # The window's dQ: add the prefix keys' share, scale, store.
    _window_dq_finish(Qh, Kh, Vh, DOh, DQ + b * stride_gb + h * stride_gh, lse_ptr, delta_ptr, dq_ptr,
                      stride_qn, stride_kn, stride_vn, stride_don, stride_gn, seg_start, seg_end, P,
                      qk_scale, sm_scale, HEAD_D, D0, D1, DC1, BLOCK_M, BLOCK_S)  # fmt: skip


@triton.jit
def _window_key_tile(
    Qh, Kh, Vh, DOh, DKh, DVh, lse_ptr, delta_ptr, dq_ptr, stride_qn, stride_kn, stride_vn, stride_don, stride_gn,
    kb, first, seg_start, seg_end, P, T, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    KEYS: tl.constexpr, MASK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """The per-window kernel's work on keys [kb, kb + KEYS) of its window: their dK, dV (stored) and
    their share of the window queries' dQ (into dq_ptr's fp32 rows; ``first``: the window's first key
    tile run, which starts the sums). MASK_KEYS: keys past the window are zero and get p = 0, so they add nothing."""
    keys = kb + tl.arange(0, KEYS)
    key_ok = keys < seg_end
    k0, k1, v0, v1 = _load_pair(Kh, Vh, keys, stride_kn, stride_vn, seg_end, HEAD_D, D0, DC1)
    if D1 > 0 and D1 != DC1:
        k1x = _load_rows(Kh, keys, stride_kn, seg_end, D0, D1, HEAD_D, True)
    else:
        k1x = k1
    dk0 = tl.zeros([KEYS, D0], dtype=tl.float32)
    dv0 = tl.zeros([KEYS, D0], dtype=tl.float32)
    dk1 = tl.zeros([KEYS, D1 if D1 > 0 else 16], dtype=tl.float32)
    dv1 = tl.zeros([KEYS, D1 if D1 > 0 else 16], dtype=tl.float32)
    dk0, dk1, dv0, dv1 = _dkdv_range(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                     lse_ptr, delta_ptr, 0, P, qk_scale, BLOCK_S, BLOCK_S,
                                     HEAD_D, D0, D1, DC1)  # fmt: skip
    # The window's queries, with dQ: full BLOCK_M blocks, then masked BLOCK_S steps.
    full = seg_start + (T // BLOCK_M) * BLOCK_M
    dk0, dk1, dv0, dv1 = _dkdv_queries(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                       lse_ptr, delta_ptr, seg_start, full, qk_scale, dq_ptr, first, k1x, key_ok,
                                       False, BLOCK_M, True, MASK_KEYS, HEAD_D, D0, D1, DC1)  # fmt: skip
    dk0, dk1, dv0, dv1 = _dkdv_queries(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Qh, DOh, stride_qn, stride_don,
                                       lse_ptr, delta_ptr, full, seg_end, qk_scale, dq_ptr, first, k1x, key_ok,
                                       True, BLOCK_S, True, MASK_KEYS, HEAD_D, D0, D1, DC1)  # fmt: skip
    _store_rows(DKh, keys, stride_gn, key_ok, dk0 * sm_scale, 0, D0, HEAD_D)
    _store_rows(DVh, keys, stride_gn, key_ok, dv0, 0, D0, HEAD_D)
    if D1 > 0:
        _store_rows(DKh, keys, stride_gn, key_ok, dk1 * sm_scale, D0, D1, HEAD_D)
        _store_rows(DVh, keys, stride_gn, key_ok, dv1, D0, D1, HEAD_D)


@triton.jit
def _window_dq_finish(
    Qh, Kh, Vh, DOh, DQh, lse_ptr, delta_ptr, dq_ptr, stride_qn, stride_kn, stride_vn, stride_don, stride_gn,
    seg_start, seg_end, P, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DC1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """dQ of a window's queries: the fp32 sums over its keys plus the prefix keys' share, scaled."""
    for qb in range(seg_start, seg_end, BLOCK_M):
        rows = qb + tl.arange(0, BLOCK_M)
        row_ok = rows < seg_end
        q0, q1, do0, do1 = _load_pair(Qh, DOh, rows, stride_qn, stride_don, seg_end, HEAD_D, D0, DC1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        dq0 = _load_rows(dq_ptr, rows, HEAD_D, seg_end, 0, D0, HEAD_D, True)
        if D1 > 0:
            dq1 = _load_rows(dq_ptr, rows, HEAD_D, seg_end, D0, D1, HEAD_D, True)
        else:
            dq1 = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        dq0, dq1 = _dq_range(dq0, dq1, q0, q1, do0, do1, lse, delta, Kh, Vh, stride_kn, stride_vn, 0, P,
                             qk_scale, BLOCK_S, BLOCK_S, HEAD_D, D0, D1, DC1)  # fmt: skip
        _store_rows(DQh, rows, stride_gn, row_ok, dq0 * sm_scale, 0, D0, HEAD_D)
        if D1 > 0:
            _store_rows(DQh, rows, stride_gn, row_ok, dq1 * sm_scale, D0, D1, HEAD_D)


# The static GPU audit compiles these kernels with every tile attention.py can launch:
# see AUDIT_CONFIGS in _attention_configs.
