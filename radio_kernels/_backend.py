"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

``backend="auto"`` picks Triton for CUDA tensors and the reference otherwise; the environment
variable ``RADIO_KERNELS_BACKEND`` (``triton`` or ``torch``) overrides ``auto``. ``"triton"`` on
CPU tensors runs the kernel under the Triton interpreter, which must have been switched on with
``TRITON_INTERPRET=1`` before the kernels were imported.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RADIO_KERNELS_BACKEND"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override and override != "auto":
            if override not in ("triton", "torch"):
                raise ValueError(f"{ENV_VAR} must be 'triton', 'torch' or 'auto', got {override!r}")
            backend = override
        else:
            backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device.type!r}; set TRITON_INTERPRET=1 "
            "before importing radio_kernels to run the kernels on CPU, or use backend='torch'"
        )
    return backend


def device_guard(device: torch.device):
    """Make ``device`` current while kernels launch: Triton launches on the current CUDA device (and
    the attention tile table is chosen from it), which need not be the tensors' one (cuda:1 inputs
    while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
