"""Balanced (angular) summary loss, the angular dispersion and its running estimate.

Math (x, y (B, C); x^ = x / ||x||)::

    Theta(x, y) = 2 atan2(||x^ - y^||, ||x^ + y^||)       in [0, pi], stable at 0 and pi
    loss        = mean_b Theta(x_b, y_b)^2 / dispersion
    Disp(y)     = E_b[Theta(y_b, mu)^2],  mu = E_b[y_b] / ||E_b[y_b]||

Dividing by the teacher's dispersion balances teachers whose summaries spread very
differently on the sphere (C-RADIOv4: SigLIP2 0.694, DINOv3 2.186).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference
from ._backend import resolve_backend
from ._checks import check_same_device, check_tensor


def _check_dispersion(dispersion, device: torch.device) -> torch.Tensor:
    if isinstance(dispersion, torch.Tensor):
        if dispersion.numel() != 1:
            raise ValueError(f"dispersion must be a float or a 0-dim tensor, got shape {tuple(dispersion.shape)}")
        disp = dispersion.reshape(()).to(device=device, dtype=torch.float32)
        if not torch.compiler.is_compiling() and not disp.is_cuda and not bool(disp > 0):
            raise ValueError(f"dispersion must be > 0, got {disp.item()}")
        return disp
    if not isinstance(dispersion, (int, float)) or not dispersion > 0:
        raise ValueError(f"dispersion must be a float > 0, got {dispersion!r}")
    return torch.tensor(float(dispersion), device=device)


def angular_loss(x: torch.Tensor, y: torch.Tensor, dispersion, *, backend: str = "auto") -> torch.Tensor:
    """mean_b Theta(x_b, y_b)^2 / dispersion (0-dim float32); differentiable in ``x``."""
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have equal shapes (B, C), got {tuple(x.shape)} and {tuple(y.shape)}")
    device = check_same_device(x=x, y=y)
    disp = _check_dispersion(dispersion, device)
    if resolve_backend(backend, device) == "torch":
        return reference.angular_loss(x, y.detach(), disp).float()
    raise NotImplementedError("the Triton angular_loss kernel has not landed yet; use backend='torch'")


def angular_dispersion(y: torch.Tensor) -> torch.Tensor:
    """E_b[Theta(y_b, mu)^2] with mu the normalised mean of the rows of ``y`` (B, C)."""
    check_tensor("y", y, ndim=2)
    return reference.angular_dispersion(y.detach()).float()


class DispersionMeter(torch.nn.Module):
    """Running estimate of a teacher's angular dispersion over the batches it has seen.

    Keeps float64 sums: the sum of all summaries (for the mean direction mu) and the sum of
    Theta(y_b, mu)^2, each batch measured against mu as known after adding that batch (the
    teacher is frozen, so mu settles quickly). Sums are all-reduced across processes when
    torch.distributed is initialised, so every rank holds the same value. Reading ``value``
    never syncs with the host.
    """

    def __init__(self, dim: int, initial: float = 1.0):
        super().__init__()
        if not initial > 0:
            raise ValueError(f"initial must be > 0, got {initial}")
        self.dim, self.initial = dim, float(initial)
        self.register_buffer("sum_y", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sum_theta2", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, y: torch.Tensor) -> torch.Tensor:
        """Add a batch of teacher summaries y (B, dim); returns the new estimate."""
        check_tensor("y", y, ndim=2)
        if y.shape[1] != self.dim:
            raise ValueError(f"y must have {self.dim} channels, got shape {tuple(y.shape)}")
        y = y.to(device=self.sum_y.device, dtype=torch.float64)
        distributed = dist.is_available() and dist.is_initialized()
        sums = torch.cat([y.sum(0), y.new_tensor([y.shape[0]])])
        if distributed:
            dist.all_reduce(sums)
        self.sum_y += sums[:-1]
        self.count += sums[-1]
        mu = reference.mean_direction(self.sum_y[None])
        theta2 = reference.angle(y, mu.expand_as(y)).square().sum()
        if distributed:
            dist.all_reduce(theta2)
        self.sum_theta2 += theta2
        return self.value

    @property
    def value(self) -> torch.Tensor:
        """Current estimate (0-dim float32); ``initial`` until the first update."""
        est = self.sum_theta2 / self.count.clamp(min=1)
        return torch.where(self.count > 0, est.clamp(min=1e-8), self.initial).float()
