"""``radio export``: a run's EMA weights as a ``RadioModel.from_pretrained`` folder."""

from __future__ import annotations

import os
from pathlib import Path

from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.normalize import PHISNormalizer, save_normalizers

from .checkpoint import latest_checkpoint, load_checkpoint

__all__ = ["export_run"]


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True, format: str = "radio"
) -> Path:
    """Write the latest checkpoint's EMA student (with its adaptor heads) to ``out_dir``, and each
    teacher's PHI-S transform (``radio.normalize.load_normalizers(out_dir)``).

    ``format``: "radio" (this project's folder) or "transformers" (a ``transformers.RadioModel`` folder
    plus the side file ``radio_extras.safetensors``; see ``radio.model.hf_transformers``).

    Returns the checkpoint file used.
    """
    if format not in ("radio", "transformers"):
        raise ValueError(f"format must be 'radio' or 'transformers', got {format!r}")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(
            f"run directory {str(run_dir)!r} has no checkpoints (expected {run_dir}/checkpoints/step_*.pt)"
        )
    state = load_checkpoint(path)
    model = RadioModel(
        RadioConfig.from_dict(state["model_config"]), [AdaptorSpec.from_dict(a) for a in state["adaptors"]]
    )
    model.load_state_dict(state["ema" if use_ema else "student"])
    model.save_pretrained(out_dir, format=format)
    # The adaptors were trained against PHI-S-normalised teachers: ship the fitted transforms, so that
    # load_normalizers(out_dir)[teacher].inverse(features) gives the teacher's own feature space.
    normalizers = {}
    for name, teacher_state in state["teachers"].items():
        saved = teacher_state["normalizer"]
        normalizers[name] = PHISNormalizer(saved["mean"].shape[0])
        normalizers[name].load_state_dict(saved)
    save_normalizers(out_dir, normalizers)
    return path
