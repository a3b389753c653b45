"""Mosaics for fixed-size teachers (SAM3 only takes 1008 px = 72 x 72 tokens).

Instead of upscaling every small training view to the teacher's one input size, several views
(each a multiple of the patch) are packed side by side into the fixed canvas, the teacher runs
once on the canvases, and each view's window of the feature grid is sliced back out. With equal
views of g x g tokens on a G x G canvas this puts G // g views per row and G // g rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .base import Teacher
from .tiling import native_size

__all__ = ["Placement", "plan_mosaic", "mosaic_features"]


class Placement(NamedTuple):
    """Where a view lands, in tokens: canvas index, top row and left column of its window."""

    canvas: int
    top: int
    left: int


def plan_mosaic(grids: Sequence[tuple[int, int]], canvas_grid: int) -> list[Placement]:
    """Shelf-pack views of (rows, cols) tokens into square canvases of ``canvas_grid`` tokens per side.

    Views are placed tallest first, left to right along a shelf whose height is its first
    (tallest) view; a view that does not fit the shelf's width opens a new shelf below, one that
    does not fit the canvas's height opens a new canvas. Returns placements in input order.
    Raises ValueError for a view larger than the canvas.
    """
    if canvas_grid < 1:
        raise ValueError(f"plan_mosaic: canvas_grid must be >= 1, got {canvas_grid}")
    for i, (gh, gw) in enumerate(grids):
        if not (1 <= gh <= canvas_grid and 1 <= gw <= canvas_grid):
            raise ValueError(
                f"plan_mosaic: view {i} of {gh}x{gw} tokens does not fit a {canvas_grid}x{canvas_grid}-token canvas"
            )
    order = sorted(range(len(grids)), key=lambda i: (-grids[i][0], -grids[i][1], i))
    placements: list[Placement | None] = [None] * len(grids)
    canvas = shelf_top = shelf_height = x = 0
    for i in order:
        gh, gw = grids[i]
        if x + gw > canvas_grid:  # shelf full: open the next one below
            shelf_top, shelf_height, x = shelf_top + shelf_height, 0, 0
        if shelf_top + gh > canvas_grid:  # canvas full: open a new canvas
            canvas, shelf_top, shelf_height, x = canvas + 1, 0, 0, 0
        placements[i] = Placement(canvas, shelf_top, x)
        x += gw
        shelf_height = max(shelf_height, gh)
    return placements  # type: ignore[return-value]


def _as_views(views) -> list[torch.Tensor]:
    if isinstance(views, torch.Tensor):
        if views.ndim != 4:
            raise ValueError(f"mosaic_features: views tensor must be (B, 3, h, w), got {tuple(views.shape)}")
        return list(views.unbind(0))
    if not isinstance(views, (list, tuple)) or not views:
        raise TypeError("mosaic_features: views must be a non-empty list of (3, h, w) tensors or a (B, 3, h, w) tensor")
    return list(views)


def mosaic_features(
    teacher: Teacher, views: Sequence[torch.Tensor] | torch.Tensor, canvas_size: int | None = None
) -> list[torch.Tensor]:
    """Run ``teacher`` once on mosaics of ``views``; return each view's (h/p, w/p, C) features, in order.

    views: (3, h, w) images in [0, 1] (or a (B, 3, h, w) batch), sides multiples of the patch.
    canvas_size: canvas side in pixels; default the teacher's fixed (or native) size. Views that
    do not fit one canvas spill into further canvases, all run as one batch. Empty canvas area is
    filled with the teacher's mean colour, i.e. zeros after normalisation.
    """
    views = _as_views(views)
    p = teacher.patch_size
    side = native_size(teacher) if canvas_size is None else int(canvas_size)
    if side % p:
        raise ValueError(f"mosaic_features: canvas_size={side} is not a multiple of patch_size={p}")
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim != 3 or v.shape[0] != 3:
            desc = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"mosaic_features: view {i} must be a float (3, h, w) tensor, got {desc}")
        if v.shape[1] % p or v.shape[2] % p:
            raise ValueError(
                f"mosaic_features: view {i} is {v.shape[1]}x{v.shape[2]}, not a multiple of patch_size={p}"
            )
    grids = [(v.shape[1] // p, v.shape[2] // p) for v in views]
    placements = plan_mosaic(grids, side // p)

    ref = views[0]
    fill = torch.tensor(teacher.mean, dtype=torch.float32, device=ref.device).view(1, 3, 1, 1)
    num_canvases = 1 + max(pl.canvas for pl in placements)
    canvases = fill.expand(num_canvases, 3, side, side).clone()
    for v, pl in zip(views, placements):
        top, left = pl.top * p, pl.left * p
        canvases[pl.canvas, :, top : top + v.shape[1], left : left + v.shape[2]] = v
    features = teacher(canvases).features
    return [
        features[pl.canvas, pl.top : pl.top + gh, pl.left : pl.left + gw] for (gh, gw), pl in zip(grids, placements)
    ]
