"""Experiment 2: the balanced angular summary loss evens out teachers of unequal dispersion.

Two tiny teachers whose summary vectors spread very differently on the sphere (METHOD.md §4,
Eqs. 3-7; C-RADIOv4 reports SigLIP2 0.694 vs DINOv3 2.186). We set the spread explicitly: each
teacher's summaries are centred (z = y - E[y], which alone spreads them over the whole sphere, Disp
~ 2.4) and the narrow teacher gets a fixed offset along a random unit vector u::

    target_t(x) = z_t(x) + c_t * rms(z_t) * u_t           c_t = 0 (wide) or solved so Disp_t ~ target

Two students, same seed, images and budget, one summary head per teacher (CLS tokens 0 and 1),
summary losses only, differ in that loss::

    cosine:   sum_t mean_b (1 - cos(x_tb, y_tb))                     ~ Theta^2 / 2: wide teacher dominates
    balanced: sum_t mean_b Theta(x_tb, y_tb)^2 / Disp_t               radio_kernels.angular_loss,
                                                                      Disp_t from a running DispersionMeter

Reported per teacher on held-out crops: ``E[Theta^2] / Disp_t`` (the angle error relative to the
teacher's own spread: 1.0 = no better than predicting its mean direction, 0 = exact), with
Disp_t measured on the same held-out targets, plus the mean angle in degrees. ``spread`` is
max / min of these over teachers (1 = perfectly even). ``training_images`` repeats the
measurement on fresh crops of the training images (the balance of the optimisation itself,
without the generalisation gap of 3 held-out images).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from radio.model import AdaptorSpec
from radio.teachers import tiny_teacher
from radio_kernels import DispersionMeter, angular_dispersion, angular_loss

from .common import RESULTS_DIR, ImagePool, Stopwatch, cosine_adamw, tiny_student, write_json

__all__ = ["Budget", "SummaryTeacher", "run"]

LOSSES = ("cosine", "balanced")


@dataclass
class Budget:
    steps: int = 300
    batch_size: int = 16
    resolution: int = 64
    eval_crops: int = 96
    narrow_dispersion: float = 0.15  # target Disp of the "siglip2" teacher; "dinov3" stays wide
    head_hidden: int | None = None  # summary-head MLP width (None: the student's width)
    head_inner: int = 1  # residual blocks in the summary head
    lr: float = 2e-3
    seed: int = 0

    @classmethod
    def smoke(cls) -> Budget:
        return cls(steps=3, batch_size=4, eval_crops=8)


class SummaryTeacher:
    """A tiny teacher whose summaries are centred and offset to a chosen angular dispersion."""

    def __init__(self, kind: str, seed: int, calibration: torch.Tensor, dispersion: float | None):
        self.teacher = tiny_teacher(kind, seed=seed)
        y = self.teacher(calibration).summary.float()
        self.mean = y.mean(0)
        z = y - self.mean
        gen = torch.Generator().manual_seed(seed + 11)
        u = torch.randn(y.shape[1], generator=gen)
        self.direction = u / u.norm() * z.square().sum(1).mean().sqrt()
        self.offset = 0.0 if dispersion is None else self._solve_offset(z, dispersion)
        self.dispersion = float(angular_dispersion(z + self.offset * self.direction))

    def _solve_offset(self, z: torch.Tensor, target: float) -> float:
        """Bisection on c: Disp(z + c u) falls monotonically from ~2.4 (c = 0) to 0 (c -> inf)."""
        lo, hi = 0.0, 1.0
        while float(angular_dispersion(z + hi * self.direction)) > target:
            hi *= 2
            if hi > 1e6:
                raise ValueError(f"cannot reach dispersion {target}")
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if float(angular_dispersion(z + mid * self.direction)) > target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    @torch.no_grad()
    def summary(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).summary.float() - self.mean + self.offset * self.direction


def train_student(teachers: dict[str, SummaryTeacher], pool: ImagePool, budget: Budget, loss_kind: str):
    if loss_kind not in LOSSES:
        raise ValueError(f"loss_kind must be one of {LOSSES}, got {loss_kind!r}")
    specs = [
        AdaptorSpec(
            name,
            t.teacher.summary_dim,
            t.teacher.feature_dim,
            hidden_dim=budget.head_hidden,
            num_inner=budget.head_inner,
            cls_index=i,
        )
        for i, (name, t) in enumerate(teachers.items())
    ]
    student = tiny_student(specs, seed=budget.seed).train()
    optimizer, scheduler = cosine_adamw(student, budget.steps, lr=budget.lr)
    meters = {name: DispersionMeter(t.teacher.summary_dim) for name, t in teachers.items()}
    gen = torch.Generator().manual_seed(budget.seed + 7)
    cpe_gen = torch.Generator().manual_seed(budget.seed + 8)
    for _ in range(budget.steps):
        x = pool.canvases(budget.batch_size, budget.resolution, gen)
        out = student(x, generator=cpe_gen)
        loss = torch.zeros(())
        for name, teacher in teachers.items():
            y = teacher.summary(x)
            pred = out[name].summary
            if loss_kind == "cosine":
                loss = loss + (1.0 - F.cosine_similarity(pred, y, dim=-1)).mean()
            else:
                meters[name].update(y)
                loss = loss + angular_loss(pred, y, meters[name].value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return student.eval()


@torch.no_grad()
def measure(student, teachers: dict[str, SummaryTeacher], held: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per teacher: E[Theta^2] / Disp (held-out Disp), mean angle in degrees, Disp."""
    out = student(held)
    result = {}
    for name, teacher in teachers.items():
        y = teacher.summary(held)
        theta2 = float(angular_loss(out[name].summary, y, 1.0, backend="torch"))
        disp = teacher.dispersion
        cos = F.cosine_similarity(out[name].summary, y, dim=-1).clamp(-1, 1)
        result[name] = {
            "relative_error": theta2 / disp,
            "mean_angle_deg": float(torch.rad2deg(torch.acos(cos)).mean()),
            "dispersion": disp,
        }
    return result


