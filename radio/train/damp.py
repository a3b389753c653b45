"""DAMP: multiplicative Gaussian weight noise during training.

(Trinh et al., "Improving robustness to corruptions with multiplicative weight perturbations",
NeurIPS 2024.)

For every ``nn.Linear`` weight W of the student, each forward pass uses

    W~ = W * (1 + sigma * eps),    eps ~ N(0, I) drawn per step,

and the gradient reaches W through the product (dL/dW = dL/dW~ * (1 + sigma * eps)). The noise is
applied functionally (``torch.func.functional_call`` with the perturbed tensors in place of the
parameters): the stored weights are never modified, so nothing has to be restored, gradient
accumulation and DDP's gradient hooks see ordinary parameter gradients, and ``sigma = 0`` calls
the module untouched (a bitwise no-op). sigma is annealed to 0 over the run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["damp_forward", "damp_sigma", "linear_weight_names"]


def damp_sigma(sigma: float, schedule: str, step: int, total_steps: int) -> float:
    """sigma at ``step`` (0-based) of ``total_steps``: "cosine" / "linear" anneal to 0, or "constant"."""
    if sigma == 0:
        return 0.0
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "cosine":
        return sigma * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return sigma * (1.0 - t)
    if schedule == "constant":
        return sigma
    raise ValueError(f"damp schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def linear_weight_names(module: nn.Module) -> list[str]:
    """Parameter names (as ``module.named_parameters`` spells them) of every nn.Linear weight."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def damp_forward(
    module: nn.Module,
    names: list[str],
    sigma: float,
    noise_generator: torch.Generator | None,
    /,
    *args,
    **kwargs,
):
    """``module(*args, **kwargs)`` with the weights ``names`` multiplied by (1 + sigma * eps).

    The noisy weights exist only during this call, so activation checkpointing, which re-runs the
    forward during backward, would recompute with the clean weights and give wrong gradients:
    that combination is refused.
    """
    if sigma == 0:
        return module(*args, **kwargs)
    if any(getattr(m, "grad_checkpointing", False) for m in module.modules()):
        raise ValueError(
            "DAMP (damp.sigma > 0) cannot be combined with gradient checkpointing: the recomputed forward "
            "would use the clean weights; turn one of them off"
        )
    params = dict(module.named_parameters())
    noisy = {}
    for name in names:
        w = params[name]
        gen_device = noise_generator.device if noise_generator is not None else w.device
        eps = torch.randn(w.shape, generator=noise_generator, device=gen_device, dtype=torch.float32).to(w.device)
        noisy[name] = w * (1.0 + sigma * eps).to(w.dtype)
    return torch.func.functional_call(module, noisy, args, kwargs, strict=False)
