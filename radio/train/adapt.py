"""Cheap adaptation of a student: ``student.freeze`` and ``student.lora`` (radio.model.lora).

- ``freeze = "backbone"``: every backbone parameter (patch embedding, position table, prefix tokens,
  blocks, final norm) stops training; the adaptor heads train.
- ``lora.rank > 0``: the backbone blocks' Linear layers named in ``lora.targets`` get LoRA adapters; their
  base weights and biases are frozen, the adapters train. With ``freeze = "none"`` the rest of the
  backbone (norms, LayerScales, embeddings, prefix tokens) still trains; with "backbone" only the
  adapters and the heads do.

Frozen parameters get ``requires_grad = False``, so the optimizer never holds them
(``radio.train.build.build_optimizer``) and they keep their values; the EMA copy, made after this,
has the same structure. ``radio export`` merges the adapters into plain weights.
"""

from __future__ import annotations

from radio.model import RadioModel
from radio.model.lora import apply_lora

from .config import StudentConfig

__all__ = ["adapt_student", "trainable_parameter_names"]


def adapt_student(model: RadioModel, cfg: StudentConfig) -> RadioModel:
    """Apply ``cfg.freeze`` and ``cfg.lora`` to ``model`` in place; return it."""
    if cfg.freeze == "backbone":
        for name, p in model.named_parameters():
            if not name.startswith("adaptors."):
                p.requires_grad_(False)
    if cfg.lora.rank > 0:
        # Only the backbone's blocks: the adaptor heads are small and train in full.
        apply_lora(model.blocks, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    return model


def trainable_parameter_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