def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    """Train with each loss, measure, write balanced_summary.json into ``out_dir``."""
    budget = budget or Budget()
    with Stopwatch() as clock:
        train_pool, held_pool = ImagePool("train"), ImagePool("heldout")
        calibration = train_pool.canvases(128, budget.resolution, torch.Generator().manual_seed(budget.seed + 3))
        teachers = {
            "siglip2": SummaryTeacher("siglip2", budget.seed, calibration, budget.narrow_dispersion),
            "dinov3": SummaryTeacher("dinov3", budget.seed + 1, calibration, None),
        }
        held = held_pool.canvases(budget.eval_crops, budget.resolution, torch.Generator().manual_seed(1234))
        # Fresh crops of the training images: the optimisation balance without the generalisation gap.
        seen = train_pool.canvases(budget.eval_crops, budget.resolution, torch.Generator().manual_seed(4321))
        measured, measured_seen = {}, {}
        for loss_kind in LOSSES:
            student = train_student(teachers, train_pool, budget, loss_kind)
            measured[loss_kind] = measure(student, teachers, held)
            measured_seen[loss_kind] = measure(student, teachers, seen)
            values = {t: round(m["relative_error"], 3) for t, m in measured[loss_kind].items()}
            log(f"balanced_summary: {loss_kind}: E[Theta^2]/Disp {values}")
    table = {k: {t: m["relative_error"] for t, m in measured[k].items()} for k in LOSSES}
    table_seen = {k: {t: m["relative_error"] for t, m in measured_seen[k].items()} for k in LOSSES}
    spread = lambda tab: {k: max(v.values()) / max(min(v.values()), 1e-12) for k, v in tab.items()}
    result = {
        **table,
        "spread": spread(table),
        "training_images": {**table_seen, "spread": spread(table_seen)},
        "mean_angle_deg": {k: {t: m["mean_angle_deg"] for t, m in measured[k].items()} for k in LOSSES},
        "dispersion": {t: teachers[t].dispersion for t in teachers},
        "metric": "E[Theta^2] / Disp on held-out crops (1 = predicting the mean direction, 0 = exact)",
        "held_out_images": held_pool.names,
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, Path(out_dir) / "balanced_summary.json")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--steps", type=int, default=Budget.steps)
    args = parser.parse_args(argv)
    result = run(args.out, Budget(steps=args.steps))
    print({k: result[k] for k in (*LOSSES, "spread", "dispersion")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
