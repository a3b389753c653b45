"""Geometry of the training views and the alignment of student features with each teacher's grid.

Every view of an image is a square crop of one resampled "canvas" of that image (radio.train.data).
The student's crop has side R (its grid is R/p x R/p, p the student patch). The rule this module
enforces: **one teacher token covers exactly the canvas pixels of one student patch.** A teacher
whose patch differs (SAM3: 14) gets its crop resized by p_t / p (a crop of T student patches becomes
T * p_t teacher pixels), so its token pitch on the canvas is still p. Then the student and the
teacher grids differ only by a whole-token translation, and the spatial loss is an exact integer
shift (``radio_kernels.shifted_mse``)::

    student cell (i, j) covers canvas [o_s + p*i, o_s + p*(i+1)) x [...]
    teacher cell (u, v) covers canvas [o_t + p*u, o_t + p*(u+1)) x [...]
    same pixels  <=>  u = i + dy,  dy = (o_s - o_t) / p         (o = a view's canvas origin)

How each teacher is run (``ViewPlan.mode``):

- "plain": the teacher sees the student's crop (with its own shift), T = R/p tokens.
- "tile" (SigLIP2, high partition; FeatSharp): T = k * n tokens, n = native/p_t tokens per tile and
  k = ceil((R/p) / n) tiles per side, so the teacher's crop of T*p canvas pixels (centred on the
  student's, extending up to one tile beyond it) is cut into k x k native-size tiles. Cells the
  student does not see fall outside Omega.
- "mosaic" (fixed-size teachers, SAM3): the view (T = R/p tokens) is packed with the other views of
  the batch into the teacher's fixed canvas (radio.teachers.mosaic_features).
- "resize": the fallback for a fixed-size teacher whose canvas holds fewer tokens than the view.
  The teacher sees exactly the student's crop (no relative shift), resized to its fixed size, and
  the student features are resampled bilinearly onto the teacher's grid (``to_teacher_grid``):
  here the token pitches differ, so there is no whole-token shift to learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ViewPlan",
    "aligned_target",
    "overlap_count",
    "plan_view",
    "resolve_mode",
    "teacher_shift",
    "to_teacher_grid",
]

VIEW_MODES = ("plain", "tile", "mosaic", "resize")


@dataclass(frozen=True)
class ViewPlan:
    """How one teacher sees one resolution.

    mode: "plain" | "tile" | "mosaic" | "resize" (module docstring).
    tokens: the teacher's grid side T (tokens) for this view.
    crop: canvas pixels (side) the view covers.
    margin: canvas pixels the unshifted view extends above / left of the student's base crop.
    input_size: pixels (side) the crop is resized to before the teacher (tile: the k x k tiled input).
    tiles: tiles per side (mode "tile"), else 1.
    follows_student: the view copies the student's crop and shift ("resize"), no relative shift.
    region: canvas pixels (side) of the student's base crop inside the view, from ``margin`` on; the
        tiled teacher's summary is taken from this square, not from the whole (larger) tiled view.
    """

    mode: str
    tokens: int
    crop: int
    margin: int
    input_size: int
    tiles: int = 1
    follows_student: bool = False
    region: int = 0


def resolve_mode(configured: str, kind: str, fixed_size: int | None, high: bool) -> str:
    """The view mode of a teacher on the low (``high=False``) or high partition.

    Fixed-size teachers always mosaic (resize only when a view outgrows the canvas, see
    ``plan_view``). Otherwise the low partition is plain and the high partition follows
    ``configured``: "auto" = "tile" for SigLIP2, "plain" for the rest.
    """
    if configured not in ("auto", *VIEW_MODES):
        raise ValueError(f"high_res_mode must be 'auto' or one of {VIEW_MODES}, got {configured!r}")
    if fixed_size is not None:
        return "resize" if configured == "resize" else "mosaic"
    if not high or configured == "auto" and kind != "siglip2":
        return "plain"
    if configured == "auto":
        return "tile"
    if configured in ("mosaic", "resize"):
        raise ValueError(f"high_res_mode={configured!r} needs a fixed-size teacher")
    return configured


def plan_view(
    mode: str,
    resolution: int,
    student_patch: int,
    teacher_patch: int,
    native_size: int,
    fixed_size: int | None = None,
) -> ViewPlan:
    """The ``ViewPlan`` of a teacher (patch ``teacher_patch``) for a student crop of side ``resolution``.

    ``native_size``: the teacher's native side in pixels (tile size for "tile");
    ``fixed_size``: its one accepted side for "mosaic" / "resize".
    """
    if resolution % student_patch:
        raise ValueError(f"resolution {resolution} is not a multiple of the student patch {student_patch}")
    grid = resolution // student_patch
    if mode == "plain":
        return ViewPlan("plain", grid, resolution, 0, grid * teacher_patch)
    if mode == "tile":
        if native_size % teacher_patch:
            raise ValueError(f"tile: native size {native_size} is not a multiple of the teacher patch {teacher_patch}")
        per_tile = native_size // teacher_patch
        tiles = math.ceil(grid / per_tile)
        tokens = tiles * per_tile
        margin = (tokens - grid) // 2 * student_patch
        return ViewPlan("tile", tokens, tokens * student_patch, margin, tiles * native_size, tiles, region=resolution)
    if mode in ("mosaic", "resize"):
        if fixed_size is None or fixed_size % teacher_patch:
            raise ValueError(f"{mode}: needs a fixed size that is a multiple of the teacher patch, got {fixed_size}")
        canvas_tokens = fixed_size // teacher_patch
        if mode == "mosaic" and grid <= canvas_tokens:
            return ViewPlan("mosaic", grid, resolution, 0, grid * teacher_patch)
        return ViewPlan("resize", canvas_tokens, resolution, 0, fixed_size, follows_student=True)
    raise ValueError(f"mode must be one of {VIEW_MODES}, got {mode!r}")


def teacher_shift(student_origin: torch.Tensor, view_origin: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 2) = (dy, dx) in tokens: student cell (i, j) <-> teacher cell (i + dy, j + dx).

    Origins are (B, 2) canvas pixels (y, x) of the two crops; their difference must be a whole
    number of patches (raises ValueError otherwise: the alignment would not be exact).
    """
    delta = student_origin.long() - view_origin.long()
    if bool((delta % patch != 0).any()):
        raise ValueError(f"view origins differ by {delta.tolist()} pixels, not whole patches of {patch}")
    return torch.div(delta, patch, rounding_mode="floor")


