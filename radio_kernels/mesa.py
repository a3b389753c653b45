"""MESA loss: shift-aligned MSE between layer-normalised student and EMA-student features.

Math (LN over C without affine parameters, biased variance, eps inside the sqrt)::

    LN(x)_c = (x_c - mean(x)) * r,   r = 1 / sqrt(var(x) + eps)
    loss    = shifted_mse(LN(student), LN(ema), shift) = sum_{Omega} ||d||^2 / N,
              d = LN(s_bij) - LN(e_b,i+dy,j+dx),  N = C * sum_b |Omega_b|
    dloss/ds_bij = (2 r / N) (d - mean_c(d) - LN(s_bij) * mean_c(d * LN(s_bij)))   on Omega

Gradient flows to ``student`` only, through its LayerNorm; cells off Omega get 0.

Kernel plan (``loss_plan.mesa_plan``), one fused kernel in two layouts:

* register-resident (C <= 4096): each program holds its rows of s and t whole in registers
  (BLOCK_C >= C) and reads each input element once: mean, variance (two-pass on the registers:
  deviations from the exact mean, no E[x^2] - E[x]^2 cancellation), d, the three row sums and the
  gradient all come from registers, then one gradient write. For C <= 2048 a program is one warp
  owning whole rows, so every row reduction is warp shuffles (no shared memory, no barrier); for
  C in (2048, 4096] four warps own one row (a single warp would need 256 fp32 registers per lane).
* chunked fallback (C > 4096): one row per 4-warp program, three sweeps over C in BLOCK_C chunks:
  (1) mean and variance (per-chunk statistics merged with Chan's formula), (2) sum d^2 and the two
  row means the LayerNorm backward needs, (3) the gradient. Sweeps 2 and 3 re-read the row, which
  was just loaded and sits in L1/L2.

Each program writes its partial sum and its count of cells in Omega; the shared finish kernel of
``shifted_mse`` turns them into loss and 1 / N on the device. As in ``shifted_mse`` the gradient of
the *sum* is stored (only when autograd needs it: ``STORE_GRAD``) and backward scales it in place by
``grad_output / N``. ``shift=None`` runs the ``HAS_SHIFT=False`` variant (no shift tensor at all).
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
from .loss_plan import mesa_plan
from .shifted_mse import (
    StoredGradientLoss,
    check_row_count,
    finish_loss,
    grad_ptr_type,
    load_chunk_f32,
    needs_grad,
    new_grad_buffer,
    shifted_cells,
    store_partials,
    variant_label,
    work_buffer,
)


@triton.jit
def _mesa_fwd_kernel(
    s_ptr, t_ptr, shift_ptr, grad_ptr, work_ptr,
    n_rows, Hs, Ws, Ht, Wt, C, eps,
    s_sb, s_sh, s_sw, s_sc,
    t_sb, t_sh, t_sw, t_sc,
    shift_sb, shift_sk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_GRAD: tl.constexpr,
):  # fmt: skip
    """Program p owns student cells [p * BLOCK_R, (p + 1) * BLOCK_R). Writes the partials
    (``store_partials``: sum over its cells in Omega of ||d||^2, their count) and, if ``STORE_GRAD``,
    the gradient of that sum with respect to the student (contiguous (n_rows, C), 0 off Omega).
    ``RESIDENT``: BLOCK_C >= C, the rows are loaded once and kept in registers."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    s_off, t_off, valid, in_range = shifted_cells(
        rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw, HAS_SHIFT
    )
    s_off = s_off[:, None]
    t_off = t_off[:, None]
    # Cells off Omega contribute nothing and get a zero gradient: load neither vector there.
    valid2 = valid[:, None]
    g_off = rows.to(tl.int64)[:, None] * C

    if RESIDENT:
        cols = tl.arange(0, BLOCK_C)
        c_ok = (cols < C)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        mask = valid2 & c_ok
        s = load_chunk_f32(s_ptr, s_off, cols64, s_sc, mask)
        t = load_chunk_f32(t_ptr, t_off, cols64, t_sc, mask)
        # Two-pass statistics on the registers: deviations from the exact row mean (0 on masked lanes).
        dev_s = tl.where(mask, s - (tl.sum(s, axis=1) / C)[:, None], 0.0)
        dev_t = tl.where(mask, t - (tl.sum(t, axis=1) / C)[:, None], 0.0)
        rstd_s = (1.0 / tl.sqrt(tl.sum(dev_s * dev_s, axis=1) / C + eps))[:, None]
        rstd_t = (1.0 / tl.sqrt(tl.sum(dev_t * dev_t, axis=1) / C + eps))[:, None]
        s_hat = dev_s * rstd_s
        d = s_hat - dev_t * rstd_t  # 0 on masked lanes and off Omega
        sum_dd = tl.sum(d * d, axis=1)
        if STORE_GRAD:
            mean_d = (tl.sum(d, axis=1) / C)[:, None]
            mean_ds = (tl.sum(d * s_hat, axis=1) / C)[:, None]
            grad = tl.where(mask, 2.0 * rstd_s * (d - mean_d - s_hat * mean_ds), 0.0)
            tl.store(grad_ptr + g_off + cols64, grad.to(grad_ptr.dtype.element_ty), mask=in_range[:, None] & c_ok)
    else:
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

        if STORE_GRAD:
            # Sweep 3: gradient of sum d^2 through the student's LayerNorm.
            mean_d = (sum_d / C)[:, None]
            mean_ds = (sum_ds / C)[:, None]
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                c_ok = (cols < C)[None, :]
                cols64 = cols.to(tl.int64)[None, :]
                s = load_chunk_f32(s_ptr, s_off, cols64, s_sc, valid2 & c_ok)
                t = load_chunk_f32(t_ptr, t_off, cols64, t_sc, valid2 & c_ok)
                s_hat = (s - mean_s) * rstd_s
                d = s_hat - (t - mean_t) * rstd_t
                grad = tl.where(valid2 & c_ok, 2.0 * rstd_s * (d - mean_d - s_hat * mean_ds), 0.0)
                g_mask = in_range[:, None] & c_ok
                tl.store(grad_ptr + g_off + cols64, grad.to(grad_ptr.dtype.element_ty), mask=g_mask)
    store_partials(work_ptr, tl.sum(sum_dd, axis=0), valid)


