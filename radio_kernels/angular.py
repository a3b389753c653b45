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

Kernel plan: one program per BLOCK_R rows, three sweeps over C in BLOCK_C chunks: (1) scaled
sums of squares (LAPACK nrm2 style: running max |x| and sum (x / max)^2, so 1e-30 and 1e30 rows
neither underflow nor overflow), (2) M, P, x^.e and x^.f, (3) the gradient of Theta^2. atan2 is
written with core ``tl`` math (libdevice is not available in the interpreter). The kernel
stores the gradient of sum_b Theta_b^2; backward scales it by grad_output / (B * dispersion).
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
from .shifted_mse import StoredGradientLoss, grad_dtype, load_chunk_f32, new_grad_buffer

TILE = 2048
NUM_WARPS = 4
PI = tl.constexpr(3.141592653589793)
TAN_PI_8 = tl.constexpr(0.41421356237309503)
CHORD_TINY = tl.constexpr(2.0**-40)  # reference._TINY: chords^2 below this are clamped (zero gradient)
FLT_MIN = tl.constexpr(2.0**-126)  # reference._FLT_MIN: rows with max |x| below this are zero rows


def block_sizes(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for C channels."""
    block_c = 16 if C <= 16 else 128 if C <= 128 else 1024
    return TILE // block_c, block_c


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
def _angular_fwd_kernel(
    x_ptr, y_ptr, grad_ptr, partial_ptr,
    n_rows, C,
    x_sb, x_sc, y_sb, y_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Writes partial_ptr[p] = sum of Theta^2 over the program's rows and grad (contiguous
    (n_rows, C)) = dTheta^2/dx."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    x_off = rows.to(tl.int64)[:, None] * x_sb
    y_off = rows.to(tl.int64)[:, None] * y_sb

    # Sweep 1: norms as max|.| * sqrt(sum (./max|.|)^2), rescaling the running sum when the max grows.
    max_x = tl.zeros([BLOCK_R], dtype=tl.float32)
    max_y = tl.zeros([BLOCK_R], dtype=tl.float32)
    ssq_x = tl.zeros([BLOCK_R], dtype=tl.float32)
    ssq_y = tl.zeros([BLOCK_R], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK_R], dtype=tl.int32)  # rows of x or y holding a NaN / Inf
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        mask = row_ok[:, None] & (cols < C)
        x = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask)
        y = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask)
        # |v| < inf is False for NaN and +-Inf alike (masked lanes load 0).
        bad = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
        nonfinite = tl.maximum(nonfinite, tl.max(tl.where(bad, 0, 1), axis=1))
        new_max_x = tl.maximum(max_x, tl.max(tl.abs(x), axis=1))
        new_max_y = tl.maximum(max_y, tl.max(tl.abs(y), axis=1))
        inv_x = _reciprocal_or_zero(new_max_x, new_max_x > 0)
        inv_y = _reciprocal_or_zero(new_max_y, new_max_y > 0)
        ux = x * inv_x[:, None]
        uy = y * inv_y[:, None]
        ssq_x = ssq_x * (max_x * inv_x) * (max_x * inv_x) + tl.sum(ux * ux, axis=1)
        ssq_y = ssq_y * (max_y * inv_y) * (max_y * inv_y) + tl.sum(uy * uy, axis=1)
        max_x = new_max_x
        max_y = new_max_y
    # x^ = x * inv_max * rnorm with rnorm = 1 / ||x / max|x|||, never forming 1 / ||x|| itself.
    x_nonzero = max_x >= FLT_MIN
    y_nonzero = max_y >= FLT_MIN
    inv_max_x = _reciprocal_or_zero(max_x, x_nonzero)
    inv_max_y = _reciprocal_or_zero(max_y, y_nonzero)
    scale_x = (inv_max_x * tl.where(x_nonzero, 1.0 / tl.sqrt(tl.where(x_nonzero, ssq_x, 1.0)), 0.0))[:, None]
    scale_y = (inv_max_y * tl.where(y_nonzero, 1.0 / tl.sqrt(tl.where(y_nonzero, ssq_y, 1.0)), 0.0))[:, None]

    # Sweep 2: chords and the projections of e and f on x^ (each summed directly: no 1 - cos).
    sum_ee = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_ff = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_xe = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_xf = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        mask = row_ok[:, None] & (cols < C)
        x_hat = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask) * scale_x
        y_hat = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask) * scale_y
        e = x_hat - y_hat
        f = x_hat + y_hat
        sum_ee += tl.sum(e * e, axis=1)
        sum_ff += tl.sum(f * f, axis=1)
        sum_xe += tl.sum(x_hat * e, axis=1)
        sum_xf += tl.sum(x_hat * f, axis=1)
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
    k_m = tl.where(broken, float("nan"), k_m)
    k_p = tl.where(broken, float("nan"), k_p)
    tl.store(partial_ptr + pid, tl.sum(tl.where(row_ok, theta * theta, 0.0), axis=0))

    # Sweep 3: dTheta^2/dx = (k_m (e - x^ (x^.e)) - k_p (f - x^ (x^.f))) / ||x||  (0 on zero rows).
    k_m = k_m[:, None]
    k_p = k_p[:, None]
    sum_xe = sum_xe[:, None]
    sum_xf = sum_xf[:, None]
    g_off = rows.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        mask = row_ok[:, None] & (cols < C)
        x_hat = load_chunk_f32(x_ptr, x_off, cols.to(tl.int64), x_sc, mask) * scale_x
        y_hat = load_chunk_f32(y_ptr, y_off, cols.to(tl.int64), y_sc, mask) * scale_y
        e = x_hat - y_hat
        f = x_hat + y_hat
        grad = (k_m * (e - x_hat * sum_xe) - k_p * (f - x_hat * sum_xf)) * scale_x
        tl.store(grad_ptr + g_off + cols.to(tl.int64), grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
def angular_forward(
    x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: (sum_b Theta_b^2 as 0-dim fp32, its gradient in x's dtype, contiguous;
    ``grad`` if given).

    Grid: one program per BLOCK_R rows; each loops over C in BLOCK_C chunks. Inputs are read
    through their strides.
    """
    B, C = x.shape
    if B >= 2**31 or C >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows and channels are supported, got x of shape {tuple(x.shape)}")
    grad = new_grad_buffer((B, C), x, grad)
    if B == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device), grad
    block_r, block_c = block_sizes(C)
    grid = (triton.cdiv(B, block_r),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    _angular_fwd_kernel[grid](
        x, y, grad, partial, B, C, *x.stride(), *y.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    return partial.sum(), grad


class AngularLossFunction(StoredGradientLoss):
    @staticmethod
    def forward(ctx, x, y, dispersion):
        theta2_sum, grad_sum = angular_forward(x, y)
        inv_n = 1.0 / (max(x.shape[0], 1) * dispersion)  # 1 / (B * Disp), on device
        return StoredGradientLoss.finish(ctx, theta2_sum, grad_sum, inv_n, x)


def _check_dispersion(dispersion, device: torch.device) -> torch.Tensor:
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
    return torch.tensor(float(dispersion), device=device)


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
AUDIT_CHANNELS = (16, 128, 1536)  # one C per block_sizes() branch


# With C a multiple of 16 the JIT marks C and the strides 16-divisible (vector loads).
ALIGNED_ARGS = ("C", "x_sb", "y_sb")


def AUDIT_CONFIGS() -> list[AuditConfig]:
    configs = []
    for x_dtype, y_dtype in AUDIT_DTYPE_PAIRS:
        for C in AUDIT_CHANNELS:
            block_r, block_c = block_sizes(C)
            ptrs = {
                "x_ptr": TRITON_DTYPE[x_dtype],
                "y_ptr": TRITON_DTYPE[y_dtype],
                "grad_ptr": TRITON_DTYPE[grad_dtype(x_dtype)],
                "partial_ptr": "fp32",
            }
            configs.append(
                AuditConfig(
                    kernel=_angular_fwd_kernel,
                    label=f"{TRITON_DTYPE[x_dtype]}/{TRITON_DTYPE[y_dtype]} R{block_r} C{block_c}",
                    signature=signature_of(
                        _angular_fwd_kernel, ptrs, ints=("n_rows", "C", "x_sb", "y_sb"), constexpr=("x_sc", "y_sc")
                    ),
                    constexprs={"x_sc": 1, "y_sc": 1, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    num_warps=NUM_WARPS,
                    aligned=ALIGNED_ARGS,
                )
            )
    return configs
