"""Fidelity: how well the adaptors reproduce the (PHI-S normalised) teachers on held-out crops.

For each teacher t and held-out crop (no shifts; views planned as in training)::

    spatial_t = mean over cells u in Omega of cos(F_{S->t}(adaptor_t features)_u, PHI-S_t(teacher_t)_u)
    summary_t = mean over crops of cos(adaptor_t summary, teacher_t summary)      (teachers with one)

``window=(w, prefix)`` measures the models in windowed (ViTDet) inference instead, through
``RadioModel.windowed`` (grids padded to the window when needed).

Every model is measured against the same targets (the normaliser is not updated here), so the
numbers before and after training are directly comparable.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .align import ViewPlan, aligned_target, to_teacher_grid
from .data import STUDENT, Batch, ImageSource, SampleSpec, ViewDataset, ViewGeometry, collate
from .step import teacher_targets
from .teaching import TeacherSlot

__all__ = ["fidelity_batches", "measure_fidelity"]


def fidelity_batches(
    source: ImageSource,
    plans: dict[str, ViewPlan],
    resolution: int,
    patch: int,
    crops_per_image: int,
    seed: int,
    crop_scale,
    min_image_side: int,
) -> list[Batch]:
    """``crops_per_image`` fixed, unshifted crops of every held-out image, one batch per crop index."""
    geometry = {STUDENT: ViewGeometry(resolution), "ema": ViewGeometry(resolution)} | {
        name: ViewGeometry(p.crop, p.margin, p.follows_student) for name, p in plans.items()
    }
    dataset = ViewDataset(
        source,
        {("low", resolution): geometry},
        patch,
        seed,
        crop_scale,
        shift_std=0.0,
        max_shift=0,
        min_image_side=min_image_side,
    )
    return [
        collate([dataset[SampleSpec(i, resolution, "low", c, i)] for i in range(len(source))])
        for c in range(crops_per_image)
    ]


@torch.no_grad()
def measure_fidelity(
    models: dict[str, torch.nn.Module],
    slots: dict[str, TeacherSlot],
    plans: dict[str, ViewPlan],
    batches: list[Batch],
    device: torch.device,
    window: tuple[int, str] | None = None,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model label: {teacher: {"spatial": cos, "summary": cos | None}}} averaged over all crops."""
    sums = {m: {t: torch.zeros(4, dtype=torch.float64) for t in slots} for m in models}
    for model in models.values():
        model.eval()
    for batch in batches:
        patch = next(iter(models.values())).patch_size
        targets = teacher_targets(batch, slots, plans, patch, device, update=False)
        x = batch.images(STUDENT, device)
        for label, model in models.items():
            with model.windowed(*window) if window is not None else nullcontext():
                out = model(x, feature_fmt="NHWC")
            for name, target in targets.items():
                feats = to_teacher_grid(out[name].features.float(), target.plan)
                aligned, mask = aligned_target(target.features, target.shift, feats.shape[1:3])
                cos = F.cosine_similarity(feats, aligned, dim=-1)[mask]
                acc = sums[label][name]
                acc[0] += cos.double().sum().cpu()
                acc[1] += cos.numel()
                if target.summary is not None and out[name].summary is not None:
                    acc[2] += (
                        F.cosine_similarity(out[name].summary.float(), target.summary, dim=-1).double().sum().cpu()
                    )
                    acc[3] += target.summary.shape[0]
    return {
        label: {
            name: {
                "spatial": float(acc[0] / acc[1]) if acc[1] else None,
                "summary": float(acc[2] / acc[3]) if acc[3] else None,
            }
            for name, acc in per_teacher.items()
        }
        for label, per_teacher in sums.items()
    }