def mesa_forward(
    student: torch.Tensor,
    ema: torch.Tensor,
    shift: torch.Tensor | None,
    eps: float,
    *,
    store_grad: bool = True,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernels: (loss, 1 / N, gradient of the summed loss or None without ``store_grad``).

    Grid: one program per BLOCK_R consecutive student cells in (b, i, j) raster order
    (``loss_plan.mesa_plan``), then one finish program. Inputs are read through their strides;
    the gradient is a contiguous tensor of the student's shape and ``grad_dtype`` (``grad`` if given).
    ``shift=None``: zero shift on equal grids.
    """
    B, Hs, Ws, C = student.shape
    n_rows = B * Hs * Ws
    check_row_count(n_rows, C)
    grad = new_grad_buffer((B, Hs, Ws, C), student, grad) if store_grad else None
    plan = mesa_plan(C)
    work, grid = work_buffer(plan, n_rows, student.device)
    if grid:
        has_shift = shift is not None
        # No shift tensor: the work buffer stands in (never read), with the strides of a contiguous (B, 2) shift.
        shift_arg, shift_strides = (shift, shift.stride()) if has_shift else (work, (2, 1))
        _mesa_fwd_kernel[(grid,)](
            student, ema, shift_arg, grad if store_grad else work, work,
            n_rows, Hs, Ws, ema.shape[1], ema.shape[2], C, float(eps),
            *student.stride(), *ema.stride(), *shift_strides,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            RESIDENT=plan.resident, HAS_SHIFT=has_shift, STORE_GRAD=store_grad, num_warps=plan.num_warps,
        )  # fmt: skip
    loss, inv_n = finish_loss(work, grid, C)
    return loss, inv_n, grad


class MesaLossFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, student, ema, shift, eps):
        loss, inv_n, grad_sum = mesa_forward(student, ema, shift, eps)
        return StoredGradientLoss.finish(ctx, loss, inv_n, grad_sum, student)


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
    with device_guard(student.device):
        if not needs_grad(student):
            return mesa_forward(student, ema.detach(), shift, float(eps), store_grad=False)[0]
        return MesaLossFunction.apply(student, ema.detach(), shift, float(eps))


# ----------------------------------------------------------------------------------------
# static GPU audit: every (dtype, plan, variant) the wrapper can launch
# ----------------------------------------------------------------------------------------
AUDIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One C per mesa_plan() branch: each register-resident row width (1280 for the paper's 2048 one) and the fallback.
AUDIT_CHANNELS = (64, 256, 1024, 1280, 4096, 8192)


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw")


def AUDIT_CONFIGS() -> list[AuditConfig]:
    ints = ("n_rows", "Hs", "Ws", "Ht", "Wt", "C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw", "shift_sb")
    configs = []
    for dtype in AUDIT_DTYPES:
        name = TRITON_DTYPE[dtype]
        for C in AUDIT_CHANNELS:
            plan = mesa_plan(C)
            for has_shift in (True, False):
                for store_grad in (True, False):
                    ptrs = {
                        "s_ptr": name,
                        "t_ptr": name,
                        "shift_ptr": "i64" if has_shift else "fp32",  # shift=None passes the work buffer
                        "grad_ptr": grad_ptr_type(dtype, store_grad),
                        "work_ptr": "fp32",
                    }
                    layout = "resident" if plan.resident else "chunked"
                    label = f"{name} R{plan.block_r} C{plan.block_c} w{plan.num_warps} {layout}"
                    label += f" {variant_label(store_grad)}" + ("" if has_shift else " no-shift")
                    constexprs = {"s_sc": 1, "t_sc": 1, "shift_sk": 1}
                    constexprs.update(BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, RESIDENT=plan.resident)
                    constexprs.update(HAS_SHIFT=has_shift, STORE_GRAD=store_grad)
                    configs.append(
                        AuditConfig(
                            kernel=_mesa_fwd_kernel,
                            label=label,
                            signature=signature_of(
                                _mesa_fwd_kernel, ptrs, ints, floats=("eps",), constexpr=("s_sc", "t_sc", "shift_sk")
                            ),
                            constexprs=constexprs,
                            num_warps=plan.num_warps,
                            aligned=ALIGNED_ARGS,
                            # the paper's C = 1280 bf16 launch and the fallback in --sample
                            sample=dtype == torch.bfloat16 and C in (1280, 8192) and has_shift and store_grad,
                        )
                    )
    return configs
