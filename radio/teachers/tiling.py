"""High-resolution teacher targets by tiling (the tiled half of FeatSharp, arXiv 2502.16025).

A fixed-resolution teacher (SigLIP2-g-384) degrades far from its native size. To get a k-times
denser feature map, cut the image into k x k tiles of the native size, run every tile natively
(one batched call) and stitch the tile grids into a (k*h, k*w) map. The summary comes from a
global view resized to the native size, run in the same call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Teacher, TeacherOutput

__all__ = ["native_size", "tiles_for", "tiled_features", "tiled_teacher_output"]


def native_size(teacher: Teacher) -> int:
    """The square side (pixels) a teacher was trained at: its fixed size if it has one."""
    return teacher.fixed_size if teacher.fixed_size is not None else teacher.native_size


def tiles_for(resolution: int, native: int) -> int:
    """Tiles per side so the tiled input (tiles * native) is at least ``resolution``: ceil(res / native)."""
    if resolution < 1 or native < 1:
        raise ValueError(f"tiles_for: resolution and native must be positive, got {resolution}, {native}")
    return max(1, math.ceil(resolution / native))


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-2:] == (side, side):
        return images
    # Antialiased so that downscaled views do not alias (matters for the global view).
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _check(images: torch.Tensor, tiles: int) -> None:
    if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles < 1:
        raise ValueError(f"tiles must be a positive int, got {tiles!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")


def _cut_tiles(images: torch.Tensor, tiles: int, side: int) -> torch.Tensor:
    """(B, 3, tiles*side, tiles*side) -> (B*tiles*tiles, 3, side, side), tile-row-major per image."""
    b, c = images.shape[:2]
    t = images.reshape(b, c, tiles, side, tiles, side).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b * tiles * tiles, c, side, side)


def _stitch(features: torch.Tensor, batch: int, tiles: int) -> torch.Tensor:
    """(B*tiles*tiles, h, w, C) tile grids -> (B, tiles*h, tiles*w, C)."""
    _, h, w, c = features.shape
    f = features.reshape(batch, tiles, tiles, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return f.reshape(batch, tiles * h, tiles * w, c)


def tiled_teacher_output(
    teacher: Teacher, images: torch.Tensor, tiles: int, summary_box: tuple[int, int, int] | None = None
) -> TeacherOutput:
    """TeacherOutput with tiled features (B, tiles*h, tiles*w, C) and the global-view summary.

    The image is resized to tiles * native (a no-op when it already is), cut into tiles x tiles
    native tiles; the tiles and the global view (image resized to native) run as one batch.
    ``summary_box`` = (top, left, side) in pixels of ``images``: the square the global view is taken
    from (default: the whole image), e.g. the student's own region when the tiled view is larger.
    """
    _check(images, tiles)
    side = native_size(teacher)
    b = images.shape[0]
    tile_batch = _cut_tiles(_resize(images, tiles * side), tiles, side)
    region = images
    if summary_box is not None:
        top, left, size = summary_box
        if not (
            0 <= top and 0 <= left and size > 0 and top + size <= images.shape[-2] and left + size <= images.shape[-1]
        ):
            raise ValueError(f"summary_box {summary_box} must lie inside the {tuple(images.shape[-2:])} images")
        region = images[..., top : top + size, left : left + size]
    global_view = _resize(region, side)
    out = teacher(torch.cat([tile_batch, global_view], 0))
    n = tile_batch.shape[0]
    features = _stitch(out.features[:n], b, tiles)
    summary = None if out.summary is None else out.summary[n:]
    return TeacherOutput(summary, features)


def tiled_features(teacher: Teacher, images: torch.Tensor, tiles: int) -> torch.Tensor:
    """Features only (no global view): (B, tiles*h, tiles*w, C) stitched from native-size tiles."""
    _check(images, tiles)
    side = native_size(teacher)
    out = teacher(_cut_tiles(_resize(images, tiles * side), tiles, side))
    return _stitch(out.features, images.shape[0], tiles)
