"""The losses of one micro-batch (METHOD.md §4), every one through ``radio_kernels``.

For each teacher t (views planned by radio.train.align)::

    y_t       = PHI-S_t(teacher_t(view_t))                       running normaliser, updated first
    spatial_t = shifted_mse(F_{S->t}(adaptor_t features), y_t, shift_t)     Eq. 1
    summary_t = angular_loss(adaptor_t summary, teacher_t summary, Disp_t)  Eqs. 3-7 (if it has one)
    mesa      = mesa_loss(student backbone features, EMA backbone features on its own crop, shift_ema)
    loss      = sum_t (w_spatial_t spatial_t + w_summary_t summary_t) + w_mesa mesa

CPE randomness: the student's table crop and position dropout come from ``batch.cpe_uniforms``, drawn
per sample by the data pipeline from the sample's own seed, so they do not depend on the rank, the
micro-batch or the resume point (in eval-mode CPE, ``student.cpe_augmentation = false``, they are
ignored). The EMA copy runs in eval mode, hence with the deterministic inference CPE: it is the
MESA target, and what makes its fixed pattern unknowable to the student is its own shifted crop
(METHOD.md §4), not a random table crop.

Data parallel: a rank's spatial/MESA loss is a mean over its own overlap cells; it is weighted by
``local |Omega| / global |Omega|`` so that the sum over ranks is the mean over the global batch
(see radio.train.distributed); a summary loss (a mean over local samples) by ``local B / global B``.
With ``data.partition_mode = "rank"`` the "global" totals are those of the rank's partition group
(``group`` of ``num_groups``) and every term is scaled by the partition's ``weight``
(radio.train.partitions). ``contributions`` are these per-rank shares: summed over ranks they
give the logged (global) values; the returned ``objective`` is ``world_size * sum(weights *
contributions)``, whose DDP-averaged gradient is the gradient of the global loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from radio_kernels import angular_loss, mesa_loss, shifted_mse

from .align import ViewPlan, overlap_count, teacher_shift, to_teacher_grid
from .damp import damp_forward
from .data import STUDENT, Batch
from .distributed import all_reduce_sum
from .teaching import TeacherSlot, run_teacher

__all__ = ["StepModels", "Target", "joint_teacher_targets", "micro_step_losses", "teacher_targets"]


@dataclass
class Target:
    """One teacher's normalised features y (B, T, T, C), summary (B, Cs) | None, shift (B, 2), and
    the features before normalisation (``raw``)."""

    features: torch.Tensor
    summary: torch.Tensor | None
    shift: torch.Tensor
    plan: ViewPlan
    raw: torch.Tensor


@dataclass
class StepModels:
    """What a micro-step runs: ``student`` (maybe DDP / compiled) and the bare ``raw`` RadioModel,
    the EMA copy, the teacher slots and the DAMP parameter names (of ``raw``)."""

    student: nn.Module
    raw: nn.Module
    ema: nn.Module
    slots: dict[str, TeacherSlot]
    damp_names: list[str]


@torch.no_grad()
def teacher_targets(
    batch: Batch,
    slots: dict[str, TeacherSlot],
    plans: dict[str, ViewPlan],
    patch: int,
    device,
    update: bool = True,
    advance: bool = True,
) -> dict[str, Target]:
    """Run every teacher on its view; update (``update=True``) and apply its PHI-S and dispersion.

    ``advance``: whether this micro-batch advances the PHI-S refresh/freeze schedule (the first
    micro-batch of each optimizer step does; the others only add statistics).
    """
    outputs = _teacher_outputs(batch, slots, plans, device)
    if update:
        _update_statistics(slots, [outputs], advance)
    return _targets(batch, slots, plans, outputs, patch, device)


@torch.no_grad()
def joint_teacher_targets(
    batches: list[Batch], slots: dict[str, TeacherSlot], plans: list[dict[str, ViewPlan]], patch: int, device, advance
) -> list[dict[str, Target]]:
    """``teacher_targets`` of several sub-batches that one process runs in one micro-step (partition mode
    "rank" on one process): the statistics are updated once with the rows of all of them, as ranks
    holding one sub-batch each update them once with their all-reduced rows."""
    outputs = [_teacher_outputs(b, slots, p, device) for b, p in zip(batches, plans)]
    _update_statistics(slots, outputs, advance)
    return [_targets(b, slots, p, o, patch, device) for b, p, o in zip(batches, plans, outputs)]


def _teacher_outputs(batch: Batch, slots, plans, device) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{teacher: (features (B, T, T, C) float32, summary (B, Cs) float32 | None)} before normalisation."""
    outputs = {}
    for name, slot in slots.items():
        out = run_teacher(slot.teacher, batch.images(name, device), plans[name], slot.upsampler)
        summary = out.summary.float() if (slot.has_summary and out.summary is not None) else None
        outputs[name] = (out.features.float(), summary)
    return outputs


def _update_statistics(slots, outputs: list[dict], advance: bool) -> None:
    """PHI-S and dispersion statistics, once per teacher, from the rows of every sub-batch in ``outputs``."""
    for name, slot in slots.items():
        rows = [o[name][0].reshape(-1, o[name][0].shape[-1]) for o in outputs]
        slot.normalizer.update(rows[0] if len(rows) == 1 else torch.cat(rows), advance=advance)
        summaries = [o[name][1] for o in outputs if o[name][1] is not None]
        if summaries:
            slot.dispersion.update(summaries[0] if len(summaries) == 1 else torch.cat(summaries))


