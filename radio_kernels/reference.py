"""Plain-PyTorch references of every public op.

These are the definitions the Triton kernels are tested against (and the ``backend="torch"``
implementation). They are differentiable through ordinary autograd and checked by
``torch.autograd.gradcheck`` in float64. Inputs are assumed validated by the public wrappers;
math happens in float32 (or float64 when the inputs are float64).

Conventions
-----------
shifted_mse
    student (B, Hs, Ws, C), target (B, Ht, Wt, C), shift (B, 2) integer (dy, dx).
    Student cell (i, j) is compared with target cell (i + dy, j + dx); Omega_b is the set of
    cells valid in both grids::

        loss = sum_b sum_{(i,j) in Omega_b} ||s_bij - t_b,i+dy,j+dx||^2 / (C * sum_b |Omega_b|)

    and exactly 0 (zero gradient) when every Omega_b is empty.
mesa_loss
    shifted_mse of LN(student) against LN(ema), LN without affine parameters over C.
angular_loss
    mean_b Theta(x_b, y_b)^2 / dispersion, Theta in [0, pi] the angle between the vectors,
    computed as 2 * atan2(||x^ - y^||, ||x^ + y^||) on unit vectors (stable at 0 and pi).
    Rows holding Inf or NaN (in x or y) give Theta = NaN and NaN gradient rows, on both backends.
attention
    softmax(q k^T * scale) v with the window / prefix visibility of ``attention_mask``.
varlen_attention
    the same, block-diagonal over the packed segments of ``cu_seqlens`` (``varlen_attention_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Squared chords ||x^ -+ y^||^2 below this are clamped before the sqrt, so their gradient is 0,
# not inf, at 0 (parallel / antiparallel rows). 2**-40: chords below 2**-20 ~ 1e-6 are at the
# float32 rounding level of unit vectors, where their direction (hence the gradient of Theta^2
# near pi) is noise; Theta then bottoms out at ~1e-6 rad instead of 0.
_TINY = 2.0**-40
# Rows whose largest |entry| is below the smallest normal float32 count as zero vectors.
_FLT_MIN = 2.0**-126


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------
# shift-aligned masked MSE
# ----------------------------------------------------------------------------------------
def overlap_bounds(size_s: int, size_t: int, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [lo, hi) range of student indices i with 0 <= i + shift < size_t."""
    lo = (-shift).clamp(min=0, max=size_s)
    hi = (size_t - shift).clamp(min=0, max=size_s)
    return lo, torch.maximum(hi, lo)


