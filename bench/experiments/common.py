"""Shared pieces of the experiments: image crops, the tiny student, AdamW with a cosine schedule, output.

Images are the photographs bundled with scikit-image (no download), split into training and
held-out images with the trainer's own rule (``radio.train.data.split_holdout``), so every
"held-out" number is measured on images no student has seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.train.data import ImageSource, split_holdout

__all__ = [
    "EXTRA_HELDOUT",
    "RESULTS_DIR",
    "Stopwatch",
    "ImagePool",
    "cosine_adamw",
    "tiny_student",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "experiments"
HOLDOUT = 3  # held-out bundled images (chelsea, coffee, rocket; see radio.train.data.BUNDLED_IMAGES)
# scikit-image images outside BUNDLED_IMAGES that load offline (``cat`` is chelsea again; the right
# stereo_motorcycle view is the training "motorcycle" scene): more held-out images for an evaluation.
EXTRA_HELDOUT = ("cell", "microaneurysms", "shepp_logan_phantom")


class ImagePool:
    """The bundled images as float tensors (3, H, W) in [0, 1], short side resized to ``short_side``.

    ``canvases(n, side, generator)`` draws n random square crops (one random image each, crop side a
    uniform fraction ``crop_scale`` of the short side, position uniform), each resized to side x side.
    ``extra``: names of further scikit-image images (e.g. ``EXTRA_HELDOUT``) appended to the pool.
    """

    def __init__(
        self, split: str, short_side: int = 192, crop_scale: Sequence[float] = (0.35, 1.0), extra: Sequence[str] = ()
    ):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        train, held = split_holdout(ImageSource.from_config(None), HOLDOUT)
        source = train if split == "train" else held
        overlap = set(extra) & set(ImageSource.from_config(None).items)
        if overlap:
            raise ValueError(f"extra must name images outside the bundled training set, got {sorted(overlap)}")
        source = ImageSource([*source.items, *extra], bundled=True)
        self.names = [source.name(i) for i in range(len(source))]
        self.crop_scale = tuple(crop_scale)
        self.images = []
        for i in range(len(source)):
            x = torch.from_numpy(source.load(i)).permute(2, 0, 1).float().div(255.0)[None]
            h, w = x.shape[-2:]
            s = short_side / min(h, w)
            size = (max(short_side, round(h * s)), max(short_side, round(w * s)))
            self.images.append(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0])

    def __len__(self) -> int:
        return len(self.images)

    def canvases(self, n: int, side: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 3, side, side) random crops in [0, 1] (deterministic for the generator's state)."""
        out = []
        lo, hi = self.crop_scale
        for _ in range(n):
            image = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
            h, w = image.shape[-2:]
            frac = lo + (hi - lo) * float(torch.rand((), generator=generator))
            c = max(8, round(frac * min(h, w)))
            y = int(torch.randint(h - c + 1, (1,), generator=generator))
            x = int(torch.randint(w - c + 1, (1,), generator=generator))
            crop = image[None, :, y : y + c, x : x + c]
            out.append(F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False))
        return torch.cat(out).clamp_(0.0, 1.0)


def tiny_student(adaptors: Sequence[AdaptorSpec], seed: int, **overrides) -> RadioModel:
    """The "tiny" preset student (48 wide, 4 blocks) with ``adaptors``, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RadioModel(RadioConfig.preset("tiny", **overrides), list(adaptors))


def cosine_adamw(
    model: torch.nn.Module, steps: int, lr: float = 2e-3, warmup: int = 20, weight_decay: float = 0.02
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.99) with linear warmup then cosine decay to 5% of ``lr``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    warmup = min(warmup, max(steps // 4, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_finite(value, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"result {path} is not finite: {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}[{i}]")


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (ValueError on a NaN/inf anywhere: a broken run never looks fine)."""
    _check_finite(data, Path(path).stem)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


class Stopwatch:
    """``with Stopwatch() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
