"""``high_res_mode = "featsharp"``: a trained FeatSharp upsampler makes a teacher's high-partition target.

The view geometry is that of "tile" (radio.train.align): T = k * n teacher tokens around the
student's crop, k = ceil((R/p) / n), so both modes see the same canvas pixels and shifts. Instead of
stitching k x k raw tiles, the crop is resized to f * native (f = the upsampler's factor) and the
upsampler fuses the f x f tiles with the global view; its f*n x f*n output is box-filtered (or, when
k > f, bilinearly resampled) onto the T x T grid, so one target token still covers one student
patch. The summary is the teacher's own on the student's region, as in "tile". Low-partition views
run plain. The upsampler is frozen (it is trained beforehand with ``radio featsharp train``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F

from radio.teachers import Teacher, TeacherOutput
from radio.teachers.featsharp import (
    FEATSHARP_FILE,
    FeatSharpUpsampler,
    featsharp_teacher_output,
    load_featsharp,
    resolve_featsharp_path,
)
from radio.teachers.tiling import native_size

from .align import ViewPlan, plan_view
from .config import TeacherConfig, TrainConfig

__all__ = ["check_featsharp_files", "load_upsampler", "plan_featsharp", "run_featsharp", "train_command"]

_TINY_NATIVE = 64  # native side of the tiny siglip2 / dinov3 teachers (radio.teachers.loading)


def train_command(name: str, tcfg: TeacherConfig, cfg: TrainConfig) -> str:
    """The ``radio featsharp train`` line that writes what ``teachers.<name>.featsharp`` points to."""
    from radio.cli_featsharp import featsharp_train_command

    native = _TINY_NATIVE if tcfg.name_or_path is None else None
    if native is None and (m := re.search(r"-(\d+)(?:px)?$", tcfg.name_or_path.rstrip("/"))):
        native = int(m.group(1))  # e.g. google/siglip2-giant-opt-patch16-384
    top = max(cfg.data.high_resolutions, default=0)
    factor = str(max(1, math.ceil(top / native))) if native and top else "K"
    command = featsharp_train_command(
        tcfg.kind, tcfg.name_or_path, factor, tcfg.featsharp, dtype=tcfg.dtype, image_dir=cfg.data.image_dir
    )
    if factor == "K":
        command += "   (K = ceil(largest high resolution / the teacher's native size))"
    return command


def check_featsharp_files(cfg: TrainConfig) -> None:
    """ValueError naming the key and the command that creates the file, for every featsharp teacher
    whose upsampler is missing (checked before any teacher is loaded)."""
    for name, tcfg in cfg.enabled_teachers().items():
        if tcfg.high_res_mode != "featsharp":
            continue
        if tcfg.featsharp is None:
            raise ValueError(f"teachers.{name}.high_res_mode='featsharp' needs teachers.{name}.featsharp = DIR")
        try:
            resolve_featsharp_path(tcfg.featsharp)
        except FileNotFoundError:
            raise ValueError(
                f"teachers.{name}.featsharp = {tcfg.featsharp!r}: no FeatSharp upsampler there (expected "
                f"{tcfg.featsharp.rstrip('/')}/{FEATSHARP_FILE}). Train it first with:\n  "
                f"{train_command(name, tcfg, cfg)}\n"
                f"or use stitched tiles instead: --set teachers.{name}.high_res_mode=tile"
            ) from None


def load_upsampler(name: str, tcfg: TeacherConfig, teacher: Teacher) -> FeatSharpUpsampler | None:
    """The frozen upsampler of a featsharp teacher (None for other modes)."""
    if tcfg.high_res_mode != "featsharp":
        return None
    if teacher.fixed_size is not None:
        raise ValueError(f"teachers.{name}.high_res_mode='featsharp' needs a teacher that takes any size")
    try:
        return load_featsharp(tcfg.featsharp, teacher)
    except ValueError as err:
        raise ValueError(f"teachers.{name}.featsharp: {err}") from None


def plan_featsharp(teacher: Teacher, upsampler: FeatSharpUpsampler | None, resolution: int, student_patch: int):
    """The high-partition ``ViewPlan`` of a featsharp teacher (module docstring): "tile" geometry."""
    if upsampler is None:
        raise ValueError(f"high_res_mode='featsharp' for teacher {teacher.name}: no upsampler loaded")
    tile = plan_view("tile", resolution, student_patch, teacher.patch_size, native_size(teacher))
    return dataclasses.replace(
        tile, mode="featsharp", input_size=upsampler.factor * native_size(teacher), tiles=upsampler.factor
    )


def _to_grid(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, tokens, tokens, C): box filter when shrinking, bilinear when growing."""
    if features.shape[1:3] == (tokens, tokens):
        return features
    x = features.permute(0, 3, 1, 2)
    if tokens < features.shape[1]:
        x = F.adaptive_avg_pool2d(x, tokens)
    else:
        x = F.interpolate(x, size=(tokens, tokens), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


@torch.no_grad()
def run_featsharp(
    teacher: Teacher, upsampler: FeatSharpUpsampler, images: torch.Tensor, plan: ViewPlan
) -> TeacherOutput:
    """Teacher output for a batch of crops (B, 3, crop, crop) in [0, 1] under a featsharp ``plan``."""
    side = native_size(teacher)
    full = _resize(images, plan.input_size)
    # The summary view exactly as "tile" makes it (via the k x k tiled input), so summaries are unchanged.
    tiled_side = plan.tokens // (side // teacher.patch_size) * side
    scale = tiled_side / images.shape[-1]  # canvas pixels -> tiled-input pixels
    top, size = round(plan.margin * scale), round(plan.region * scale)
    summary_view = _resize(_resize(images, tiled_side)[..., top : top + size, top : top + size], side)
    out = featsharp_teacher_output(teacher, upsampler, full, summary_view=summary_view)
    return TeacherOutput(out.summary, _to_grid(out.features, plan.tokens))


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
