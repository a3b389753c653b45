"""Input validation shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(t.shape)}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(allow_meta: bool = False, **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``. ``allow_meta``: meta tensors pass (ops without value checks, so that
    shape-only passes such as a dry run's FLOP count can run through them)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    if first.type == "meta" and not allow_meta:  # no data to compute on (and value checks cannot read it)
        raise ValueError(f"{', '.join(devices)} are on the meta device, which holds no data; use CPU or CUDA tensors")
    return first


def check_shift(shift, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(shift, torch.Tensor):
        raise TypeError(f"shift must be an integer torch.Tensor of shape ({batch}, 2), got {type(shift).__name__}")
    if shift.dtype.is_floating_point or shift.dtype.is_complex or shift.dtype == torch.bool:
        raise ValueError(f"shift must be an integer tensor, got dtype {shift.dtype}")
    if tuple(shift.shape) != (batch, 2):
        raise ValueError(f"shift must have shape ({batch}, 2) of (dy, dx), got {tuple(shift.shape)}")
    if shift.device != device:
        raise ValueError(f"shift must be on {device} like the features, got {shift.device}")
    return shift


def check_feature_pair(student, target, student_name: str, target_name: str, same_shape: bool) -> None:
    check_tensor(student_name, student, ndim=4)
    check_tensor(target_name, target, ndim=4)
    if student.shape[0] != target.shape[0] or student.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"{student_name} (B, H, W, C) and {target_name} must share B and C, got "
            f"{tuple(student.shape)} and {tuple(target.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError(f"{student_name} and {target_name} need C >= 1 channels, got shape {tuple(student.shape)}")
    if same_shape and student.shape != target.shape:
        raise ValueError(
            f"{student_name} and {target_name} must have equal shapes when shift is None, got "
            f"{tuple(student.shape)} and {tuple(target.shape)}"
        )
