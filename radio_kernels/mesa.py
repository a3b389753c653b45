"""MESA loss: shift-aligned MSE between layer-normalised student and EMA-student features.

Math (LN over C without affine parameters, biased variance, eps inside the sqrt)::

    LN(x)_c = (x_c - mean(x)) * r,   r = 1 / sqrt(var(x) + eps)
    loss    = shifted_mse(LN(student), LN(ema), shift) = sum_{Omega} ||d||^2 / N,
              d = LN(s_bij) - LN(e_b,i+dy,j+dx),  N = C * sum_b |Omega_b|
    dloss/ds_bij = (2 r / N) (d - mean_c(d) - LN(s_bij) * mean_c(d * LN(s_bij)))   on Omega

Gradient flows to ``student`` only, through its LayerNorm; cells off Omega get 0.

Kernel plan: one fused kernel, one program per BLOCK_R student cells, three sweeps over C in
BLOCK_C chunks per cell: (1) mean and variance of the student and EMA vectors (per-chunk
statistics merged with Chan's formula: no E[x^2] - E[x]^2 cancellation), (2) sum d^2 and the two
row means the LayerNorm backward needs, (3) the gradient. Sweeps 2 and 3 re-read the program's
rows, which were just loaded and sit in L1/L2: HBM traffic is one read of each input and one
gradient write. As in ``shifted_mse`` the gradient of the *sum* is stored and backward scales it
by ``grad_output / N``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._audit_registry import TRITON_DTYPE, AuditConfig, signature_of
from ._backend import device_guard, resolve_backend
from ._checks import check_feature_pair, check_same_device, check_shift
from .shifted_mse import (
    StoredGradientLoss,
    check_row_count,
    grad_dtype,
    load_chunk_f32,
    new_grad_buffer,
    overlap_cells,
    shifted_cells,
)

# Elements per program tile (BLOCK_R cells x BLOCK_C channels); chunks up to 2048 channels so
# that a realistic C (1280, 1536) is one chunk and the re-reads of sweeps 2-3 are from L1.
TILE = 2048
NUM_WARPS = 4


def block_sizes(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for C channels."""
    block_c = 16 if C <= 16 else 128 if C <= 128 else 512 if C <= 512 else 2048
    return TILE // block_c, block_c


