"""Building blocks of a run: the student with its adaptors, AdamW, the LR schedule, the EMA update."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from radio.model import AdaptorSpec, RadioConfig, RadioModel

from .adapt import adapt_student
from .config import OptimConfig, TrainConfig
from .init_from import init_student
from .teaching import TeacherSlot

__all__ = [
    "apply_step",
    "build_optimizer",
    "build_student",
    "clip_gradients",
    "lr_factor",
    "optimizer_step",
    "skip_step",
    "update_ema",
]


def build_student(cfg: TrainConfig, slots: dict[str, TeacherSlot]) -> RadioModel:
    """``RadioConfig.preset(student.preset, **student.model)`` with one adaptor per teacher, or the
    model in ``student.init_from`` (radio.train.init_from); then ``student.freeze`` / ``student.lora``
    (radio.train.adapt).

    Teacher i's summary head reads CLS token i; teachers without a summary (or with summary
    weight 0) get no summary head, and their CLS tokens stay out of the backbone summary unless
    ``student.model.summary_idxs`` says otherwise.
    """
    if cfg.student.init_from is not None:
        model = init_student(cfg, slots)
    else:
        model = _build_fresh_student(cfg, slots)
    return adapt_student(model, cfg.student)


def _build_fresh_student(cfg: TrainConfig, slots: dict[str, TeacherSlot]) -> RadioModel:
    # The backbone summary concatenates the CLS tokens of the teachers that have a summary loss
    # (C-RADIOv4: SigLIP2 and DINOv3 -> [0, 1]); an untrained CLS token (SAM3's) never joins it.
    summary_idxs = [i for i, slot in enumerate(slots.values()) if slot.has_summary]
    overrides = {"summary_idxs": summary_idxs} if summary_idxs else {}
    config = RadioConfig.preset(cfg.student.preset, **{**overrides, **cfg.student.model})
    if len(slots) > config.num_cls_tokens:
        raise ValueError(
            f"{len(slots)} teachers need as many CLS tokens; set student.model.num_cls_tokens >= {len(slots)} "
            f"(the preset has {config.num_cls_tokens})"
        )
    adaptors = [
        AdaptorSpec(
            name=name,
            summary_dim=slot.teacher.summary_dim if slot.has_summary else None,
            feature_dim=slot.teacher.feature_dim,
            head=slot.cfg.head,
            cls_index=i,
        )
        for i, (name, slot) in enumerate(slots.items())
    ]
    return RadioModel(config, adaptors)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, position table and prefix tokens (1-d or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "pos_embed" in name or "prefix_tokens" in name
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied.

    Under FSDP2 both are sharded alike, and the lerp is per shard (after resharding any parameters a
    forward left gathered, e.g. the root's).
    """
    for m in (ema, model):
        if hasattr(m, "reshard"):  # an FSDP2 module
            m.reshard()
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def clip_gradients(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm to ``grad_clip`` (``<= 0``: no clipping); returns the norm before."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)


def apply_step(model: nn.Module, ema: nn.Module, optimizer, scheduler, ema_decay: float) -> None:
    """AdamW, zero the gradients, advance the LR, update the EMA."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    update_ema(ema, model, ema_decay)


def skip_step(optimizer, scheduler) -> None:
    """Drop this step's gradients; weights, AdamW moments and the EMA stay, the LR schedule advances."""
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def optimizer_step(model: nn.Module, ema: nn.Module, optimizer, scheduler, grad_clip: float, ema_decay: float):
    """The end of a training step without a guard: clip, AdamW, zero the gradients, advance the LR, update the EMA.

    Returns the gradient norm before clipping (``grad_clip <= 0`` disables clipping).
    """
    grad_norm = clip_gradients(model, grad_clip)
    apply_step(model, ema, optimizer, scheduler, ema_decay)
    return grad_norm
