"""Judging a kernel's output against float64 truth, FlashAttention style.

A low-precision result is not held to a fixed tolerance but to what the *same* precision can
achieve: the reference op run on the same inputs in that precision sets the error budget::

    max |out - ref64| <= 2 * max |ref_lowprec - ref64| + atol

``atol`` defaults to a few units in the last place of ``out``'s dtype at the largest |ref64|
plus an absolute ``floor`` (so float32 results that match to rounding pass, and an all-zero
reference accepts rounding noise such as 1e-19 but not a real error).
"""

from __future__ import annotations

import torch

# Unit roundoff per dtype (float32 math is used for low-precision storage types).
EPS = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def error_budget(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowprec: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    ulps: float = 4.0,
    floor: float = 1e-12,
    math_ulps: float = 0.0,
) -> tuple[float, float]:
    """(max |out - ref64|, allowed error) as Python floats.

    ``ulps`` are in units of the output dtype's epsilon; ``math_ulps`` add slack in float32 epsilons
    for ill-conditioned float32 math (the kernels compute in float32 whatever the storage dtype), so
    that such slack does not grow with a low-precision output dtype.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: out {tuple(out.shape)} vs reference {tuple(ref64.shape)}")
    ref64 = ref64.detach().double()
    err = (out.detach().double() - ref64).abs().max().item() if out.numel() else 0.0
    if atol is None:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        atol = (ulps * EPS[out.dtype] + math_ulps * EPS[torch.float32]) * scale + floor
    allowed = atol
    if ref_lowprec is not None:
        base = (ref_lowprec.detach().double() - ref64).abs().max().item() if ref64.numel() else 0.0
        allowed += 2.0 * base
    return err, allowed


def assert_close_to_reference(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowprec: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    ulps: float = 4.0,
    floor: float = 1e-12,
    math_ulps: float = 0.0,
    what: str = "output",
) -> None:
    """Assert max|out - ref64| <= 2 max|ref_lowprec - ref64| + atol, and that out is finite."""
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the result")
    err, allowed = error_budget(out, ref64, ref_lowprec, atol=atol, ulps=ulps, floor=floor, math_ulps=math_ulps)
    if not err <= allowed:
        raise AssertionError(f"{what}: max abs error {err:.3e} exceeds the budget {allowed:.3e}")
