"""Shift-aligned masked MSE between a student feature map and a teacher feature map.

Math (student s (B, Hs, Ws, C), target t (B, Ht, Wt, C), shift (B, 2) = (dy, dx))::

    Omega_b = {(i, j) : 0 <= i < Hs, 0 <= j < Ws, 0 <= i + dy < Ht, 0 <= j + dx < Wt}
    N       = C * sum_b |Omega_b|
    loss    = sum_b sum_{(i,j) in Omega_b} ||s_bij - t_b,i+dy,j+dx||^2 / N
    dloss/ds_bij = 2 (s_bij - t_b,i+dy,j+dx) / N on Omega_b, 0 elsewhere

The loss is exactly 0 with a zero gradient when every Omega_b is empty.

Kernel plan (Liger cross-entropy pattern): one pass over the student cells reads each overlapping
student and target vector once, writes the per-program partial sum of squares and the gradient
of the *sum*, ``2 (s - t)`` (0 off the overlap), in the student's dtype. N is computed on the
device from ``shift`` (no host sync). Backward is a single elementwise scale of the stored
gradient by ``grad_output / N``: folding 1/N into backward rather than the kernel keeps fp16
gradients of a mean over ~10^8 elements from underflowing before a loss scaler can lift them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import reference
from ._audit_registry import TRITON_DTYPE, AuditConfig, signature_of
from ._backend import device_guard, resolve_backend
from ._checks import check_feature_pair, check_same_device, check_shift

# Elements per program tile (BLOCK_R rows x BLOCK_C channels) and warps per program.
TILE = 2048
NUM_WARPS = 4


def block_sizes(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for C channels: C is looped over in BLOCK_C chunks inside the kernel."""
    block_c = 16 if C <= 16 else 64 if C <= 64 else 256
    return TILE // block_c, block_c


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def load_chunk_f32(ptr, row_off, cols64, col_stride, mask):
    """A (rows, channels) chunk of a strided feature map as float32 (masked lanes read 0): loads are
    cast before any arithmetic (also what lets the interpreter handle bf16)."""
    return tl.load(ptr + row_off + cols64 * col_stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def shifted_cells(rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw):
    """For flat student cells ``rows`` (b * Hs * Ws + i * Ws + j): int64 row offsets into the
    student and target maps and whether the cell lies in Omega_b (shifted cell inside target)."""
    in_range = rows < n_rows
    j = rows % Ws
    i = (rows // Ws) % Hs
    b = tl.where(in_range, rows // (Ws * Hs), 0)  # keeps the shift gather in bounds
    dy = tl.load(shift_ptr + b * shift_sb, mask=in_range, other=0).to(tl.int64)
    dx = tl.load(shift_ptr + b * shift_sb + shift_sk, mask=in_range, other=0).to(tl.int64)
    ti = i.to(tl.int64) + dy
    tj = j.to(tl.int64) + dx
    valid = in_range & (ti >= 0) & (ti < Ht) & (tj >= 0) & (tj < Wt)
    b64 = b.to(tl.int64)
    s_off = b64 * s_sb + i.to(tl.int64) * s_sh + j.to(tl.int64) * s_sw
    # Off Omega the target offset is garbage; every load through it is masked by `valid`.
    t_off = b64 * t_sb + ti * t_sh + tj * t_sw
    return s_off, t_off, valid, in_range


@triton.jit
def _shifted_mse_fwd_kernel(
    s_ptr, t_ptr, shift_ptr, grad_ptr, partial_ptr,
    n_rows, Hs, Ws, Ht, Wt, C,
    s_sb, s_sh, s_sw, s_sc,
    t_sb, t_sh, t_sw, t_sc,
    shift_sb, shift_sk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program p owns student cells [p * BLOCK_R, (p + 1) * BLOCK_R) and loops over C.

    Writes partial_ptr[p] = sum of squared differences over its cells in Omega and
    grad[cell, c] = 2 (s - t) (0 off Omega); grad is contiguous (n_rows, C).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    s_off, t_off, valid, in_range = shifted_cells(
        rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw
    )
    g_off = rows.to(tl.int64) * C
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        cols64 = cols.to(tl.int64)
        load_mask = valid[:, None] & c_ok[None, :]
        # Cast before arithmetic: low-precision loads are only storage formats here.
        s = load_chunk_f32(s_ptr, s_off[:, None], cols64[None, :], s_sc, load_mask)
        t = load_chunk_f32(t_ptr, t_off[:, None], cols64[None, :], t_sc, load_mask)
        d = s - t  # 0 off Omega (both loads masked)
        acc += tl.sum(d * d, axis=1)
        grad = (2.0 * d).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + g_off[:, None] + cols64[None, :], grad, mask=in_range[:, None] & c_ok[None, :])
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
def overlap_cells(student_shape, target_shape, shift: torch.Tensor) -> torch.Tensor:
    """sum_b |Omega_b| as a 0-dim float32 tensor on shift's device (no host sync)."""
    Hs, Ws = student_shape[1], student_shape[2]
    Ht, Wt = target_shape[1], target_shape[2]
    shift = shift.to(torch.int64)
    lo_y, hi_y = reference.overlap_bounds(Hs, Ht, shift[:, 0])
    lo_x, hi_x = reference.overlap_bounds(Ws, Wt, shift[:, 1])
    return ((hi_y - lo_y) * (hi_x - lo_x)).sum().to(torch.float32)


def check_row_count(n_rows: int, C: int) -> None:
    # Cell indices are int32 inside the kernels; element offsets are int64.
    if n_rows >= 2**31 or C >= 2**31:
        raise ValueError(f"at most 2**31 - 1 cells and channels are supported, got {n_rows} cells of C={C}")


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the stored summed gradient: the input's, except float32 for float16 inputs.

    The kernels store the gradient of the *sum* (N times the gradient of the mean, scaled by 1/N
    in backward so that tiny gradients do not underflow); for float16 that sum can pass 65504
    (e.g. a LayerNorm of a near-constant token), while bfloat16 and float32 have the range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def new_grad_buffer(shape, like: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``grad`` if given (tests pass a NaN-poisoned buffer to catch unwritten elements), else a
    fresh contiguous tensor of ``grad_dtype(like.dtype)`` on ``like``'s device."""
    dtype = grad_dtype(like.dtype)
    if grad is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(grad.shape) != tuple(shape) or grad.dtype != dtype or not grad.is_contiguous():
        raise ValueError(f"grad must be a contiguous {dtype} tensor of shape {tuple(shape)}")
    return grad


class StoredGradientLoss(torch.autograd.Function):
    """Base of the loss Functions: forward runs a kernel that returns the summed loss and the gradient
    of that sum (one read of each input); ``finish`` stores it, and backward only scales it by
    grad_output / N (Liger's pattern). Only the first input gets a gradient.
    """

    @staticmethod
    def finish(ctx, loss_sum: torch.Tensor, grad_sum: torch.Tensor, inv_n: torch.Tensor, like: torch.Tensor):
        ctx.save_for_backward(grad_sum, inv_n)
        ctx.input_dtype = like.dtype
        return loss_sum * inv_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *_):
        grad_sum, inv_n = ctx.saved_tensors
        # One elementwise pass; the fp32 scale is formed first so only the product is rounded.
        grad = (grad_sum * (grad_output * inv_n)).to(ctx.input_dtype)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def shifted_mse_forward(
    student: torch.Tensor, target: torch.Tensor, shift: torch.Tensor, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: returns (sum of squares over Omega as 0-dim fp32, gradient of that sum).

    Grid: one program per BLOCK_R consecutive student cells in (b, i, j) raster order; each loops
    over C in BLOCK_C chunks. Inputs are read through their strides (any layout); the gradient is
    a contiguous (B, Hs, Ws, C) tensor of the student's dtype (``grad`` if given).
    """
    B, Hs, Ws, C = student.shape
    n_rows = B * Hs * Ws
    check_row_count(n_rows, C)
    grad = new_grad_buffer((B, Hs, Ws, C), student, grad)
    if n_rows == 0:  # nothing to launch (and no division by Hs * Ws == 0 in the kernel)
        return torch.zeros((), dtype=torch.float32, device=student.device), grad
    block_r, block_c = block_sizes(C)
    grid = (triton.cdiv(n_rows, block_r),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=student.device)
    _shifted_mse_fwd_kernel[grid](
        student, target, shift, grad, partial,
        n_rows, Hs, Ws, target.shape[1], target.shape[2], C,
        *student.stride(), *target.stride(), *shift.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    return partial.sum(), grad


class ShiftedMSEFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, student, target, shift):
        sq_sum, grad_sum = shifted_mse_forward(student, target, shift)
        inv_n = 1.0 / (overlap_cells(student.shape, target.shape, shift) * student.shape[-1]).clamp(min=1)
        return StoredGradientLoss.finish(ctx, sq_sum, grad_sum, inv_n, student)


def shifted_mse(
    student: torch.Tensor, target: torch.Tensor, shift: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Mean squared error over the cells where the shifted grids overlap (0-dim float32).

    Differentiable in ``student``; ``target`` is a constant. Any float dtype and memory layout
    (e.g. ``nchw.permute(0, 2, 3, 1)``); the kernel computes in float32.
    """
    check_feature_pair(student, target, "student", "target", same_shape=False)
    device = check_same_device(student=student, target=target)
    shift = check_shift(shift, student.shape[0], device)
    if resolve_backend(backend, device) == "torch":
        return reference.shifted_mse(student, target.detach(), shift).float()
    with device_guard(student.device):
        return ShiftedMSEFunction.apply(student, target.detach(), shift)


# ----------------------------------------------------------------------------------------
# static GPU audit: every (dtype pair, block size) the wrapper can launch
# ----------------------------------------------------------------------------------------
AUDIT_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bf16 student against fp32 (PHI-S normalised) teacher
)
AUDIT_CHANNELS = (16, 64, 1280)  # one C per block_sizes() branch


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw")


def AUDIT_CONFIGS() -> list[AuditConfig]:
    ints = ("n_rows", "Hs", "Ws", "Ht", "Wt", "C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw", "shift_sb")
    configs = []
    for s_dtype, t_dtype in AUDIT_DTYPE_PAIRS:
        for C in AUDIT_CHANNELS:
            block_r, block_c = block_sizes(C)
            ptrs = {
                "s_ptr": TRITON_DTYPE[s_dtype],
                "t_ptr": TRITON_DTYPE[t_dtype],
                "shift_ptr": "i64",
                "grad_ptr": TRITON_DTYPE[grad_dtype(s_dtype)],
                "partial_ptr": "fp32",
            }
            configs.append(
                AuditConfig(
                    kernel=_shifted_mse_fwd_kernel,
                    label=f"{TRITON_DTYPE[s_dtype]}/{TRITON_DTYPE[t_dtype]} R{block_r} C{block_c}",
                    # Unit channel and dx strides are what the JIT specialises for contiguous maps.
                    signature=signature_of(_shifted_mse_fwd_kernel, ptrs, ints, constexpr=("s_sc", "t_sc", "shift_sk")),
                    constexprs={"s_sc": 1, "t_sc": 1, "shift_sk": 1, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    num_warps=NUM_WARPS,
                    aligned=ALIGNED_ARGS,
                )
            )
    return configs
