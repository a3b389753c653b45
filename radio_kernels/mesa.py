"""MESA loss: shift-aligned MSE between layer-normalised student and EMA-student features.

Math (LN over C without affine parameters, biased variance, eps inside the sqrt)::

    LN(x)_c = (x_c - mean(x)) / sqrt(var(x) + eps)
    loss    = shifted_mse(LN(student), LN(ema), shift)

Gradient flows to ``student`` only, through its LayerNorm.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._checks import check_feature_pair, check_same_device, check_shift


def mesa_loss(
    student: torch.Tensor,
    ema: torch.Tensor,
    shift: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm-then-shifted-MSE of ``student`` against the EMA student's ``ema`` features."""
    check_feature_pair(student, ema, "student", "ema", same_shape=shift is None)
    device = check_same_device(student=student, ema=ema)
    if shift is not None:
        shift = check_shift(shift, student.shape[0], device)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if resolve_backend(backend, device) == "torch":
        return reference.mesa_loss(student, ema.detach(), shift, eps=eps).float()
    raise NotImplementedError("the Triton mesa_loss kernel has not landed yet; use backend='torch'")