def to_teacher_grid(features: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
    """Student adaptor features (B, h, w, C) on the teacher's grid for ``plan``.

    Same token pitch (every mode but "resize"): returned as is; the shift does the rest. "resize":
    bilinear resampling (align_corners=False, i.e. cell centres map onto cell centres) onto the
    teacher's T x T grid, which covers the same crop.
    """
    if plan.mode != "resize":
        return features
    t = plan.tokens
    if features.shape[1:3] == (t, t):
        return features
    x = features.permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(t, t), mode="bilinear", align_corners=False).to(features.dtype)
    return x.permute(0, 2, 3, 1)


def overlap_count(student_hw: tuple[int, int], target_hw: tuple[int, int], shift: torch.Tensor) -> torch.Tensor:
    """|Omega_b| per sample (B,): student cells whose shifted cell lies on the target grid."""
    (hs, ws), (ht, wt) = student_hw, target_hw
    dy, dx = shift[:, 0].long(), shift[:, 1].long()
    rows = (torch.clamp(ht - dy, max=hs) - torch.clamp(-dy, min=0)).clamp(min=0)
    cols = (torch.clamp(wt - dx, max=ws) - torch.clamp(-dx, min=0)).clamp(min=0)
    return rows * cols


def aligned_target(
    target: torch.Tensor, shift: torch.Tensor, student_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target cell each student cell is compared with, and the mask Omega.

    target (B, Ht, Wt, C), shift (B, 2) -> (B, hs, ws, C) with row (b, i, j) = target[b, i+dy, j+dx]
    (zeros off Omega) and a bool mask (B, hs, ws). What ``shifted_mse`` compares, materialised for
    tests and the fidelity measurement.
    """
    b, ht, wt, c = target.shape
    hs, ws = student_hw
    i = torch.arange(hs, device=target.device)[None, :, None] + shift[:, 0, None, None].to(target.device)
    j = torch.arange(ws, device=target.device)[None, None, :] + shift[:, 1, None, None].to(target.device)
    mask = (i >= 0) & (i < ht) & (j >= 0) & (j < wt)
    flat = (i.clamp(0, ht - 1) * wt + j.clamp(0, wt - 1)).reshape(b, hs * ws)
    out = torch.gather(target.reshape(b, ht * wt, c), 1, flat[..., None].expand(-1, -1, c))
    out = out.reshape(b, hs, ws, c) * mask[..., None].to(target.dtype)
    return out, mask
