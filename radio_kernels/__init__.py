"""Triton kernels for C-RADIO-style distillation, each with a plain-PyTorch reference.

Every op takes ``backend="auto" | "triton" | "torch"`` (see ``radio_kernels._backend``).
"""

from . import nn
from .angular import DispersionMeter, angular_dispersion, angular_loss
from .attention import attention
from .mesa import mesa_loss
from .shifted_mse import shifted_mse

__all__ = [
    "DispersionMeter",
    "angular_dispersion",
    "angular_loss",
    "attention",
    "mesa_loss",
    "nn",
    "shifted_mse",
]
