"""LoRA: low-rank adapters on a model's ``nn.Linear`` layers, and merging them back into plain weights.

For a Linear ``y = x W^T + b`` (W: (out, in)) LoRA of rank r adds a trainable low-rank update::

    y = x W^T + b + s * (x A^T) B^T,    A: (r, in) ~ kaiming-uniform,  B: (out, r) = 0,  s = alpha / r

so the model is unchanged at the start. ``merge_lora`` folds it in: ``W <- W + s * B @ A``.

``LoRALinear`` subclasses ``nn.Linear`` and keeps its ``weight`` / ``bias`` names, so a model's state
dict keeps every base key (checkpoints and the EMA copy line up), DAMP still finds and perturbs the
base weight (``radio.train.damp`` works on every ``nn.Linear.weight``), and the adapter adds three
keys per layer: ``lora_a``, ``lora_b`` and the buffer ``lora_scale`` (so a state dict can be merged
without knowing alpha: ``merge_lora_state_dict``). The base weight and bias are frozen.

Why not ``peft``: its LoRA layers move the base weight to ``<layer>.base_layer.weight`` and hold the
factors in ``nn.Linear`` modules, so checkpoints, the EMA copy and the trainer's exported folders would
change their keys, and DAMP (which perturbs every ``nn.Linear`` weight) would also perturb the
factors; this module keeps all of that as it is, in a hundred lines, without a new dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "merge_lora_state_dict"]


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``rank`` update scaled by ``alpha / rank`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, **factory) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.rank = rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.register_buffer("lora_scale", torch.tensor(float(alpha) / rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """Wrap ``linear``: the same (frozen) weight and bias tensors, a new adapter."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, device=w.device)
        module.weight = linear.weight
        module.bias = linear.bias
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        return module.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.lora_scale.to(x.dtype) * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + s * B @ A`` (computed in float32)."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            delta = self.lora_scale.float() * (self.lora_b.float() @ self.lora_a.float())
            out.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.lora_scale.item():.4g}"


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> list[str]:
    """Replace every ``nn.Linear`` of ``module`` whose own name (the last dotted part) is in ``targets``
    by a ``LoRALinear`` of ``rank`` / ``alpha``; return the replaced modules' names (within ``module``)."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of Linear names, got {targets!r}")
    names = [
        name
        for name, m in module.named_modules()
        if type(m) is nn.Linear and name.rpartition(".")[2] in set(targets)  # noqa: E721 - not LoRALinear
    ]
    if not names:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in {type(module).__name__}")
    for name in names:
        _set_child(module, name, LoRALinear.from_linear(module.get_submodule(name), rank, alpha))
    return names


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` in ``module`` by its merged plain ``nn.Linear`` (in place); return ``module``."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            merged = m.merged().requires_grad_(m.lora_a.requires_grad)
            _set_child(module, name, merged)
    return module


def merge_lora_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every ``<layer>.lora_a`` / ``.lora_b`` / ``.lora_scale`` folded into ``<layer>.weight``."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".lora_a")]:
        layer = key[: -len(".lora_a")]
        a, b, scale = out.pop(key), out.pop(f"{layer}.lora_b"), out.pop(f"{layer}.lora_scale")
        w = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (w.float() + scale.float() * (b.float() @ a.float())).to(w.dtype)
    return out
