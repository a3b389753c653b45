"""A trained FeatSharp upsampler as a teacher's high-resolution target: files and the forward pass.

A FeatSharp folder (``radio featsharp train --out DIR``) holds ``featsharp.pt``: the upsampler's
config, weights and the identity of the teacher it was trained for (checked on use), plus the
training checkpoints and the loss log.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..base import Teacher, TeacherOutput
from ..tiling import _cut_tiles, _resize, _stitch, native_size
from .upsampler import FeatSharpUpsampler

__all__ = ["FEATSHARP_FILE", "featsharp_teacher_output", "load_featsharp", "resolve_featsharp_path", "save_featsharp"]

FEATSHARP_FILE = "featsharp.pt"
_FORMAT = "radio-featsharp-1"


def _teacher_identity(teacher: Teacher) -> dict:
    return {
        "name": teacher.name,
        "feature_dim": teacher.feature_dim,
        "patch_size": teacher.patch_size,
        "native_size": native_size(teacher),
    }


def save_featsharp(upsampler: FeatSharpUpsampler, teacher: Teacher, path: str | os.PathLike, **extra) -> Path:
    """Write ``upsampler`` (config + weights + the teacher's identity) to ``path`` (a file or a folder)."""
    from radio.finite import check_finite
    from radio.train.checkpoint import atomic_save

    check_finite(upsampler, f"a FeatSharp upsampler to {str(path)!r}")
    path = Path(path)
    if path.suffix != ".pt":
        path = path / FEATSHARP_FILE
    state = {k: v.detach().cpu() for k, v in upsampler.state_dict().items()}
    blob = {"format": _FORMAT, "config": upsampler.config(), "teacher": _teacher_identity(teacher), "state": state}
    atomic_save(blob | extra, path)
    return path


def resolve_featsharp_path(path: str | os.PathLike) -> Path:
    """``path`` itself when a file, else ``path/featsharp.pt``; FileNotFoundError when absent."""
    path = Path(path)
    file = path if path.is_file() else path / FEATSHARP_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no FeatSharp upsampler at {str(file)!r}")
    return file


def load_featsharp(path: str | os.PathLike, teacher: Teacher | None = None) -> FeatSharpUpsampler:
    """Rebuild a saved upsampler (frozen, eval mode). With ``teacher``: ValueError unless it was trained for it."""
    file = resolve_featsharp_path(path)
    blob = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{str(file)!r} is not a FeatSharp upsampler file (written by `radio featsharp train`)")
    upsampler = FeatSharpUpsampler(**blob["config"])
    upsampler.load_state_dict(blob["state"])
    if teacher is not None:
        want, have = blob["teacher"], _teacher_identity(teacher)
        if want != have:
            raise ValueError(f"{str(file)!r} was trained for teacher {want}, not for {have}")
    upsampler.requires_grad_(False)
    return upsampler.eval()


def featsharp_teacher_output(
    teacher: Teacher,
    upsampler: FeatSharpUpsampler,
    images: torch.Tensor,
    summary_box: tuple[int, int, int] | None = None,
    summary_view: torch.Tensor | None = None,
) -> TeacherOutput:
    """TeacherOutput with FeatSharp features (B, f*n, f*n, C) and the teacher's global-view summary.

    images: (B, 3, H, W) in [0, 1], resized to f * native (a no-op when it already is). The f x f
    native tiles, the global view (the whole image at the native size) and, when ``summary_box``
    = (top, left, side) selects a smaller square, that square's view for the summary (as in
    ``tiled_teacher_output``) run as one teacher batch; the upsampler fuses tiles and global view.
    ``summary_view``: (B, 3, native, native) images to take the summary from instead (exclusive with
    ``summary_box``), e.g. to reproduce another mode's summary pixel for pixel.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"featsharp_teacher_output: images must be a (B, 3, H, W) tensor, got {shape}")
    side, f = native_size(teacher), upsampler.factor
    if side // teacher.patch_size != upsampler.native_tokens or teacher.feature_dim != upsampler.feature_dim:
        raise ValueError(
            f"featsharp_teacher_output: the upsampler ({upsampler.native_tokens}^2 tokens x {upsampler.feature_dim}) "
            f"does not fit teacher {teacher.name} ({side // teacher.patch_size}^2 tokens x {teacher.feature_dim})"
        )
    b = images.shape[0]
    full = _resize(images, f * side)
    views = [_cut_tiles(full, f, side), _resize(images, side)]
    box_view = summary_box is not None and tuple(summary_box) != (0, 0, images.shape[-1])
    if summary_view is not None:
        if summary_box is not None or summary_view.shape != (b, 3, side, side):
            raise ValueError(f"summary_view must be ({b}, 3, {side}, {side}) and comes without summary_box")
        views.append(summary_view.to(images.dtype))
        box_view = True
    elif box_view:
        top, left, size = summary_box
        h, w = images.shape[-2:]
        if not (0 <= top and 0 <= left and size > 0 and top + size <= h and left + size <= w):
            raise ValueError(f"summary_box {summary_box} must lie inside the {tuple(images.shape[-2:])} images")
        views.append(_resize(images[..., top : top + size, left : left + size], side))
    out = teacher(torch.cat(views, 0))
    t = b * f * f
    tiles = _stitch(out.features[:t], b, f)
    global_features = out.features[t : t + b]
    with torch.no_grad():
        features = upsampler(full, global_features.float(), tiles.float())
    summary = None
    if out.summary is not None:
        summary = out.summary[t + b :] if box_view else out.summary[t : t + b]
    return TeacherOutput(summary, features.to(out.features.dtype))
