"""Balanced (angular) summary loss, the angular dispersion and its running estimate.

Math (x, y (B, C); x^ = x / ||x||, a zero row has x^ = 0; a row of x or y holding a NaN or an
Inf gives Theta = NaN and a NaN gradient row, on both backends: a diverged input is reported,
never turned into a finite loss)::

    Theta(x, y) = 2 atan2(||x^ - y^||, ||x^ + y^||)       in [0, pi], stable at 0 and pi
    loss        = mean_b Theta(x_b, y_b)^2 / dispersion
    Disp(y)     = E_b[Theta(y_b, mu)^2],  mu = E_b[y_b] / ||E_b[y_b]||

Dividing by the teacher's dispersion balances teachers whose summaries spread very
differently on the sphere (C-RADIOv4: SigLIP2 0.694, DINOv3 2.186).

Gradient (per row; e = x^ - y^, f = x^ + y^, M = ||e||^2, P = ||f||^2, m = sqrt(M), p = sqrt(P))::

    dTheta^2/dx^ = k_m e - k_p f,   k_m = 4 Theta p / (m (m^2 + p^2)),  k_p = 4 Theta m / (p (m^2 + p^2))
    dTheta^2/dx  = (g - x^ (x^ . g)) / ||x||,   g = dTheta^2/dx^

(k_m = k_p = 0 when M or P is clamped at 2**-40; both finite elsewhere since Theta ~ m near 0.)

Kernel plan (``loss_plan.angular_plan``), like ``mesa``: for C <= 4096 each program holds its rows
whole in registers (one warp owning whole rows for C <= 1024, 2-4 warps per row above) and reads
each input element once; wider rows take three sweeps over C in BLOCK_C chunks, re-reading the row
from L1/L2. The steps: (1) scaled sums of squares (LAPACK nrm2 style: running max |x| and
sum (x / max)^2, so 1e-30 and 1e30 rows neither underflow nor overflow), (2) M, P, x^.e and x^.f,
(3) the gradient of Theta^2 (only when autograd needs it: ``STORE_GRAD``). atan2 is written with
core ``tl`` math (libdevice is not available in the interpreter). Each program writes its partial
sum of Theta^2 and its row count; the shared finish kernel of ``shifted_mse`` forms the loss and
1 / (B * dispersion) on the device. The kernel stores the gradient of sum_b Theta_b^2; backward
scales it in place by grad_output / (B * dispersion).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import reference
from ._audit_registry import TRITON_DTYPE, AuditConfig, signature_of
from ._backend import device_guard, resolve_backend
from ._checks import check_same_device, check_tensor
from .loss_plan import angular_plan
from .shifted_mse import (
    StoredGradientLoss,
    finish_loss,
    grad_ptr_type,
    load_chunk_f32,
    needs_grad,
    new_grad_buffer,
    store_partials,
    variant_label,
    work_buffer,
)

PI = tl.constexpr(3.141592653589793)
TAN_PI_8 = tl.constexpr(0.41421356237309503)
CHORD_TINY = tl.constexpr(2.0**-40)  # reference._TINY: chords^2 below this are clamped (zero gradient)
FLT_MIN = tl.constexpr(2.0**-126)  # reference._FLT_MIN: rows with max |x| below this are zero rows


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _reciprocal_or_zero(v, ok):
    """1 / v where ``ok``, else 0 (the division never sees the excluded lanes)."""
    return tl.where(ok, 1.0 / tl.where(ok, v, 1.0), 0.0)


@triton.jit
def atan2_nonneg(y, x):
    """atan2(y, x) for y, x >= 0 (not both 0), to ~2 float32 ulp, with core tl math only.

    t = min / max in [0, 1]; for t > tan(pi/8) use atan(t) = pi/4 + atan((t - 1) / (t + 1)), which
    maps t into [-0.172, 0.415]; there atan is the Cephes atanf minimax odd polynomial. Finally
    atan2 = pi/2 - atan(x / y) when y > x.
    """
    # Correctly rounded divisions (div.rn): the GPU's default fp32 division (div.full) is off by up to
    # 2 ulp, which would eat the polynomial's accuracy budget.
    t = tl.div_rn(tl.minimum(y, x), tl.maximum(y, x))
    big = t > TAN_PI_8
    z = tl.where(big, tl.div_rn(t - 1.0, t + 1.0), t)
    z2 = z * z
    poly = ((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1
    r = poly * z2 * z + z
    r = tl.where(big, r + PI / 4, r)
    return tl.where(y > x, PI / 2 - r, r)


@triton.jit
def _norm_stats(x, y, max_x, max_y, ssq_x, ssq_y, nonfinite):
    """Merge a (rows, channels) chunk of x and y into the running scaled norms: max |.| per row and
    sum (. / max)^2, rescaling the running sum when the max grows; ``nonfinite`` flags rows holding
    a NaN / Inf (masked lanes load 0)."""
    # |v| < inf is False for NaN and +-Inf alike.
    ok = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
    nonfinite = tl.maximum(nonfinite, tl.max(tl.where(ok, 0, 1), axis=1))
    new_max_x = tl.maximum(max_x, tl.max(tl.abs(x), axis=1))
    new_max_y = tl.maximum(max_y, tl.max(tl.abs(y), axis=1))
    inv_x = _reciprocal_or_zero(new_max_x, new_max_x > 0)
    inv_y = _reciprocal_or_zero(new_max_y, new_max_y > 0)
    ux = x * inv_x[:, None]
    uy = y * inv_y[:, None]
    ssq_x = ssq_x * (max_x * inv_x) * (max_x * inv_x) + tl.sum(ux * ux, axis=1)
    ssq_y = ssq_y * (max_y * inv_y) * (max_y * inv_y) + tl.sum(uy * uy, axis=1)
    return new_max_x, new_max_y, ssq_x, ssq_y, nonfinite


@triton.jit
def _unit_scale(max_v, ssq_v):
    """Per-row factor turning v into v^ = v * inv_max * rnorm, rnorm = 1 / ||v / max|v|||, never
    forming 1 / ||v|| itself (0 for a zero row)."""
    nonzero = max_v >= FLT_MIN
    inv_max = _reciprocal_or_zero(max_v, nonzero)
    return (inv_max * tl.where(nonzero, 1.0 / tl.sqrt(tl.where(nonzero, ssq_v, 1.0)), 0.0))[:, None]


@triton.jit
def _chord_sums(x_hat, y_hat):
    """Row sums of the chords and of the projections of e and f on x^ (each summed directly: no 1 - cos)."""
    e = x_hat - y_hat
    f = x_hat + y_hat
    return tl.sum(e * e, axis=1), tl.sum(f * f, axis=1), tl.sum(x_hat * e, axis=1), tl.sum(x_hat * f, axis=1)


@triton.jit
def _theta_grad(x_hat, y_hat, k_m, k_p, sum_xe, sum_xf, scale_x):
    """dTheta^2/dx = (k_m (e - x^ (x^.e)) - k_p (f - x^ (x^.f))) / ||x||  (0 on zero rows)."""
    e = x_hat - y_hat
    f = x_hat + y_hat
    return (k_m * (e - x_hat * sum_xe) - k_p * (f - x_hat * sum_xf)) * scale_x


@triton.jit
def _angular_fwd_kernel(
    x_ptr, y_ptr, grad_ptr, work_ptr,
    n_rows, C,
    x_sb, x_sc, y_sb, y_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RESIDENT: tl.constexpr, STORE_GRAD: tl.constexpr,
):  # fmt: skip
    """Writes the partials (``store_partials``: sum of Theta^2 over the program's rows, their count)
    and, if ``STORE_GRAD``, grad (contiguous (n_rows, C)) = dTheta^2/dx. ``RESIDENT``: BLOCK_C >= C,
    each row is loaded once and kept in registers."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_off = rows.to(tl.int64)[:, None] * x_sb
    y_off = rows.to(tl.int64)[:, None] * y_sb
    g_off = rows.to(tl.int64)[:, None] * C

    # Step 1: norms as max|.| * sqrt(sum (./max|.|)^2).
    zero = tl.zeros([BLOCK_R], dtype=tl.float32)
    if RESIDENT:
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = row_ok[:, None] & (cols < C)
        x = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask)
        y = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask)
        max_x, max_y, ssq_x, ssq_y, nonfinite = _norm_stats(
            x, y, zero, zero, zero, zero, tl.zeros([BLOCK_R], dtype=tl.int32)
        )
    else:
        max_x, max_y, ssq_x, ssq_y = zero, zero, zero, zero
        nonfinite = tl.zeros([BLOCK_R], dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
            mask = row_ok[:, None] & (cols < C)
            x = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask)
            y = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask)
            max_x, max_y, ssq_x, ssq_y, nonfinite = _norm_stats(x, y, max_x, max_y, ssq_x, ssq_y, nonfinite)
    scale_x = _unit_scale(max_x, ssq_x)
    scale_y = _unit_scale(max_y, ssq_y)

    # Step 2: chords and the projections of e and f on x^.
    if RESIDENT:
        x_hat = x * scale_x
        y_hat = y * scale_y
        sum_ee, sum_ff, sum_xe, sum_xf = _chord_sums(x_hat, y_hat)
    else:
        sum_ee, sum_ff, sum_xe, sum_xf = zero, zero, zero, zero
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
            mask = row_ok[:, None] & (cols < C)
            x_hat = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask) * scale_x
            y_hat = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask) * scale_y
            ee, ff, xe, xf = _chord_sums(x_hat, y_hat)
            sum_ee += ee
            sum_ff += ff
            sum_xe += xe
            sum_xf += xf
    m = tl.sqrt(tl.maximum(sum_ee, CHORD_TINY))
    p = tl.sqrt(tl.maximum(sum_ff, CHORD_TINY))
    theta = 2.0 * atan2_nonneg(m, p)
    denom = m * m + p * p
    # Either chord clamped (within ~1e-6 rad of parallel / antiparallel): zero gradient, as in
    # reference.angle, since the small chord's direction is rounding noise there.
    live = (sum_ee > CHORD_TINY) & (sum_ff > CHORD_TINY)
    k_m = tl.where(live, 4.0 * theta * p / (m * denom), 0.0)
    k_p = tl.where(live, 4.0 * theta * m / (p * denom), 0.0)
    # A row with a NaN / Inf: Theta and its gradient row are NaN (as in reference.angle), never a
    # zero row's pi/2, so that a broken sample shows in the loss instead of hiding in it.
    broken = nonfinite > 0
    theta = tl.where(broken, float("nan"), theta)
    store_partials(work_ptr, tl.sum(tl.where(row_ok, theta * theta, 0.0), axis=0), row_ok)

    # Step 3: the gradient of Theta^2.
    if STORE_GRAD:
        k_m = tl.where(broken, float("nan"), k_m)[:, None]
        k_p = tl.where(broken, float("nan"), k_p)[:, None]
        sum_xe = sum_xe[:, None]
        sum_xf = sum_xf[:, None]
        if RESIDENT:
            grad = _theta_grad(x_hat, y_hat, k_m, k_p, sum_xe, sum_xf, scale_x)
            tl.store(grad_ptr + g_off + cols.to(tl.int64), grad.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
                mask = row_ok[:, None] & (cols < C)
                x_hat = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask) * scale_x
                y_hat = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask) * scale_y
                grad = _theta_grad(x_hat, y_hat, k_m, k_p, sum_xe, sum_xf, scale_x)
                tl.store(grad_ptr + g_off + cols.to(tl.int64), grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
def angular_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    dispersion: torch.Tensor | float = 1.0,
    *,
    store_grad: bool = True,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernels: (loss = mean_b Theta_b^2 / dispersion, 1 / (B * dispersion), the gradient
    of sum_b Theta_b^2 in ``grad_dtype(x.dtype)``, contiguous (``grad`` if given), or None without
    ``store_grad``).

    Grid: one program per BLOCK_R rows (``loss_plan.angular_plan``), then one finish program.
    Inputs are read through their strides; ``dispersion`` is a float or a 0-dim float32 tensor on
    x's device (read by the finish kernel: no host sync).
    """
    B, C = x.shape
    if B >= 2**31 or C >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows and channels are supported, got x of shape {tuple(x.shape)}")
    grad = new_grad_buffer((B, C), x, grad) if store_grad else None
    plan = angular_plan(C)
    work, grid = work_buffer(plan, B, x.device)
    if grid:
        _angular_fwd_kernel[(grid,)](
            x, y, grad if store_grad else work, work, B, C, *x.stride(), *y.stride(),
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, RESIDENT=plan.resident, STORE_GRAD=store_grad,
            num_warps=plan.num_warps,
        )  # fmt: skip
    loss, inv_n = finish_loss(work, grid, 1.0, dispersion)
    return loss, inv_n, grad


class AngularLossFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, x, y, dispersion):
        loss, inv_n, grad_sum = angular_forward(x, y, dispersion)
        return StoredGradientLoss.finish(ctx, loss, inv_n, grad_sum, x)


def _check_dispersion(dispersion, device: torch.device) -> torch.Tensor | float:
    """A 0-dim float32 tensor on ``device`` or a Python float (passed to the kernels as a scalar)."""
    if isinstance(dispersion, torch.Tensor):
        if dispersion.numel() != 1:
            raise ValueError(f"dispersion must be a float or a 0-dim tensor, got shape {tuple(dispersion.shape)}")
        if dispersion.device != device:
            raise ValueError(f"dispersion must be on {device} like x and y, got a tensor on {dispersion.device}")
        disp = dispersion.reshape(()).to(dtype=torch.float32)
        if not torch.compiler.is_compiling() and not disp.is_cuda and not bool((disp > 0) & disp.isfinite()):
            raise ValueError(f"dispersion must be finite and > 0, got {disp.item()}")
        return disp
    if isinstance(dispersion, bool) or not isinstance(dispersion, (int, float)) or not 0 < dispersion < math.inf:
        raise ValueError(f"dispersion must be a finite float > 0, got {dispersion!r}")
    return float(dispersion)


def angular_loss(x: torch.Tensor, y: torch.Tensor, dispersion, *, backend: str = "auto") -> torch.Tensor:
    """mean_b Theta(x_b, y_b)^2 / dispersion (0-dim float32); differentiable in ``x``."""
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have equal shapes (B, C), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x and y must hold at least one row (B >= 1) for the mean over rows")
    if x.shape[1] == 0:
        raise ValueError("x and y must hold at least one channel (C >= 1): a direction needs one")
    device = check_same_device(x=x, y=y)
    disp = _check_dispersion(dispersion, device)
    if resolve_backend(backend, device) == "torch":
        return reference.angular_loss(x, y.detach(), disp).float()
    with device_guard(x.device):
        if not needs_grad(x):
            return angular_forward(x, y.detach(), disp, store_grad=False)[0]
        return AngularLossFunction.apply(x, y.detach(), disp)


def angular_dispersion(y: torch.Tensor) -> torch.Tensor:
    """E_b[Theta(y_b, mu)^2] with mu the normalised mean of the rows of ``y`` (B, C)."""
    check_tensor("y", y, ndim=2)
    if y.shape[0] == 0 or y.shape[1] == 0:
        raise ValueError(f"y must hold at least one row and one channel, got shape {tuple(y.shape)}")
    return reference.angular_dispersion(y.detach()).float()


class DispersionMeter(torch.nn.Module):
    """Running estimate of a teacher's angular dispersion over the batches it has seen.

    Keeps float64 sums: the sum of all summaries (for the mean direction mu) and the sum of
    Theta(y_b, mu)^2, each batch measured against mu as known after adding that batch (the
    teacher is frozen, so mu settles quickly). Sums are all-reduced across processes when
    torch.distributed is initialised, so every rank holds the same value. Reading ``value``
    never syncs with the host.

    Early estimates are biased low: a mean direction fitted to a few samples lies close to each
    of them (to a single sample, exactly: Theta = 0, and the loss Theta^2 / Disp would explode).
    So the first ``warmup_samples`` summaries only build mu; angles are accumulated from the first
    batch that arrives after them, and until then ``value`` is ``initial``. ``floor`` bounds the
    estimate of a teacher whose summaries hardly spread (a randomly initialised one, or constant
    images) below: Theta^2 <= pi^2, so the loss stays <= pi^2 / floor. Rows holding a NaN or Inf
    are left out of every sum and counted in ``nonfinite_rows``.
    """

    def __init__(self, dim: int, initial: float = 1.0, warmup_samples: int = 32, floor: float = 1e-4):
        super().__init__()
        if not initial > 0:
            raise ValueError(f"initial must be > 0, got {initial}")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        if isinstance(warmup_samples, bool) or not isinstance(warmup_samples, int) or warmup_samples < 1:
            raise ValueError(f"warmup_samples must be an int >= 1, got {warmup_samples!r}")
        self.dim, self.initial, self.warmup_samples, self.floor = dim, float(initial), warmup_samples, float(floor)
        self.register_buffer("sum_y", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))  # samples in sum_y
        self.register_buffer("sum_theta2", torch.zeros((), dtype=torch.float64))
        self.register_buffer("theta_count", torch.zeros((), dtype=torch.float64))  # samples in sum_theta2
        self.register_buffer("nonfinite_rows", torch.zeros((), dtype=torch.float64))  # rows left out

    @torch.no_grad()
    def update(self, y: torch.Tensor) -> torch.Tensor:
        """Add a batch of teacher summaries y (B, dim); returns the new estimate."""
        check_tensor("y", y, ndim=2)
        if y.shape[1] != self.dim:
            raise ValueError(f"y must have {self.dim} channels, got shape {tuple(y.shape)}")
        y = y.to(device=self.sum_y.device, dtype=torch.float64)
        # Rows with a NaN / Inf (a broken sample) are left out and counted, so that one bad batch
        # cannot poison the running sums for good. Masked, not indexed: no host sync.
        finite = torch.isfinite(y).all(1, keepdim=True)
        y = torch.where(finite, y, 0.0)
        good = finite.sum().to(torch.float64)
        distributed = dist.is_available() and dist.is_initialized()
        sums = torch.cat([y.sum(0), torch.stack([good, y.shape[0] - good])])
        if distributed:
            dist.all_reduce(sums)
        # Whether mu rested on warmup_samples before this batch (a 0-dim tensor: no host sync).
        measured = (self.count >= self.warmup_samples).to(torch.float64)
        self.sum_y += sums[:-2]
        self.count += sums[-2]
        self.nonfinite_rows += sums[-1]
        mu = reference.mean_direction(self.sum_y[None])
        theta2 = (reference.angle(y, mu.expand_as(y)).square() * finite[:, 0]).sum()
        if distributed:
            dist.all_reduce(theta2)
        self.sum_theta2 += measured * theta2
        self.theta_count += measured * sums[-2]
        return self.value

    @property
    def value(self) -> torch.Tensor:
        """Current estimate (0-dim float32); ``initial`` until angles have been measured."""
        est = self.sum_theta2 / self.theta_count.clamp(min=1)
        return torch.where(self.theta_count > 0, est.clamp(min=self.floor), self.initial).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before ``theta_count`` existed measured angles from the first sample.
        if prefix + "theta_count" not in state_dict and prefix + "count" in state_dict:
            state_dict[prefix + "theta_count"] = state_dict[prefix + "count"].clone()
        state_dict.setdefault(prefix + "nonfinite_rows", torch.zeros((), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------------------
# static GPU audit: every (dtype, block size) the wrapper can launch
# ----------------------------------------------------------------------------------------
AUDIT_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bf16 student summaries against fp32 teacher summaries
)
# One C per angular_plan() branch: each register-resident row width (1536 for the paper's 2048 one) and the fallback.
AUDIT_CHANNELS = (64, 256, 1024, 1536, 4096, 8192)


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "x_sb", "y_sb")


def AUDIT_CONFIGS() -> list[AuditConfig]:
    configs = []
    for x_dtype, y_dtype in AUDIT_DTYPE_PAIRS:
        for C in AUDIT_CHANNELS:
            plan = angular_plan(C)
            for store_grad in (True, False):
                ptrs = {
                    "x_ptr": TRITON_DTYPE[x_dtype],
                    "y_ptr": TRITON_DTYPE[y_dtype],
                    "grad_ptr": grad_ptr_type(x_dtype, store_grad),
                    "work_ptr": "fp32",
                }
                layout = "resident" if plan.resident else "chunked"
                label = f"{TRITON_DTYPE[x_dtype]}/{TRITON_DTYPE[y_dtype]} R{plan.block_r} C{plan.block_c}"
                label += f" w{plan.num_warps} {layout} {variant_label(store_grad)}"
                constexprs = {"x_sc": 1, "y_sc": 1, "BLOCK_R": plan.block_r, "BLOCK_C": plan.block_c}
                constexprs.update(RESIDENT=plan.resident, STORE_GRAD=store_grad)
                configs.append(
                    AuditConfig(
                        kernel=_angular_fwd_kernel,
                        label=label,
                        signature=signature_of(
                            _angular_fwd_kernel, ptrs, ints=("n_rows", "C", "x_sb", "y_sb"), constexpr=("x_sc", "y_sc")
                        ),
                        constexprs=constexprs,
                        num_warps=plan.num_warps,
                        aligned=ALIGNED_ARGS,
                    )
                )
    return configs