@triton.jit
def _mesa_fwd_kernel(
    s_ptr, t_ptr, shift_ptr, grad_ptr, partial_ptr,
    n_rows, Hs, Ws, Ht, Wt, C, eps,
    s_sb, s_sh, s_sw, s_sc,
    t_sb, t_sh, t_sw, t_sc,
    shift_sb, shift_sk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Writes partial_ptr[p] = sum over the program's cells in Omega of ||d||^2 and the gradient
    of that sum with respect to the student (contiguous (n_rows, C), 0 off Omega)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    s_off, t_off, valid, in_range = shifted_cells(
        rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw
    )
    s_off = s_off[:, None]
    t_off = t_off[:, None]
    # Cells off Omega contribute nothing and get a zero gradient: load neither vector there.
    valid2 = valid[:, None]

    # Sweep 1: per-row mean and sum of squared deviations, merging chunk statistics (Chan et al.).
    mean_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    mean_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = (cols < C)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        s = load_chunk_f32(s_ptr, s_off, cols64, s_sc, valid2 & c_ok)
        t = load_chunk_f32(t_ptr, t_off, cols64, t_sc, valid2 & c_ok)
        n_a = c0 * 1.0  # channels merged so far (as float)
        n_b = tl.minimum(C - c0, BLOCK_C) * 1.0  # channels in this chunk
        frac = n_b / (n_a + n_b)
        chunk_mean_s = tl.sum(s, axis=1) / n_b
        chunk_mean_t = tl.sum(t, axis=1) / n_b
        dev_s = tl.where(c_ok, s - chunk_mean_s[:, None], 0.0)
        dev_t = tl.where(c_ok, t - chunk_mean_t[:, None], 0.0)
        delta_s = chunk_mean_s - mean_s
        delta_t = chunk_mean_t - mean_t
        mean_s += delta_s * frac
        mean_t += delta_t * frac
        m2_s += tl.sum(dev_s * dev_s, axis=1) + delta_s * delta_s * n_a * frac
        m2_t += tl.sum(dev_t * dev_t, axis=1) + delta_t * delta_t * n_a * frac
    rstd_s = (1.0 / tl.sqrt(m2_s / C + eps))[:, None]
    rstd_t = (1.0 / tl.sqrt(m2_t / C + eps))[:, None]
    mean_s = mean_s[:, None]
    mean_t = mean_t[:, None]

    # Sweep 2: d = LN(s) - LN(t); sum d^2 (the loss), mean d and mean d * LN(s) (LN backward).
    sum_dd = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_d = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_ds = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = (cols < C)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        s = load_chunk_f32(s_ptr, s_off, cols64, s_sc, valid2 & c_ok)
        t = load_chunk_f32(t_ptr, t_off, cols64, t_sc, valid2 & c_ok)
        s_hat = (s - mean_s) * rstd_s
        d = tl.where(valid2 & c_ok, s_hat - (t - mean_t) * rstd_t, 0.0)
        sum_dd += tl.sum(d * d, axis=1)
        sum_d += tl.sum(d, axis=1)
        sum_ds += tl.sum(d * s_hat, axis=1)
    mean_d = (sum_d / C)[:, None]
    mean_ds = (sum_ds / C)[:, None]

    # Sweep 3: gradient of sum d^2 through the student's LayerNorm.
    g_off = rows.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = (cols < C)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        s = load_chunk_f32(s_ptr, s_off, cols64, s_sc, valid2 & c_ok)
        t = load_chunk_f32(t_ptr, t_off, cols64, t_sc, valid2 & c_ok)
        s_hat = (s - mean_s) * rstd_s
        d = s_hat - (t - mean_t) * rstd_t
        grad = tl.where(valid2 & c_ok, 2.0 * rstd_s * (d - mean_d - s_hat * mean_ds), 0.0)
        tl.store(grad_ptr + g_off + cols64, grad.to(grad_ptr.dtype.element_ty), mask=in_range[:, None] & c_ok)
    tl.store(partial_ptr + pid, tl.sum(sum_dd, axis=0))


def mesa_forward(
    student: torch.Tensor, ema: torch.Tensor, shift: torch.Tensor, eps: float, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: (sum over Omega of ||LN(s) - LN(e)||^2 as 0-dim fp32, its gradient).

    Grid: one program per BLOCK_R consecutive student cells in (b, i, j) raster order. Inputs
    are read through their strides; the gradient is a contiguous tensor of the student's dtype and
    shape (``grad`` if given).
    """
    B, Hs, Ws, C = student.shape
    n_rows = B * Hs * Ws
    check_row_count(n_rows, C)
    grad = new_grad_buffer((B, Hs, Ws, C), student, grad)
    if n_rows == 0 or C == 0:
        return torch.zeros((), dtype=torch.float32, device=student.device), grad.zero_()
    block_r, block_c = block_sizes(C)
    grid = (triton.cdiv(n_rows, block_r),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=student.device)
    _mesa_fwd_kernel[grid](
        student, ema, shift, grad, partial,
        n_rows, Hs, Ws, ema.shape[1], ema.shape[2], C, float(eps),
        *student.stride(), *ema.stride(), *shift.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    return partial.sum(), grad


class MesaLossFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, student, ema, shift, eps):
        sq_sum, grad_sum = mesa_forward(student, ema, shift, eps)
        inv_n = 1.0 / (overlap_cells(student.shape, ema.shape, shift) * student.shape[-1]).clamp(min=1)
        return StoredGradientLoss.finish(ctx, sq_sum, grad_sum, inv_n, student)


def mesa_loss(
    student: torch.Tensor,
    ema: torch.Tensor,
    shift: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm-then-shifted-MSE of ``student`` against the EMA student's ``ema`` features.

    ``shift=None`` means zero shift (and requires equal shapes). Returns a 0-dim float32 tensor.
    """
    check_feature_pair(student, ema, "student", "ema", same_shape=shift is None)
    device = check_same_device(student=student, ema=ema)
    if shift is not None:
        shift = check_shift(shift, student.shape[0], device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if resolve_backend(backend, device) == "torch":
        return reference.mesa_loss(student, ema.detach(), shift, eps=eps).float()
    if shift is None:
        shift = torch.zeros(student.shape[0], 2, dtype=torch.int64, device=device)
    with device_guard(student.device):
        return MesaLossFunction.apply(student, ema.detach(), shift, float(eps))


# ----------------------------------------------------------------------------------------
# static GPU audit: every (dtype, block size) the wrapper can launch
# ----------------------------------------------------------------------------------------
AUDIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUDIT_CHANNELS = (16, 128, 512, 4096)  # one C per block_sizes() branch


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw")


def AUDIT_CONFIGS() -> list[AuditConfig]:
    ints = ("n_rows", "Hs", "Ws", "Ht", "Wt", "C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw", "shift_sb")
    configs = []
    for dtype in AUDIT_DTYPES:
        for C in AUDIT_CHANNELS:
            block_r, block_c = block_sizes(C)
            name = TRITON_DTYPE[dtype]
            ptrs = {"s_ptr": name, "t_ptr": name, "shift_ptr": "i64", "grad_ptr": TRITON_DTYPE[grad_dtype(dtype)]}
            ptrs["partial_ptr"] = "fp32"
            configs.append(
                AuditConfig(
                    kernel=_mesa_fwd_kernel,
                    label=f"{name} R{block_r} C{block_c}",
                    signature=signature_of(
                        _mesa_fwd_kernel, ptrs, ints, floats=("eps",), constexpr=("s_sc", "t_sc", "shift_sk")
                    ),
                    constexprs={"s_sc": 1, "t_sc": 1, "shift_sk": 1, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    num_warps=NUM_WARPS,
                    aligned=ALIGNED_ARGS,
                )
            )
    return configs
