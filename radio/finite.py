"""Nothing non-finite is saved or exported: a walk over weights and states that names the bad tensors.

``nonfinite_entries(obj)`` looks into tensors, modules, and (nested) dicts / lists / tuples of them and
returns the dotted names of floating-point tensors holding a NaN or an Inf. ``check_finite`` raises
``NonFiniteError`` naming them. Used by the trainer's checkpoints, ``radio export`` and the ONNX export.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["NonFiniteError", "check_finite", "nonfinite_entries"]


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight is NaN or Inf where it must be finite (the message says which)."""


def nonfinite_entries(obj, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in ``obj`` with any NaN / Inf (empty: all finite)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return [] if bool(torch.isfinite(obj.detach()).all()) else [prefix or "<tensor>"]
        return []
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    bad = []
    for key, value in items:
        bad += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return bad


def check_finite(obj, what: str, limit: int = 5) -> None:
    """Raise ``NonFiniteError`` when ``obj`` holds a non-finite floating-point tensor (``what``: the thing
    about to be written, for the message)."""
    bad = nonfinite_entries(obj)
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise NonFiniteError(f"refusing to write {what}: non-finite values in {', '.join(bad[:limit])}{more}")
