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


# Triton decides at decoration time whether a @triton.jit kernel is interpreted: the kernels are
# defined right after this module is imported, so this is the mode they were built in.
INTERPRETER_AT_IMPORT = interpreter_enabled()


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not (for error messages)."""
    if device.type == "cuda":
        return None
    if INTERPRETER_AT_IMPORT:
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, got {device.type!r}"
    if interpreter_enabled():
        return (
            "TRITON_INTERPRET=1 was set after radio_kernels was imported, so its kernels were built for a GPU; "
            "set TRITON_INTERPRET=1 before importing radio_kernels (e.g. in the shell), or use backend='torch'"
        )
    return (
        f"backend='triton' needs CUDA tensors, got tensors on {device.type!r}; set TRITON_INTERPRET=1 "
        "before importing radio_kernels to run the kernels on CPU, or use backend='torch'"
    )


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
    if backend == "triton" and (reason := triton_unavailable_reason(device)):
        raise ValueError(reason)
    return backend


def device_guard(device: torch.device):
    """Make ``device`` current while kernels launch: Triton launches on the current CUDA device (and
    the attention tile table is chosen from it), which need not be the tensors' one (cuda:1 inputs
    while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
