"""Helpers of the recipe experiments: train the tiny default with the real trainer, load the result,
and measure fidelity on held-out crops (radio.train.fidelity), optionally windowed or corrupted."""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from radio.train import TrainConfig, train
from radio.train.build import build_student
from radio.train.checkpoint import latest_checkpoint, load_checkpoint
from radio.train.data import STUDENT, ImageSource, split_holdout
from radio.train.fidelity import fidelity_batches, measure_fidelity
from radio.train.teaching import build_teachers, plan_for

__all__ = ["CORRUPTIONS", "corrupt", "fidelity", "heldout_batches", "load_trained", "train_tiny"]

CORRUPTIONS = ("clean", "noise", "blur", "jpeg")


def train_tiny(out: Path, steps: int, seed: int, batch_size: int = 8, **sections) -> TrainConfig:
    """Train the tiny default (single process, no workers, no end-of-run fidelity) into ``out``.

    ``sections``: {"student.vitdet_train": {...}, "damp": {...}} fields set on the config.
    """
    cfg = TrainConfig()
    cfg.run.steps, cfg.run.seed, cfg.run.out, cfg.run.device = steps, seed, str(out), "cpu"
    cfg.run.checkpoint_every, cfg.run.keep_last = steps, 1
    cfg.data.batch_size, cfg.data.num_workers = batch_size, 0
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 4, 1))
    cfg.fidelity.enabled = False
    for path, values in sections.items():
        target = cfg
        for part in path.split("."):
            target = getattr(target, part)
        for key, value in values.items():
            setattr(target, key, value)
    cfg.validate()
    result = train(cfg, progress=False, log=lambda *a: None)
    cfg.run.out = result["run_dir"]
    return cfg


def load_trained(cfg: TrainConfig, run_dir: str | Path | None = None) -> tuple[dict, dict]:
    """({"after": student, "ema": EMA}, teacher slots with the run's PHI-S / dispersion state) of the run
    in ``run_dir`` (default ``cfg.run.out``)."""
    state = load_checkpoint(latest_checkpoint(Path(run_dir or cfg.run.out)), map_location="cpu")
    slots = build_teachers(cfg, torch.device("cpu"))
    for name, slot in slots.items():
        slot.load_state(state["teachers"][name])
    after = build_student(cfg, slots)
    after.load_state_dict(state["student"])
    ema = copy.deepcopy(after)
    ema.load_state_dict(state["ema"])
    return {"after": after, "ema": ema}, slots


def heldout_batches(cfg: TrainConfig, slots: dict, patch: int, resolution: int, crops_per_image: int):
    """(plans, batches): fixed unshifted held-out crops at ``resolution`` (low-partition views)."""
    _, held = split_holdout(ImageSource.from_config(cfg.data.image_dir), cfg.data.holdout)
    plans = {n: plan_for(s.teacher, s.cfg, resolution, patch, high=False) for n, s in slots.items()}
    batches = fidelity_batches(
        held, plans, resolution, patch, crops_per_image, cfg.fidelity.seed, cfg.data.crop_scale, cfg.data.min_image_side
    )
    return plans, batches


def corrupt(views: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """uint8 (B, 3, s, s) views corrupted: "noise" (Gaussian, std 0.25), "blur" (Gaussian, radius 3 px),
    "jpeg" (quality 5), or "clean" (unchanged)."""
    if kind == "clean":
        return views
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        x = views.float() / 255.0 + 0.25 * torch.randn(views.shape, generator=gen)
        return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    out = []
    for v in views:
        image = Image.fromarray(v.permute(1, 2, 0).numpy())
        if kind == "blur":
            image = image.filter(ImageFilter.GaussianBlur(radius=3))
        elif kind == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=5)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        else:
            raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(out)


def fidelity(models, slots, plans, batches, window=None, corruption: str = "clean") -> dict:
    """{model: {teacher: {"spatial", "summary"}}}; the student's view corrupted, the teachers' clean."""
    if corruption != "clean":
        batches = [
            dataclasses.replace(b, views={**b.views, STUDENT: corrupt(b.views[STUDENT], corruption, seed=i)})
            for i, b in enumerate(batches)
        ]
    return measure_fidelity(models, slots, plans, batches, torch.device("cpu"), window=window)
