"""Training a FeatSharp upsampler with the multi-view consistency objective (FeatUp / FeatSharp).

One step, for a batch of images x resized to the tiled input (f * native px):
  1. the frozen teacher runs on the f x f native tiles and on the global view;
  2. the upsampler produces U = up(x), (f*n) x (f*n) tokens, in its standardised, de-biased space;
  3. jitter: per image a random square box of the tiled input (side log-uniform in [native, f*native],
     i.e. from one tile's worth of zoom to the whole image) and a random horizontal flip. The
     teacher runs natively on the jittered image t(x) (the box resized to native, flipped):
     its de-biased, standardised output is the target;
  4. the prediction applies the same jitter to U (its part inside the box, flipped) and box-filters
     it down to n x n (``resample_boxes``: each target token is the mean of U over its footprint);
  5. loss = mean squared error. The teacher's fixed-pattern noise sits at the same token of every
     native run but moves with the content under the jitter, so only the de-bias buffer (which is
     subtracted from the target too) can explain it: it learns the pattern, and the upsampler's
     output is free of it.

``train_featsharp`` writes to ``out``: checkpoints/ (resumable), metrics.jsonl, loss.png and, at the
end, featsharp.pt (``load_featsharp``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from radio.finite import NonFiniteError, check_finite

from ..base import Teacher
from ..tiling import _cut_tiles, _resize, _stitch, native_size
from .target import save_featsharp
from .upsampler import FeatSharpUpsampler

__all__ = [
    "FeatSharpTrainConfig",
    "consistency_loss",
    "jitter",
    "jittered_images",
    "TrainingImages",
    "resample_boxes",
    "sample_batch",
    "teacher_views",
    "train_featsharp",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EMA = 0.95  # smoothing of the logged loss_smoothed curve


@dataclass
class FeatSharpTrainConfig:
    """Everything ``radio featsharp train`` takes (saved in each checkpoint; a resume keeps it)."""

    teacher: str = "siglip2"  # kind: siglip2 | dinov3 (SAM3 only takes one size: no tiles to fuse)
    name_or_path: str | None = None  # None: the tiny random teacher of that kind (seed teacher_seed)
    teacher_seed: int = 0
    dtype: str = "float32"  # the teacher's compute dtype (the upsampler trains in float32)
    factor: int = 3
    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    image_dir: str | None = None  # None: the images bundled with scikit-image
    holdout: int = 3  # images kept out of training (the experiment evaluates on them)
    min_crop: float = 0.5  # base crop side / the image's short side, drawn in [min_crop, 1]
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    keep_last: int = 2
    threads: int = 1  # torch CPU threads while training (0 = torch's default); 1 is fastest for tiny teachers
    out: str = "runs/featsharp"

    def validate(self) -> None:
        if self.teacher not in ("siglip2", "dinov3"):
            raise ValueError(f"teacher must be 'siglip2' or 'dinov3' (SAM3 takes one size only), got {self.teacher!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        for name in ("factor", "steps", "batch_size", "checkpoint_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0 and self.warmup_steps >= 0):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, warmup_steps >= 0")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {self.min_crop}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


# ----------------------------------------------------------------------------------------------
# the pieces of one step (also used by the experiment)
# ----------------------------------------------------------------------------------------------


def teacher_views(teacher: Teacher, images: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global (B, n, n, C), stitched tiles (B, f*n, f*n, C)) of ``images`` (resized to f * native), one batch."""
    side = native_size(teacher)
    full = _resize(images, factor * side)
    out = teacher(torch.cat([_cut_tiles(full, factor, side), _resize(full, side)], 0))
    t = images.shape[0] * factor * factor
    return out.features[t:].float(), _stitch(out.features[:t], images.shape[0], factor).float()


