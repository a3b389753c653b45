"""Teachers as the trainer uses them: building them, planning their views, running them on a batch.

A ``TeacherSlot`` bundles what the trainer keeps per teacher: the frozen encoder, its PHI-S
normaliser (spatial targets), its running ``DispersionMeter`` (summary loss) and its loss weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radio.normalize import PHISNormalizer
from radio.teachers import Teacher, TeacherOutput, load_teacher, mosaic_features, tiled_teacher_output, tiny_teacher
from radio.teachers.generic import GENERIC_KINDS, load_generic_teacher
from radio.teachers.tiling import native_size
from radio_kernels import DispersionMeter

from .align import ViewPlan, plan_view, resolve_mode
from .config import TeacherConfig, TrainConfig
from .data import STUDENT, ViewGeometry

__all__ = ["TeacherSlot", "build_teachers", "plan_all_views", "run_teacher"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherSlot(nn.Module):
    """One teacher with its normaliser and dispersion meter (the latter two are checkpointed)."""

    def __init__(self, name: str, cfg: TeacherConfig, teacher: Teacher, loss: TrainConfig):
        super().__init__()
        self.name, self.cfg, self.teacher = name, cfg, teacher
        self.normalizer = PHISNormalizer(
            teacher.feature_dim, refresh_every=loss.loss.phis_refresh_every, freeze_after=loss.loss.phis_freeze_after
        )
        self.has_summary = teacher.summary_dim is not None and cfg.summary_weight > 0
        self.dispersion = (
            DispersionMeter(teacher.summary_dim, warmup_samples=loss.loss.dispersion_warmup_samples)
            if self.has_summary
            else None
        )

    def state(self) -> dict:
        return {
            "normalizer": self.normalizer.state_dict(),
            "dispersion": None if self.dispersion is None else self.dispersion.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        if self.dispersion is not None:
            self.dispersion.load_state_dict(state["dispersion"])


def build_teachers(cfg: TrainConfig, device: torch.device) -> dict[str, TeacherSlot]:
    """Load (``name_or_path``) or build (tiny, ``name_or_path=None``) every enabled teacher."""
    slots = {}
    for name, tcfg in cfg.enabled_teachers().items():
        dtype = _DTYPES[tcfg.dtype]
        if tcfg.kind in GENERIC_KINDS:
            summary = None if tcfg.summary == "auto" else tcfg.summary
            teacher = load_generic_teacher(
                tcfg.kind,
                tcfg.name_or_path,
                layer=tcfg.layer,
                prefix_tokens=tcfg.prefix_tokens,
                summary=summary,
                dtype=dtype,
            )
        elif tcfg.name_or_path is None:
            teacher = tiny_teacher(tcfg.kind, seed=tcfg.seed, dtype=dtype)
        else:
            # Straight onto this rank's device in its dtype, attention through SDPA by default.
            teacher = load_teacher(
                tcfg.kind, tcfg.name_or_path, dtype=dtype, device=device, attn_implementation=tcfg.attn_implementation
            )
        if tcfg.compile:
            teacher.model = torch.compile(teacher.model)
        slots[name] = TeacherSlot(name, tcfg, teacher, cfg).to(device)
    return slots


def plan_all_views(
    cfg: TrainConfig, slots: dict[str, TeacherSlot], student_patch: int, step: int
) -> tuple[dict[tuple[str, int], dict[str, ViewPlan]], dict[tuple[str, int], dict[str, ViewGeometry]]]:
    """ViewPlans per (partition, resolution) and teacher, and the matching crop geometry for the data.

    ``step``: the student's ``min_resolution_step``; every resolution must be a multiple of it.
    """
    plans, geometry = {}, {}
    for partition, resolutions in (("low", cfg.data.low_resolutions), ("high", cfg.data.high_resolutions)):
        for res in resolutions:
            if res % step:
                raise ValueError(
                    f"data.{partition}_resolutions: {res} is not a multiple of the student's min_resolution_step={step}"
                )
            plans[(partition, res)] = {
                name: plan_for(slot.teacher, slot.cfg, res, student_patch, high=partition == "high")
                for name, slot in slots.items()
            }
            geometry[(partition, res)] = {STUDENT: ViewGeometry(res), "ema": ViewGeometry(res)} | {
                name: ViewGeometry(p.crop, p.margin, p.follows_student) for name, p in plans[(partition, res)].items()
            }
    return plans, geometry


def plan_for(teacher: Teacher, cfg: TeacherConfig, resolution: int, student_patch: int, high: bool) -> ViewPlan:
    mode = resolve_mode(cfg.high_res_mode, cfg.kind, teacher.fixed_size, high)
    return plan_view(mode, resolution, student_patch, teacher.patch_size, native_size(teacher), teacher.fixed_size)


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def run_teacher(teacher: Teacher, images: torch.Tensor, plan: ViewPlan) -> TeacherOutput:
    """Teacher output for a batch of crops (B, 3, crop, crop) in [0, 1]: features (B, T, T, C) per ``plan``.

    The crop is first resized to ``plan.input_size`` (a no-op when the patches agree), so one
    teacher token covers one student patch of the canvas. Mosaic views carry no summary; a tiled view
    takes its summary from the student's region only (``plan.region``), not from its margins.
    """
    if plan.mode == "tile":
        scale = plan.input_size / plan.crop  # canvas pixels -> teacher input pixels
        box = (round(plan.margin * scale), round(plan.margin * scale), round(plan.region * scale))
        return tiled_teacher_output(teacher, _resize(images, plan.input_size), plan.tiles, summary_box=box)
    if plan.mode == "mosaic":
        feats = mosaic_features(teacher, _resize(images, plan.input_size))
        return TeacherOutput(None, torch.stack(feats))
    return teacher(_resize(images, plan.input_size))  # "plain" and "resize"
