"""Shift-aligned masked MSE between a student feature map and a teacher feature map.

Math (student s (B, Hs, Ws, C), target t (B, Ht, Wt, C), shift (B, 2) = (dy, dx))::

    Omega_b = {(i, j) : 0 <= i < Hs, 0 <= j < Ws, 0 <= i + dy < Ht, 0 <= j + dx < Wt}
    N       = C * sum_b |Omega_b|
    loss    = sum_b sum_{(i,j) in Omega_b} ||s_bij - t_b,i+dy,j+dx||^2 / N
    dloss/ds_bij = 2 (s_bij - t_b,i+dy,j+dx) / N on Omega_b, 0 elsewhere

The loss is exactly 0 with a zero gradient when every Omega_b is empty.

Kernel plan (Liger cross-entropy pattern, ``loss_plan.shifted_mse_plan``): one pass over the student
cells reads each overlapping student and target vector once and writes, per program, the partial
sum of squares and the number of its cells in Omega, plus (when autograd needs it) the gradient of
the *sum*, ``2 (s - t)`` (0 off the overlap). A one-program finish kernel reduces the partials in a
fixed order (deterministic, no atomics) into loss = sum / N and 1 / N: N never leaves the device and
no PyTorch op runs around the kernels. Backward is one in-place scale of the stored gradient by
``grad_output / N``: folding 1/N into backward rather than the kernel keeps fp16 gradients of a mean
over ~10^8 elements from underflowing before a loss scaler can lift them. Under ``torch.no_grad()``
or for a student that does not require grad the loss-only variant runs and no gradient is stored.
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
from .loss_plan import (
    FINISH_BLOCK,
    FINISH_WARPS,
    SCALE_BLOCK,
    SCALE_WARPS,
    KernelPlan,
    scale_grid,
    shifted_mse_plan,
)


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def load_chunk_f32(ptr, row_off, cols64, col_stride, mask):
    """A (rows, channels) chunk of a strided feature map as float32 (masked lanes read 0): loads are
    cast before any arithmetic (also what lets the interpreter handle bf16)."""
    return tl.load(ptr + row_off + cols64 * col_stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def shifted_cells(
    rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw,
    HAS_SHIFT: tl.constexpr,
):  # fmt: skip
    """For flat student cells ``rows`` (b * Hs * Ws + i * Ws + j): int64 row offsets into the
    student and target maps and whether the cell lies in Omega_b (shifted cell inside target).
    ``HAS_SHIFT=False``: zero shift on equal grids (no shift tensor read; Omega = every cell)."""
    in_range = rows < n_rows
    j = rows % Ws
    i = (rows // Ws) % Hs
    b = tl.where(in_range, rows // (Ws * Hs), 0)  # keeps the shift gather in bounds
    dy = tl.zeros_like(i)
    dx = tl.zeros_like(j)
    valid = in_range
    if HAS_SHIFT:
        # Clamped to [-Hs, Ht] x [-Ws, Wt] (beyond, Omega_b is empty either way), so int32 holds them
        # and the bounds tests below cannot overflow: the index math stays 32-bit (fewer registers).
        dy = tl.load(shift_ptr + b * shift_sb, mask=in_range, other=0)
        dx = tl.load(shift_ptr + b * shift_sb + shift_sk, mask=in_range, other=0)
        dy = tl.minimum(tl.maximum(dy, -Hs), Ht).to(tl.int32)
        dx = tl.minimum(tl.maximum(dx, -Ws), Wt).to(tl.int32)
        valid = in_range & (dy >= -i) & (dy < Ht - i) & (dx >= -j) & (dx < Wt - j)
    b64 = b.to(tl.int64)
    s_off = b64 * s_sb + i.to(tl.int64) * s_sh + j.to(tl.int64) * s_sw
    # Off Omega the target offset is garbage; every load through it is masked by `valid`.
    t_off = b64 * t_sb + (i.to(tl.int64) + dy) * t_sh + (j.to(tl.int64) + dx) * t_sw
    return s_off, t_off, valid, in_range


@triton.jit
def store_count(work_ptr, valid):
    """Program p's count of cells in Omega at work[n_programs + p] (a float32 integer <= BLOCK_R,
    exact), read back by ``_loss_finish_kernel``; stored first so that ``valid`` need not outlive the loads."""
    tl.store(work_ptr + tl.num_programs(0) + tl.program_id(0), tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def store_partials(work_ptr, total, valid):
    """Program p's partial sum at work[p] and its count of cells in Omega (``store_count``)."""
    tl.store(work_ptr + tl.program_id(0), total)
    store_count(work_ptr, valid)


