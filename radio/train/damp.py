"""DAMP: multiplicative Gaussian weight noise during training.

(Trinh et al., "Improving robustness to corruptions with multiplicative weight perturbations",
NeurIPS 2024.)

For every ``nn.Linear`` weight W of the student, each forward pass uses

    W~ = W * (1 + sigma * eps),    eps ~ N(0, I) drawn per micro-batch and per rank,

and the gradient reaches W through the product (dL/dW = dL/dW~ * (1 + sigma * eps)). sigma is
annealed to 0 over the run.

How the noise is applied: ``install_damp`` gives each listed ``nn.Linear`` an instance-level
forward that runs the layer's own forward (a plain Linear's, a LoRALinear's, ...) with W~ in place
of W when a DAMP state (sigma, seed) is set on it and the module is in training mode. The stored
weights are never modified (nothing to restore; DDP, gradient accumulation and the optimizer see
ordinary parameter gradients; the state dict is unchanged), and ``sigma = 0`` runs the layer on its
untouched weights (a bitwise no-op, no random draws).

The noise is counter-based: layer k's eps comes from its own generator seeded with a mix of the
micro-batch's seed and k, drawn where the layer runs. So activation checkpointing, which re-runs a
block's forward during backward, recomputes exactly the same W~ (the state stays set until the next
micro-batch sets its own), and a resumed run replays the same noise from the saved seed stream.
Each micro-batch's seed is one draw from the trainer's DAMP generator (checkpointed) mixed with the
rank, so ranks draw independent noise, as DAMP prescribes (noise per device / sub-batch).
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

__all__ = ["damp_forward", "damp_sigma", "install_damp", "linear_weight_names", "set_damp"]

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit seed from a few integers."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _noisy_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's own forward (its class's: plain Linear, LoRALinear, ...) on W~ instead of W."""
    own_forward = type(self).forward
    state = self._damp_state
    if state is None or not self.training or self._damp_inside:
        return own_forward(self, x)
    sigma, seed = state
    w = self.weight
    gen = torch.Generator(device=w.device).manual_seed(_mix(seed, self._damp_index))
    eps = torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32)
    self._damp_inside = True  # the call below comes back here: run the class's forward then
    try:
        return torch.func.functional_call(self, {"weight": w * (1.0 + sigma * eps).to(w.dtype)}, (x,), strict=False)
    finally:
        self._damp_inside = False


def _unwrapped(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def install_damp(module: nn.Module, names: list[str]) -> list[nn.Linear]:
    """Give the ``nn.Linear`` layers owning the weights ``names`` the DAMP forward (idempotent).

    Returns those layers, in the order of ``names`` (their index k seeds their noise).
    """
    cached = module.__dict__.get("_damp_layers")
    if cached is not None and cached[0] == tuple(names):  # resolved before (e.g. before blocks were compiled)
        return cached[1]
    # torch.compile wraps modules in OptimizedModule ("_orig_mod."): names match through the wrappers.
    modules = {_unwrapped(n): m for n, m in module.named_modules()}
    layers = []
    for k, name in enumerate(names):
        owner = _unwrapped(name[: -len(".weight")] if name.endswith(".weight") else "")
        layer = modules.get(owner)
        if not isinstance(layer, nn.Linear) or not name.endswith("weight"):
            raise ValueError(f"DAMP: {name!r} is not the weight of an nn.Linear of the module")
        if getattr(layer, "_damp_index", None) is None:
            layer.forward = types.MethodType(_noisy_linear_forward, layer)
            layer._damp_state, layer._damp_inside = None, False
        layer._damp_index = k
        layers.append(layer)
    module.__dict__["_damp_layers"] = (tuple(names), layers)
    return layers


def set_damp(layers: list[nn.Linear], sigma: float, seed: int | None) -> None:
    """Noise (sigma, seed) for the next forward passes of ``layers`` (``sigma = 0`` or None seed: off)."""
    state = None if (sigma == 0 or seed is None) else (float(sigma), int(seed))
    for layer in layers:
        layer._damp_state = state


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
    rank: int = 0,
    owner: nn.Module | None = None,
    **kwargs,
):
    """``module(*args, **kwargs)`` with the weights ``names`` multiplied by (1 + sigma * eps).

    ``names`` are parameter names of ``owner`` (default: ``module``); pass the bare model as ``owner``
    when ``module`` wraps it (DDP, torch.compile): the noise lives on the Linear layers themselves.
    Draws this call's seed from ``noise_generator`` (one int64; none at ``sigma = 0``) and mixes it
    with ``rank``. The noise stays set on the layers after the call, so that a checkpointed block
    recomputed during backward sees the same W~; the next call replaces it.
    """
    layers = install_damp(module if owner is None else owner, names)
    if sigma == 0:
        set_damp(layers, 0.0, None)
        return module(*args, **kwargs)
    if noise_generator is not None and noise_generator.device.type != "cpu":
        raise ValueError(
            "damp_forward: noise_generator must be a CPU generator (its one draw per call is read on the host)"
        )
    draw = int(torch.randint(0, 2**62, (1,), generator=noise_generator))
    set_damp(layers, sigma, _mix(draw, rank))
    return module(*args, **kwargs)
