"""Experiment 4: high-resolution targets for a low-resolution teacher: bilinear, stitched tiles, FeatSharp.

The tiny SigLIP2 teacher (64 px native, 4 x 4 tokens) is asked for 3x denser targets (192 px,
12 x 12 tokens), as C-RADIOv4 asks SigLIP2-g-384 for 1152 px. Three ways:

    bilinear   the teacher on the whole image at 64 px, features upsampled bilinearly
    tiles      the teacher on the 3 x 3 native 64-px tiles, stitched (seams after tokens 4 and 8)
    featsharp  a FeatSharp upsampler trained with ``radio featsharp train`` (budget below) on the
               training images, fusing the tiles with the upsampled global view

All numbers on held-out images (never seen by the upsampler or a student), features standardised
per channel with the teacher's statistics on training crops:

(a) consistency (relative MSE, lower = closer to what the teacher itself says):
    identity: the 12 x 12 map box-filtered to 4 x 4 vs the teacher's native output on the image;
    jitter:   a random box of the image (one tile's zoom up to the whole image, log-uniform) + flip:
              the map box-filtered over the box vs the teacher's native output on that box (the
              multi-view test of FeatUp/FeatSharp; same draws for every method).
(b) seam artefact (1 = none): the mean squared jump between neighbouring tokens across the tile
    seams over that between other neighbours (``seam_jump_ratio``), and the squared deviation from
    the (seam-free) bilinear map at the tokens beside a seam over elsewhere (``seam_deviation_ratio``).
(c) students: one tiny student per target (same seed, images, crops and steps; the student and the
    teacher see the same crop, no shifts), distilled at 192 px with an MSE loss, then the same (a) and
    (b) measured on the student's own 12 x 12 output, and its relative MSE to its own target.

``make experiments`` runs it (``run_all``); results in featsharp.json. Nothing is tuned towards a winner.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from radio.model import AdaptorSpec
from radio.teachers import tiny_teacher
from radio.teachers.featsharp import load_featsharp
from radio.teachers.featsharp.training import (
    FeatSharpTrainConfig,
    jitter,
    jittered_images,
    resample_boxes,
    teacher_views,
    train_featsharp,
)

from .common import EXTRA_HELDOUT, RESULTS_DIR, ImagePool, Stopwatch, cosine_adamw, tiny_student, write_json

__all__ = ["Budget", "METHODS", "markdown", "run", "seam_jump_ratio", "seam_deviation_ratio"]

METHODS = ("bilinear", "tiles", "featsharp")
FACTOR = 3
TEACHER = "siglip2"


@dataclass
class Budget:
    featsharp_steps: int = 300
    featsharp_batch: int = 4
    student_steps: int = 150
    batch_size: int = 8
    eval_crops: int = 48
    jitters_per_crop: int = 4
    lr: float = 2e-3
    seed: int = 0

    @classmethod
    def smoke(cls) -> Budget:
        return cls(
            featsharp_steps=2, featsharp_batch=2, student_steps=2, batch_size=2, eval_crops=4, jitters_per_crop=1
        )


# ----------------------------------------------------------------------------------------------
# measures
# ----------------------------------------------------------------------------------------------


def _seams(grid: int, factor: int) -> list[int]:
    """Indices i such that tokens i and i+1 lie in different tiles."""
    per = grid // factor
    return [k * per - 1 for k in range(1, factor)]


def seam_jump_ratio(features: torch.Tensor, factor: int) -> float:
    """Mean squared difference of neighbours across tile seams / between other neighbours (both axes)."""
    grid = features.shape[1]
    seams = set(_seams(grid, factor))
    dy = (features[:, 1:] - features[:, :-1]).square().mean((0, 2, 3))  # per row pair i|i+1
    dx = (features[:, :, 1:] - features[:, :, :-1]).square().mean((0, 1, 3))
    d = dy + dx
    at = [i for i in range(grid - 1) if i in seams]
    off = [i for i in range(grid - 1) if i not in seams]
    return float(d[at].mean() / d[off].mean())


def seam_deviation_ratio(features: torch.Tensor, reference: torch.Tensor, factor: int) -> float | None:
    """Mean squared deviation from ``reference`` on rows/columns beside a seam / elsewhere (None if ~0)."""
    grid = features.shape[1]
    beside = torch.zeros(grid, dtype=torch.bool)
    for i in _seams(grid, factor):
        beside[i] = beside[i + 1] = True
    mask = beside[:, None] | beside[None, :]
    dev = (features - reference).square().mean((0, 3))
    if float(dev.mean()) < 1e-12:
        return None
    return float(dev[mask].mean() / dev[~mask].mean())


def _upsampled(teacher, upsampler, images: torch.Tensor, std) -> dict[str, torch.Tensor]:
    """The three 12 x 12 targets (standardised) of a batch of 192-px images."""
    g, t = teacher_views(teacher, images, FACTOR)
    with torch.no_grad():
        fs = upsampler(images, g, t)
    grid = FACTOR * g.shape[1]
    bil = F.interpolate(g.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    return {"bilinear": std(bil.permute(0, 2, 3, 1)), "tiles": std(t), "featsharp": std(fs)}


@torch.no_grad()
def measure(maps_fn, teacher, held: torch.Tensor, std, budget: Budget) -> dict[str, dict]:
    """(a) and (b) for every map that ``maps_fn(images) -> {name: (B, 12, 12, C)}`` returns."""
    side = teacher.native_size
    full = held.shape[-1]
    gen = torch.Generator().manual_seed(budget.seed + 99)
    native = std(teacher(F.interpolate(held, size=(side, side), mode="bilinear", antialias=True)).features)
    maps = maps_fn(held)
    n = native.shape[1]
    whole = torch.tensor([[0, 0, full]] * len(held))
    no_flip = torch.zeros(len(held), dtype=torch.bool)
    out = {k: {"consistency_identity": 0.0, "consistency_jitter": 0.0} for k in maps}
    for k, m in maps.items():
        out[k]["consistency_identity"] = float((resample_boxes(m, whole, no_flip, full, n) - native).square().mean())
    for _ in range(budget.jitters_per_crop):
        boxes, flips = jitter(len(held), full, side, gen)
        target = std(teacher(jittered_images(held, boxes, flips, side)).features)
        for k, m in maps.items():
            err = (resample_boxes(m, boxes, flips, full, n) - target).square().mean()
            out[k]["consistency_jitter"] += float(err) / budget.jitters_per_crop
    reference = maps.get("bilinear")
    for k, m in maps.items():
        out[k]["seam_jump_ratio"] = seam_jump_ratio(m, FACTOR)
        if reference is not None:
            out[k]["seam_deviation_ratio"] = seam_deviation_ratio(m, reference, FACTOR)
    return out


# ----------------------------------------------------------------------------------------------
# students
# ----------------------------------------------------------------------------------------------


def train_students(teacher, upsampler, pool: ImagePool, std, budget: Budget) -> dict:
    """One tiny student per method, identical but for its target; returns {method: student}."""
    side = FACTOR * teacher.native_size
    students, optim = {}, {}
    for m in METHODS:
        students[m] = tiny_student([AdaptorSpec(TEACHER, None, teacher.feature_dim)], seed=budget.seed)
        students[m].train()
        students[m].cpe.eval()  # no random CPE crops: the students differ only in their targets
        optim[m] = cosine_adamw(students[m], budget.student_steps, lr=budget.lr)
    gen = torch.Generator().manual_seed(budget.seed + 7)
    for _ in range(budget.student_steps):
        images = pool.canvases(budget.batch_size, side, gen)
        targets = _upsampled(teacher, upsampler, images, std)
        for m in METHODS:
            s = students[m](images, feature_fmt="NHWC")[TEACHER].features
            loss = F.mse_loss(s, targets[m])
            optimizer, scheduler = optim[m]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(students[m].parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    return {m: s.eval() for m, s in students.items()}


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------


def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    budget = budget or Budget()
    out_dir = Path(out_dir)
    torch.manual_seed(budget.seed)
    with Stopwatch() as clock, tempfile.TemporaryDirectory(prefix="radio-featsharp-") as tmp:
        teacher = tiny_teacher(TEACHER, seed=0)
        side = FACTOR * teacher.native_size
        with Stopwatch() as fs_clock:
            cfg = FeatSharpTrainConfig(
                teacher=TEACHER,
                factor=FACTOR,
                steps=budget.featsharp_steps,
                batch_size=budget.featsharp_batch,
                seed=budget.seed,
                checkpoint_every=max(1, budget.featsharp_steps),
                threads=0,  # keep the caller's setting (run_all: 1)
                out=str(Path(tmp) / "featsharp"),
            )
            train_featsharp(cfg, progress=False, log=lambda *a: None)
        upsampler = load_featsharp(cfg.out, teacher)
        train_pool = ImagePool("train", short_side=256)
        held_pool = ImagePool("heldout", short_side=256, extra=EXTRA_HELDOUT)
        calib = train_pool.canvases(32, teacher.native_size, torch.Generator().manual_seed(budget.seed + 3))
        feats = teacher(calib).features.reshape(-1, teacher.feature_dim)
        mean, scale = feats.mean(0), feats.std(0).clamp_min(1e-6)
        std = lambda x: (x.float() - mean) / scale  # noqa: E731
        held = held_pool.canvases(budget.eval_crops, side, torch.Generator().manual_seed(1234))
        targets = measure(lambda x: _upsampled(teacher, upsampler, x, std), teacher, held, std, budget)
        log(f"featsharp: targets {targets}")
        with Stopwatch() as st_clock:
            students = train_students(teacher, upsampler, train_pool, std, budget)

        def student_maps(x):
            return {m: s(x, feature_fmt="NHWC")[TEACHER].features for m, s in students.items()}

        student_scores = measure(student_maps, teacher, held, std, budget)
        # The students have no seam-free bilinear reference of their own: deviation from the bilinear target.
        held_targets = _upsampled(teacher, upsampler, held, std)
        with torch.no_grad():
            for m, f in student_maps(held).items():
                student_scores[m]["seam_deviation_ratio"] = seam_deviation_ratio(f, held_targets["bilinear"], FACTOR)
                # How far each student got towards its own target (relative MSE): how trained it is.
                student_scores[m]["error_to_own_target"] = float((f - held_targets[m]).square().mean())
        log(f"featsharp: students {student_scores}")
    result = {
        "targets": targets,
        "students": student_scores,
        "teacher": {"kind": TEACHER, "native_px": teacher.native_size, "factor": FACTOR, "target_px": side},
        "held_out_images": held_pool.names,
        "budget": asdict(budget),
        "seconds": {"total": clock.seconds, "featsharp_training": fs_clock.seconds, "students": st_clock.seconds},
    }
    write_json(result, out_dir / "featsharp.json")
    return result


def markdown(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "### FeatSharp vs stitched tiles vs bilinear (`featsharp.json`): tiny SigLIP2, 64 -> 192 px (3x)",
        "",
        "held-out images; consistency = relative MSE to the teacher's own native output (lower = better);",
        "seam ratios: 1 = no excess at the tile seams",
        "",
        "| | method | consistency (identity) | consistency (jitter) | seam jump ratio | seam deviation ratio "
        "| student error to own target |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in ("targets", "students"):
        for m in METHODS:
            r = result[group][m]
            row = [r["consistency_identity"], r["consistency_jitter"], r["seam_jump_ratio"], r["seam_deviation_ratio"]]
            row.append(r.get("error_to_own_target"))
            lines.append(f"| {group[:-1]} | {m} | " + " | ".join(f(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.out, Budget.smoke() if args.smoke else Budget())
    print(markdown(result))
    print(f"{result['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