def jitter(batch: int, full: int, native: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes (B, 3) = (top, left, side) in pixels of the ``full``-px tiled input, and flips (B,) bool.

    side is log-uniform in [native, full] (from one tile's zoom to the whole image), the box uniform inside.
    """
    lo, hi = math.log(native), math.log(full)
    u = torch.rand(batch, 3, generator=generator)
    side = torch.exp(lo + (hi - lo) * u[:, 0]).round().long().clamp(native, full)
    top = (u[:, 1] * (full - side + 1)).long().clamp(max=full - side)
    left = (u[:, 2] * (full - side + 1)).long().clamp(max=full - side)
    flips = torch.rand(batch, generator=generator) < 0.5
    return torch.stack([top, left, side], 1), flips


def jittered_images(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, native: int) -> torch.Tensor:
    """t(x): each image's box resized to ``native`` px (antialiased), flipped where ``flips``."""
    views = []
    for img, (top, left, side), flip in zip(images, boxes.tolist(), flips.tolist()):
        v = _resize(img[None, :, top : top + side, left : left + side], native)
        views.append(v.flip(-1) if flip else v)
    return torch.cat(views, 0)


def resample_boxes(features: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, full: int, tokens: int):
    """The same jitter on a feature map: (B, H, W, C) covering the ``full``-px input -> (B, tokens, tokens, C).

    Each output token is the mean of the feature map over its footprint (a box filter), the feature map
    taken as constant over each of its cells: nearest samples on an (m*tokens)^2 grid over the box
    (flipped where ``flips``), averaged m x m, with m = 2 * ceil(H / tokens) samples per output side,
    so that a box aligned with the cells gives their exact average.
    """
    b, h, w, c = features.shape
    m = 2 * max(1, math.ceil(h / tokens))
    boxes = boxes.to(features.device, torch.float32)
    top, left, side = boxes.unbind(1)
    scale = side / full
    theta = torch.zeros(b, 2, 3, device=features.device)
    theta[:, 0, 0] = torch.where(flips.to(features.device), -scale, scale)
    theta[:, 0, 2] = -1 + (2 * left + side) / full
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = -1 + (2 * top + side) / full
    grid = F.affine_grid(theta, (b, c, tokens * m, tokens * m), align_corners=False)
    x = F.grid_sample(features.permute(0, 3, 1, 2), grid.to(features.dtype), mode="nearest", align_corners=False)
    return F.avg_pool2d(x, m).permute(0, 2, 3, 1)


def consistency_loss(
    upsampler: FeatSharpUpsampler, teacher: Teacher, images: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The multi-view consistency loss of one batch of images (module docstring)."""
    side, f = native_size(teacher), upsampler.factor
    full = _resize(images, f * side)
    global_features, tiles = teacher_views(teacher, full, f)
    up = upsampler.upsample_standardized(full, upsampler.standardize(global_features), upsampler.standardize(tiles))
    boxes, flips = jitter(images.shape[0], f * side, side, generator)
    target = upsampler.standardize(teacher(jittered_images(full, boxes, flips, side)).features.float())
    prediction = resample_boxes(up, boxes, flips, f * side, upsampler.native_tokens)
    return F.mse_loss(prediction, target)


class TrainingImages:
    """The training images as (3, h, w) floats in [0, 1], downscaled (antialiased) so that the short side
    is at most ``short_side`` (crops are resized to less than that anyway). The few bundled images are
    decoded once and kept; images of a folder are decoded when drawn (a folder may hold millions)."""

    def __init__(self, source, short_side: int):
        self.source, self.short_side = source, short_side
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        img = torch.from_numpy(np.ascontiguousarray(self.source.load(i))).permute(2, 0, 1).float() / 255.0
        short = min(img.shape[-2:])
        if short > self.short_side:
            size = (round(img.shape[-2] * self.short_side / short), round(img.shape[-1] * self.short_side / short))
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        if self.source.bundled:
            self._cache[i] = img
        return img


def sample_batch(images, batch: int, side: int, min_crop: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, side, side) in [0, 1]: random images of ``images`` (indexable (3, h, w) tensors), random square crops
    (side in [min_crop, 1] x the short side), resized."""
    out = []
    idx = torch.randint(len(images), (batch,), generator=generator).tolist()
    u = torch.rand(batch, 3, generator=generator).tolist()
    for i, (us, uy, ux) in zip(idx, u):
        img = images[i]
        short = min(img.shape[-2:])
        crop = max(1, round(short * (min_crop + (1 - min_crop) * us)))
        top = int(uy * (img.shape[-2] - crop + 1))
        left = int(ux * (img.shape[-1] - crop + 1))
        out.append(_resize(img[None, :, top : top + crop, left : left + crop], side))
    return torch.cat(out, 0)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def _lr(cfg: FeatSharpTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_teacher(cfg: FeatSharpTrainConfig) -> Teacher:
    from ..loading import load_teacher, tiny_teacher

    if cfg.name_or_path is None:
        return tiny_teacher(cfg.teacher, seed=cfg.teacher_seed, dtype=_DTYPES[cfg.dtype])
    return load_teacher(cfg.teacher, cfg.name_or_path, dtype=_DTYPES[cfg.dtype])


def train_featsharp(
    cfg: FeatSharpTrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log=print,
    steps: int | None = None,
) -> dict:
    """Train (or, ``resume=True``, continue) an upsampler in ``cfg.out``; returns {"out", "step", "loss", "file"}.

    ``stop_after``: end after that step with a checkpoint, as an interruption would (no featsharp.pt).
    A resume takes the run's saved config (only ``cfg.out`` is used), with ``steps`` as the new total
    when given (a run can be extended) and the run's own otherwise.
    """
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _train_featsharp(cfg, resume, stop_after, progress, log, steps)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as we found it


def _train_featsharp(cfg: FeatSharpTrainConfig, resume: bool, stop_after, progress: bool, log, steps) -> dict:
    from radio.train.checkpoint import list_checkpoints, load_latest_good, save_checkpoint
    from radio.train.data import ImageSource, split_holdout
    from radio.train.plots import plot_losses

    cfg.validate()
    out = Path(cfg.out)
    state = None
    if resume:
        if not list_checkpoints(out):
            raise ValueError(f"--resume: {str(out)!r} holds no FeatSharp checkpoint")
        # The newest checkpoint that verifies and loads (newer broken ones are reported and skipped).
        _, state = load_latest_good(out, log=log)
        # The folder may have moved since: it is where the caller says.
        cfg = FeatSharpTrainConfig(
            **(state["config"] | {"out": str(out)} | ({} if steps is None else {"steps": steps}))
        )
        cfg.validate()
        if cfg.steps < state["step"]:
            raise ValueError(f"steps={cfg.steps} is below the step {state['step']} the run has reached")
    elif list_checkpoints(out):
        raise ValueError(f"{str(out)!r} already holds a FeatSharp run: pass --resume, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        "cuda" if cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")

    teacher = build_teacher(cfg).to(device)
    side = native_size(teacher)
    if side % teacher.patch_size:
        raise ValueError(f"teacher {teacher.name}: native size {side} is not a multiple of its patch")
    torch.manual_seed(cfg.seed)
    upsampler = FeatSharpUpsampler(teacher.feature_dim, side // teacher.patch_size, cfg.factor).to(device)
    optimizer = torch.optim.AdamW(upsampler.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    source, _ = split_holdout(ImageSource.from_config(cfg.image_dir), cfg.holdout)
    train_images = TrainingImages(source, math.ceil(cfg.factor * side / cfg.min_crop))
    metrics = out / "metrics.jsonl"
    start = 0
    if state is not None:
        upsampler.load_state_dict(state["upsampler"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, loss_ema = state["step"], state.get("loss_ema", 0.0)
        # Drop records logged after the checkpoint (the run died after writing them).
        lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
        metrics.write_text("".join(ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start))
    else:
        loss_ema = 0.0
        metrics.write_text("")
        (out / "featsharp_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="featsharp", unit="step")
    loss_value = float("nan")
    upsampler.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        images = sample_batch(train_images, cfg.batch_size, cfg.factor * side, cfg.min_crop, generator).to(device)
        if step == 0:  # standardise the teacher's features with the statistics of the first batch
            g, t = teacher_views(teacher, images, cfg.factor)
            upsampler.fit_normalization(torch.cat([g.flatten(0, 2), t.flatten(0, 2)]))
        lr = _lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = consistency_loss(upsampler, teacher, images, generator)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"featsharp: non-finite loss at step {step + 1}; the step was not applied")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        # The loss of one batch of random zooms is noisy: log a smoothed curve too (bias-corrected EMA).
        loss_ema = _EMA * loss_ema + (1 - _EMA) * loss_value
        record = {"step": step + 1, "loss": loss_value, "loss_smoothed": loss_ema / (1 - _EMA ** (step + 1))}
        with open(metrics, "a") as f:
            f.write(json.dumps(record | {"lr": lr, "time": time.perf_counter() - t0}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == end:
            blob = {
                "config": asdict(cfg),
                "step": done,
                "upsampler": upsampler.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "loss_ema": loss_ema,
            }
            check_finite(blob["upsampler"], f"the FeatSharp checkpoint of step {done}")
            save_checkpoint(out, done, blob, cfg.keep_last)
    bar.close()
    plot_losses(metrics, out / "loss.png", title=f"radio featsharp train: {teacher.name}, factor {cfg.factor}")
    result = {"out": str(out), "step": max(start, end), "loss": loss_value, "file": None}
    if end >= cfg.steps:
        upsampler.eval()
        result["file"] = str(save_featsharp(upsampler, teacher, out, train_config=asdict(cfg)))
        log(f"wrote {result['file']} (factor {cfg.factor}, teacher {teacher.name}); loss curve: {out / 'loss.png'}")
    else:
        log(f"stopped after step {end}; continue with --resume --out {out}")
    return result
