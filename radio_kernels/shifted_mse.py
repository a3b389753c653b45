"""Shift-aligned masked MSE between a student feature map and a teacher feature map.

Math (student s (B, Hs, Ws, C), target t (B, Ht, Wt, C), shift (B, 2) = (dy, dx))::

    Omega_b = {(i, j) : 0 <= i < Hs, 0 <= j < Ws, 0 <= i + dy < Ht, 0 <= j + dx < Wt}
    loss    = sum_b sum_{(i,j) in Omega_b} ||s_bij - t_b,i+dy,j+dx||^2 / (C * sum_b |Omega_b|)
    dloss/ds_bij = 2 (s_bij - t_b,i+dy,j+dx) / (C * sum_b |Omega_b|) on Omega_b, 0 elsewhere

The loss is exactly 0 with a zero gradient when every Omega_b is empty.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._checks import check_feature_pair, check_same_device, check_shift


def shifted_mse(
    student: torch.Tensor, target: torch.Tensor, shift: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Mean squared error over the cells where the shifted grids overlap (0-dim float32).

    Differentiable in ``student``; ``target`` is a constant.
    """
    check_feature_pair(student, target, "student", "target", same_shape=False)
    device = check_same_device(student=student, target=target)
    shift = check_shift(shift, student.shape[0], device)
    if resolve_backend(backend, device) == "torch":
        return reference.shifted_mse(student, target.detach(), shift).float()
    raise NotImplementedError("the Triton shifted_mse kernel has not landed yet; use backend='torch'")