@triton.jit
def _shifted_mse_fwd_kernel(
    s_ptr, t_ptr, shift_ptr, grad_ptr, work_ptr,
    n_rows, Hs, Ws, Ht, Wt, C,
    s_sb, s_sh, s_sw, s_sc,
    t_sb, t_sh, t_sw, t_sc,
    shift_sb, shift_sk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STORE_GRAD: tl.constexpr,
):  # fmt: skip
    """Program p owns student cells [p * BLOCK_R, (p + 1) * BLOCK_R) and loops over C once.

    Writes the partials (``store_partials``: sum of squared differences over its cells in Omega,
    their count) and, if ``STORE_GRAD``, grad[cell, c] = 2 (s - t) (0 off Omega; contiguous (n_rows, C)).
    The cell count is stored before the loop, the per-row sums of squares after it. (Accumulating the
    squares elementwise and reducing once at the end made ptxas spill on sm_100, see the audit.)
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    s_off, t_off, valid, in_range = shifted_cells(
        rows, n_rows, Hs, Ws, Ht, Wt, shift_ptr, shift_sb, shift_sk, s_sb, s_sh, s_sw, t_sb, t_sh, t_sw, True
    )
    store_count(work_ptr, valid)
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
        if STORE_GRAD:
            grad = (2.0 * d).to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + g_off[:, None] + cols64[None, :], grad, mask=in_range[:, None] & c_ok[None, :])
    tl.store(work_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _loss_finish_kernel(
    work_ptr, loss_ptr, inv_n_ptr, disp_ptr,
    n_part, per_count, disp,
    HAS_DISP_PTR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: the second stage of every loss kernel.

    total = sum_p work[p], count = sum_p work[n_part + p] (as int32: exact), in a fixed order;
    N = max(count * per_count, 1) * dispersion (``*disp_ptr`` or ``disp``);
    writes loss = total / N and inv_n = 1 / N (what backward scales the stored gradient by).
    """
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for p0 in range(0, n_part, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        ok = p < n_part
        acc += tl.load(work_ptr + p, mask=ok, other=0.0)
        cnt += tl.load(work_ptr + n_part + p, mask=ok, other=0.0).to(tl.int32)
    n = tl.maximum(tl.sum(cnt, axis=0).to(tl.float32) * per_count, 1.0)
    if HAS_DISP_PTR:
        n = n * tl.load(disp_ptr)
    else:
        n = n * disp
    inv_n = 1.0 / n
    tl.store(loss_ptr, tl.sum(acc, axis=0) * inv_n)
    tl.store(inv_n_ptr, inv_n)


@triton.jit
def _loss_scale_grad_kernel(g_ptr, out_ptr, go_ptr, inv_n_ptr, n, BLOCK: tl.constexpr):
    """out = g * (grad_output * inv_n), the scale formed in fp32 first so only the product is
    rounded; ``out`` may be ``g`` itself (in place)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    scale = tl.load(go_ptr).to(tl.float32) * tl.load(inv_n_ptr)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
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


def needs_grad(x: torch.Tensor) -> bool:
    """Whether autograd will ask for d loss / d x: otherwise the loss-only kernels run."""
    return torch.is_grad_enabled() and x.requires_grad


def work_buffer(plan: KernelPlan, n_rows: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(fp32 buffer for the per-program partial sums and counts, number of programs)."""
    grid = plan.grid(n_rows)
    return torch.empty(max(2 * grid, 1), dtype=torch.float32, device=device), grid


def finish_loss(
    work: torch.Tensor, n_part: int, per_count: float, dispersion: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the finish kernel: (loss, 1 / N), both 0-dim float32 on the work buffer's device.

    N = max(cells counted by the main kernel * per_count, 1) * dispersion.
    """
    loss = torch.empty((), dtype=torch.float32, device=work.device)
    inv_n = torch.empty((), dtype=torch.float32, device=work.device)
    disp_is_tensor = isinstance(dispersion, torch.Tensor)
    _loss_finish_kernel[(1,)](
        work, loss, inv_n, dispersion if disp_is_tensor else work,
        n_part, float(per_count), 1.0 if disp_is_tensor else float(dispersion),
        HAS_DISP_PTR=disp_is_tensor, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS,
    )  # fmt: skip
    return loss, inv_n


def graph_kept() -> bool:
    """Whether the running backward keeps its graph (``retain_graph`` / ``create_graph``), so that a
    later backward reads the stored gradient again. True where it cannot be asked (then the stored
    gradient is never overwritten)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return query is None or torch.compiler.is_compiling() or bool(query())


def scale_stored_grad(
    grad_sum: torch.Tensor, grad_output: torch.Tensor, inv_n: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """grad_sum * (grad_output * inv_n) in ``dtype``: in place (no second full-size tensor) when the
    stored gradient already has ``dtype`` and no later backward will read it; else into a new tensor
    (float16 inputs, whose summed gradient is stored in float32; a retained graph)."""
    in_place = grad_sum.dtype == dtype and not graph_kept()
    out = grad_sum if in_place else torch.empty(grad_sum.shape, dtype=dtype, device=grad_sum.device)
    grid = scale_grid(grad_sum.numel())
    if grid:
        with device_guard(grad_sum.device):
            _loss_scale_grad_kernel[(grid,)](
                grad_sum, out, grad_output, inv_n, grad_sum.numel(), BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS
            )
    return out


class StoredGradientLoss(torch.autograd.Function):
    """Base of the loss Functions: forward runs a kernel that returns the loss, 1 / N and the gradient
    of the summed loss (one read of each input); ``finish`` stores them, and backward only scales the
    stored gradient by grad_output / N, in place (Liger's pattern). Only the first input gets a gradient.

    Once differentiable: the stored gradient is a constant to autograd, so a double backward would be
    silently wrong; ``once_differentiable`` makes it raise instead.
    """

    @staticmethod
    def finish(ctx, loss: torch.Tensor, inv_n: torch.Tensor, grad_sum: torch.Tensor, like: torch.Tensor):
        ctx.save_for_backward(grad_sum, inv_n)
        ctx.input_dtype = like.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *_):
        grad_sum, inv_n = ctx.saved_tensors
        grad = scale_stored_grad(grad_sum, grad_output, inv_n, ctx.input_dtype)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def shifted_mse_forward(
    student: torch.Tensor,
    target: torch.Tensor,
    shift: torch.Tensor,
    *,
    store_grad: bool = True,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernels: (loss, 1 / N, gradient of the summed loss or None without ``store_grad``).

    Grid: one program per BLOCK_R consecutive student cells in (b, i, j) raster order; each loops
    over C in BLOCK_C chunks (``loss_plan.shifted_mse_plan``), then one finish program. Inputs are
    read through their strides (any layout); the gradient is a contiguous (B, Hs, Ws, C) tensor of
    ``grad_dtype(student.dtype)`` (``grad`` if given).
    """
    B, Hs, Ws, C = student.shape
    n_rows = B * Hs * Ws
    check_row_count(n_rows, C)
    grad = new_grad_buffer((B, Hs, Ws, C), student, grad) if store_grad else None
    plan = shifted_mse_plan(C)
    work, grid = work_buffer(plan, n_rows, student.device)
    if grid:  # no programs for an empty map (and no division by Hs * Ws == 0 in the kernel)
        _shifted_mse_fwd_kernel[(grid,)](
            student, target, shift, grad if store_grad else work, work,
            n_rows, Hs, Ws, target.shape[1], target.shape[2], C,
            *student.stride(), *target.stride(), *shift.stride(),
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, STORE_GRAD=store_grad, num_warps=plan.num_warps,
        )  # fmt: skip
    loss, inv_n = finish_loss(work, grid, C)
    return loss, inv_n, grad


class ShiftedMSEFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, student, target, shift):
        loss, inv_n, grad_sum = shifted_mse_forward(student, target, shift)
        return StoredGradientLoss.finish(ctx, loss, inv_n, grad_sum, student)


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
        if not needs_grad(student):
            return shifted_mse_forward(student, target.detach(), shift, store_grad=False)[0]
        return ShiftedMSEFunction.apply(student, target.detach(), shift)


# ----------------------------------------------------------------------------------------
# static GPU audit: every (dtype pair, block size, variant) the wrappers can launch
# ----------------------------------------------------------------------------------------
AUDIT_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bf16 student against fp32 (PHI-S normalised) teacher
)
AUDIT_CHANNELS = (16, 64, 1280)  # one C per shifted_mse_plan() branch


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw")


def grad_ptr_type(dtype: torch.dtype, store_grad: bool) -> str:
    """The grad pointer's element type as launched: the loss-only variants get the fp32 work buffer."""
    return TRITON_DTYPE[grad_dtype(dtype)] if store_grad else "fp32"


def variant_label(store_grad: bool) -> str:
    return "grad" if store_grad else "loss-only"


def shared_audit_configs() -> list[AuditConfig]:
    """The finish kernel (with and without a dispersion tensor) and the backward scale kernel for
    every (stored gradient dtype -> input dtype) pair."""
    configs = []
    for has_disp in (False, True):
        ptrs = {"work_ptr": "fp32", "loss_ptr": "fp32", "inv_n_ptr": "fp32", "disp_ptr": "fp32"}
        configs.append(
            AuditConfig(
                kernel=_loss_finish_kernel,
                label=f"BLOCK{FINISH_BLOCK}" + (" disp tensor" if has_disp else ""),
                signature=signature_of(_loss_finish_kernel, ptrs, ints=("n_part",), floats=("per_count", "disp")),
                constexprs={"HAS_DISP_PTR": has_disp, "BLOCK": FINISH_BLOCK},
                num_warps=FINISH_WARPS,
            )
        )
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        stored, out = TRITON_DTYPE[grad_dtype(dtype)], TRITON_DTYPE[dtype]
        ptrs = {"g_ptr": stored, "out_ptr": out, "go_ptr": "fp32", "inv_n_ptr": "fp32"}
        # numel is passed as i32 below 2**31 (16-divisible when C is) and as i64 above.
        for wide in (False, True):
            configs.append(
                AuditConfig(
                    kernel=_loss_scale_grad_kernel,
                    label=f"{stored}->{out} BLOCK{SCALE_BLOCK} n:{'i64' if wide else 'i32'}",
                    signature=signature_of(_loss_scale_grad_kernel, ptrs, **{"i64" if wide else "ints": ("n",)}),
                    constexprs={"BLOCK": SCALE_BLOCK},
                    num_warps=SCALE_WARPS,
                    aligned=() if wide else ("n",),
                )
            )
    return configs


def AUDIT_CONFIGS() -> list[AuditConfig]:
    ints = ("n_rows", "Hs", "Ws", "Ht", "Wt", "C", "s_sb", "s_sh", "s_sw", "t_sb", "t_sh", "t_sw", "shift_sb")
    configs = []
    for s_dtype, t_dtype in AUDIT_DTYPE_PAIRS:
        for C in AUDIT_CHANNELS:
            plan = shifted_mse_plan(C)
            for store_grad in (True, False):
                ptrs = {
                    "s_ptr": TRITON_DTYPE[s_dtype],
                    "t_ptr": TRITON_DTYPE[t_dtype],
                    "shift_ptr": "i64",
                    "grad_ptr": grad_ptr_type(s_dtype, store_grad),
                    "work_ptr": "fp32",
                }
                label = f"{TRITON_DTYPE[s_dtype]}/{TRITON_DTYPE[t_dtype]} R{plan.block_r} C{plan.block_c}"
                constexprs = {"s_sc": 1, "t_sc": 1, "shift_sk": 1}
                constexprs.update(BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, STORE_GRAD=store_grad)
                configs.append(
                    AuditConfig(
                        kernel=_shifted_mse_fwd_kernel,
                        label=f"{label} {variant_label(store_grad)}",
                        # Unit channel and dx strides are what the JIT specialises for contiguous maps.
                        signature=signature_of(
                            _shifted_mse_fwd_kernel, ptrs, ints, constexpr=("s_sc", "t_sc", "shift_sk")
                        ),
                        constexprs=constexprs,
                        num_warps=plan.num_warps,
                        aligned=ALIGNED_ARGS,
                    )
                )
    return configs + shared_audit_configs()