def _targets(batch: Batch, slots, plans, outputs, patch: int, device) -> dict[str, Target]:
    targets = {}
    student_origin = batch.origins[STUDENT]
    for name, slot in slots.items():
        plan = plans[name]
        features, summary = outputs[name]
        if slot.normalizer.fitted:
            y = slot.normalizer(features)
        else:  # every row so far was NaN / Inf: no transform yet, and the guard reports this teacher
            y = torch.full_like(features, float("nan"))
        shift = teacher_shift(student_origin, batch.origins[name], patch)
        if plan.follows_student:
            shift = torch.zeros_like(shift)
        targets[name] = Target(y, summary, shift.to(device), plan, features)
    return targets


def micro_step_losses(
    batch: Batch,
    models: StepModels,
    plans: dict[str, ViewPlan],
    *,
    mesa_weight: float,
    backend: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    sigma: float,
    damp_generator: torch.Generator | None,
    world_size: int = 1,
    first_micro: bool = True,
    rank: int = 0,
    weight: float = 1.0,
    group: int = 0,
    num_groups: int = 1,
    targets: dict[str, Target] | None = None,
    timer=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objective to backward, {metric name: this rank's detached contribution}) for one micro-batch.

    ``first_micro``: the first micro-batch of its optimizer step (advances the PHI-S schedule).
    ``weight``, ``group``, ``num_groups``: the sub-batch's weight in the objective and the rank group
    whose totals normalise its shares (radio.train.partitions; 1, 0, 1 = one batch over all ranks).
    ``targets``: precomputed ``teacher_targets`` (statistics already updated), else computed here.
    ``timer``: a ``radio.train.timing.StepTimer`` charged with the teachers, the student (and EMA)
    forward and the losses.
    """
    section = timer if timer is not None else (lambda name: nullcontext())
    patch = models.raw.patch_size
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    if targets is None:
        with section("teachers"):
            targets = teacher_targets(batch, models.slots, plans, patch, device, advance=first_micro)

    x_student = batch.images(STUDENT, device)
    x_ema = batch.images("ema", device)
    grid = (x_student.shape[-2] // patch, x_student.shape[-1] // patch)
    with section("student"), autocast:
        out = damp_forward(
            models.student,
            models.damp_names,
            sigma,
            damp_generator,
            x_student,
            rank=rank,  # DAMP noise is independent per rank
            owner=models.raw,  # damp_names are the bare model's
            feature_fmt="NHWC",
            cpe_uniforms=batch.cpe_uniforms.to(device, non_blocking=True),
        )
        with torch.no_grad():
            tokens, ema_grid = models.ema.forward_features(x_ema)
            ema_features = models.ema.patch_features(tokens).reshape(tokens.shape[0], *ema_grid, -1)
    with section("losses_optimizer"):
        return _losses(
            batch, models, targets, out, ema_features, grid, patch, mesa_weight, backend, device, world_size,
            weight, group, num_groups,
        )  # fmt: skip


def _losses(
    batch, models, targets, out, ema_features, grid, patch, mesa_weight, backend, device, world_size, weight, group,
    num_groups,
):  # fmt: skip
    """The loss terms of ``micro_step_losses`` from the teachers' targets and the student's outputs."""
    ema_shift = teacher_shift(batch.origins[STUDENT], batch.origins["ema"], patch).to(device)

    # Each rank's share of its group's overlap count, per spatial term (teachers, then MESA), and of
    # its group's samples (summary terms). Every rank reduces the same (num_groups, terms) table.
    local = torch.stack(
        [overlap_count(grid, t.features.shape[1:3], t.shift).sum() for t in targets.values()]
        + [overlap_count(grid, grid, ema_shift).sum(), torch.tensor(len(batch), device=ema_shift.device)]
    ).to(torch.float64)
    table = torch.zeros(num_groups, local.numel(), dtype=torch.float64, device=local.device)
    table[group] = local
    share = (local / all_reduce_sum(table)[group].clamp(min=1)).float() * weight

    contributions: dict[str, torch.Tensor] = {}
    objective = torch.zeros((), device=device)
    for k, (name, target) in enumerate(targets.items()):
        slot = models.slots[name]
        student_out = out[name]
        feats = to_teacher_grid(student_out.features, target.plan)
        spatial = shifted_mse(feats, target.features, target.shift, backend=backend) * share[k]
        if target.summary is not None:
            summary = angular_loss(student_out.summary, target.summary, slot.dispersion.value, backend=backend)
            summary = summary * share[-1]
        elif student_out.summary is not None:
            # A summary head without a target this step (e.g. a mosaic view): keep it in the graph
            # with a zero loss, so DDP sees a gradient (of zeros) for every parameter.
            summary = student_out.summary.float().sum() * 0.0
        else:
            summary = torch.zeros((), device=device)
        contributions[f"loss/{name}/spatial"] = spatial.detach()
        # For the non-finite guard's message (not logged): did this teacher's own output hold NaN / Inf?
        contributions[f"nonfinite/teacher/{name}"] = (~torch.isfinite(target.raw)).any().float()
        contributions[f"loss/{name}/summary"] = summary.detach()
        objective = objective + slot.cfg.spatial_weight * spatial + slot.cfg.summary_weight * summary
    mesa = mesa_loss(out["backbone"].features, ema_features, ema_shift, backend=backend) * share[-2]
    contributions["loss/mesa"] = mesa.detach()
    objective = objective + mesa_weight * mesa
    contributions["loss"] = objective.detach()
    return objective * world_size, contributions