def shifted_mse(student: torch.Tensor, target: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    dtype = _math_dtype(student, target)
    B, Hs, Ws, C = student.shape
    _, Ht, Wt, _ = target.shape
    if Ht == 0 or Wt == 0:  # no target cell: nothing overlaps (0 with a zero gradient, like the kernel)
        return student.to(dtype).flatten()[:0].sum()
    shift = shift.to(device=student.device, dtype=torch.long)
    dy, dx = shift[:, 0], shift[:, 1]
    rows = torch.arange(Hs, device=student.device)[None, :] + dy[:, None]  # (B, Hs) target row
    cols = torch.arange(Ws, device=student.device)[None, :] + dx[:, None]  # (B, Ws) target col
    row_ok = (rows >= 0) & (rows < Ht)
    col_ok = (cols >= 0) & (cols < Wt)
    mask = row_ok[:, :, None] & col_ok[:, None, :]  # (B, Hs, Ws)
    b = torch.arange(B, device=student.device)[:, None, None]
    aligned = target[b, rows.clamp(0, Ht - 1)[:, :, None], cols.clamp(0, Wt - 1)[:, None, :]]
    sq = (student.to(dtype) - aligned.to(dtype)).square().sum(-1)
    sq = torch.where(mask, sq, torch.zeros((), dtype=dtype, device=sq.device))
    count = mask.sum().to(dtype) * C
    return sq.sum() / count.clamp(min=1)


# ----------------------------------------------------------------------------------------
# LayerNorm + shifted MSE (MESA)
# ----------------------------------------------------------------------------------------
def mesa_loss(student: torch.Tensor, ema: torch.Tensor, shift: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    dtype = _math_dtype(student, ema)
    C = student.shape[-1]
    s = F.layer_norm(student.to(dtype), (C,), eps=eps)
    t = F.layer_norm(ema.detach().to(dtype), (C,), eps=eps)
    if shift is None:
        shift = torch.zeros(student.shape[0], 2, dtype=torch.long, device=student.device)
    return shifted_mse(s, t, shift)


# ----------------------------------------------------------------------------------------
# Angular (balanced) summary loss
# ----------------------------------------------------------------------------------------
def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dim, finite for any norm; zero rows map to 0 with zero gradient.

    Each row is first divided by its (detached) largest |entry|, which leaves x / ||x|| and its
    gradient unchanged but keeps the sum of squares in [1, C]: no overflow for huge rows, no
    underflow for tiny ones. Rows with max |x| < 2**-126 are treated as the zero vector; a row
    holding a NaN or an Inf gives a NaN row (and NaN gradient), never a zero one.
    """
    a = x.detach().abs().amax(-1, keepdim=True)
    nonzero = ~(a < _FLT_MIN)  # NaN / Inf rows are not zero rows: they give NaN, value and gradient
    u = x / torch.where(nonzero, a, torch.ones_like(a))
    n2 = u.square().sum(-1, keepdim=True)
    return torch.where(nonzero, u * torch.rsqrt(torch.where(nonzero, n2, torch.ones_like(n2))), 0.0)


def angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise angle in [0, pi] between x and y (..., C), finite with finite gradients.

    Theta = 2 atan2(||x^ - y^||, ||x^ + y^||) on unit rows (see ``unit_rows``). Both squared
    chords are clamped at 2**-40 before the square root, and where either is clamped (parallel:
    Theta ~ 1e-6, antiparallel: Theta ~ pi) the gradient is 0 instead of 0 * inf or a direction
    made of rounding noise. A zero row is the zero vector (x^ = 0, zero gradient): Theta = pi / 2.
    A row of x or y holding a NaN or an Inf gives Theta = NaN (and a NaN gradient row), as the
    Triton kernel does.
    """
    x_hat, y_hat = unit_rows(x), unit_rows(y)
    minus2 = (x_hat - y_hat).square().sum(-1)
    plus2 = (x_hat + y_hat).square().sum(-1)
    theta = 2 * torch.atan2(minus2.clamp(min=_TINY).sqrt(), plus2.clamp(min=_TINY).sqrt())
    # Within ~1e-6 rad of parallel or antiparallel the direction of the small chord is rounding
    # noise: treat Theta as locally constant there (zero gradient through both chords).
    return torch.where((minus2 <= _TINY) | (plus2 <= _TINY), theta.detach(), theta)


def angular_loss(x: torch.Tensor, y: torch.Tensor, dispersion: torch.Tensor | float) -> torch.Tensor:
    """A row of x or y holding Inf or NaN has Theta = NaN (so the loss is NaN: a diverged input is
    never hidden) and a NaN gradient row; the other rows' gradients are unaffected."""
    dtype = _math_dtype(x, y)
    theta = angle(x.to(dtype), y.detach().to(dtype))  # NaN rows stay NaN: see unit_rows
    return theta.square().mean() / torch.as_tensor(dispersion, dtype=dtype, device=x.device)


def mean_direction(y: torch.Tensor) -> torch.Tensor:
    """mu = E[y] / ||E[y]|| over the rows of y (B, C)."""
    return unit_rows(y.mean(0))


def angular_dispersion(y: torch.Tensor) -> torch.Tensor:
    """E_b[Theta(y_b, mu)^2] with mu the mean direction of the rows of y (B, C)."""
    dtype = _math_dtype(y)
    y = y.to(dtype)
    mu = mean_direction(y)
    return angle(y, mu.expand_as(y)).square().mean()


# ----------------------------------------------------------------------------------------
# Attention: global, windowed, windowed with global prefix tokens
# ----------------------------------------------------------------------------------------
def attention_mask(n: int, num_prefix: int, window_tokens: int, device=None) -> torch.Tensor:
    """Boolean (N, N) visibility: mask[i, j] is True when query i may attend to key j.

    A dense definition for tests; the fast paths below never build it.
    """
    if window_tokens == 0:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    window = torch.where(idx < num_prefix, -1, (idx - num_prefix) // window_tokens)
    is_prefix = window < 0
    same = window[:, None] == window[None, :]
    return same | is_prefix[:, None] | is_prefix[None, :]


def attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int, window_tokens: int, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with an explicit N x N score matrix (test oracle)."""
    dtype = _math_dtype(q, k, v)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k.to(dtype)) * scale
    mask = attention_mask(q.shape[2], num_prefix, window_tokens, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v.to(dtype)).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int, window_tokens: int, scale=None):
    """The attention rule on ``F.scaled_dot_product_attention`` alone (4-D calls, no N x N mask).

    Global: one SDPA call. Windowed: the patch tokens are viewed as (B, H*nw, T, D) windows (folded
    into the head axis: SDPA's fused backends take 4-D inputs only); each window's queries see the
    prefix keys (copied into every window) plus its own T keys; prefix queries see every key.
    Returns SDPA's (B, H, N, D) layout (the SDPA baseline of bench/attention.py).
    """
    if window_tokens == 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, N, D = q.shape
    P, T = num_prefix, window_tokens
    nw = (N - P) // T

    def windows(t: torch.Tensor, with_prefix: bool) -> torch.Tensor:
        w = t[:, :, P:].reshape(B, H, nw, T, D)
        if with_prefix and P:
            w = torch.cat([t[:, :, None, :P].expand(B, H, nw, P, D), w], dim=3)
        return w.reshape(B, H * nw, w.shape[3], D)

    out = F.scaled_dot_product_attention(windows(q, False), windows(k, True), windows(v, True), scale=scale)
    out = out.reshape(B, H, N - P, D)
    if P:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, :P], k, v, scale=scale), out], dim=2)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_prefix: int = 0,
    window_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Memory-efficient reference (``sdpa_attention``), returned as (B, H, N, D) stored as (B, N, H, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = sdpa_attention(q, k, v, num_prefix, window_tokens, scale)
    # Store as (B, N, H, D) so that out.transpose(1, 2).reshape(B, N, H * D) is free.
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def attention_flops(n: int, num_prefix: int, window_tokens: int, d: int, batch_heads: int) -> float:
    """Forward FLOPs on visible (query, key) pairs: 4 * B*H * pairs * D."""
    if window_tokens == 0:
        pairs = n * n
    else:
        P, T = num_prefix, window_tokens
        pairs = P * n + (n - P) * (P + T)
    return 4.0 * batch_heads * pairs * d


# ----------------------------------------------------------------------------------------
# Variable-length (packed) attention: block-diagonal over cu_seqlens
# ----------------------------------------------------------------------------------------
def varlen_attention_mask(cu_seqlens: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """Boolean (N, N) visibility of packed sequences: token i sees token j iff both lie in one
    segment [cu[s], cu[s+1]). A dense definition for tests."""
    idx = torch.arange(n, device=device)
    segment = torch.bucketize(idx, cu_seqlens.to(device=device, dtype=torch.long)[1:], right=True)
    return segment[:, None] == segment[None, :]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Block-diagonal attention of packed sequences: one SDPA call per segment of ``cu_seqlens``.

    q, k, v (B, H, N, D), cu_seqlens (S + 1,) with cu[0] = 0, cu[S] = N; returns (B, H, N, D) stored
    as (B, N, H, D), like ``attention``. Each segment is exactly what SDPA gives that sequence alone.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = [int(x) for x in cu_seqlens.tolist()]
    parts = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    out = torch.cat(parts, dim=2) if parts else torch.empty_like(q)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def varlen_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + block-diagonal mask) v with an explicit N x N score matrix (test oracle)."""
    dtype = _math_dtype(q, k, v)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k.to(dtype)) * scale
    scores = scores.masked_fill(~varlen_attention_mask(cu_seqlens, q.shape[2], q.device), float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v.to(dtype)).to(q.dtype)


def varlen_attention_flops(cu_seqlens: torch.Tensor, d: int, batch_heads: int) -> float:
    """Forward FLOPs on visible pairs of packed sequences: 4 * B*H * sum_s n_s^2 * D."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return 4.0 * batch_heads * float((lengths * lengths).sum()) * d


__all__ = [
    "angle",
    "angular_dispersion",
    "angular_loss",
    "attention",
    "attention_dense",
    "attention_flops",
    "attention_mask",
    "mean_direction",
    "mesa_loss",
    "overlap_bounds",
    "sdpa_attention",
    "shifted_mse",
    "unit_rows",
    "varlen_attention",
    "varlen_attention_dense",
    "varlen_attention_flops",
    "varlen_attention_mask",
]
