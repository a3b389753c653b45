"""``radio export``: a run's EMA weights as a ``RadioModel.from_pretrained`` folder (LoRA adapters merged)."""

from __future__ import annotations

import os
from pathlib import Path

from radio.finite import check_finite
from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.model.lora import merge_lora_state_dict
from radio.normalize import PHISNormalizer, save_normalizers

from .checkpoint import load_latest_good, read_sharded_tensors

__all__ = ["export_run"]


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    use_ema: bool = True,
    log=print,
    format: str = "radio",
) -> Path:
    """Write the latest good checkpoint's EMA student (with its adaptor heads) to ``out_dir``, and each
    teacher's PHI-S transform (``radio.normalize.load_normalizers(out_dir)``).

    ``format``: "radio" (this project's folder) or "transformers" (a ``transformers.RadioModel`` folder
    plus the side file ``radio_extras.safetensors``; see ``radio.model.hf_transformers``). Refuses
    (``radio.finite.NonFiniteError``) weights holding NaN / Inf.

    Returns the checkpoint file used.
    """
    if format not in ("radio", "transformers"):
        raise ValueError(f"format must be 'radio' or 'transformers', got {format!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {str(out_dir)!r} is an existing file; export writes a folder (give a new name)")
    # The newest checkpoint that verifies and loads; newer broken ones are reported and skipped.
    path, state = load_latest_good(run_dir, log=log)
    weights = "ema" if use_ema else "student"
    model = RadioModel(
        RadioConfig.from_dict(state["model_config"]), [AdaptorSpec.from_dict(a) for a in state["adaptors"]]
    )
    if "sharded" in state:  # a run.parallel = "fsdp" checkpoint: gather the shards in this one process
        state[weights] = read_sharded_tensors(state["sharded"], weights)
    check_finite({weights: state[weights], "teachers": state["teachers"]}, f"an export of {path}")
    # LoRA adapters (student.lora) are folded into plain weights: W + (alpha / rank) B A.
    model.load_state_dict(merge_lora_state_dict(state[weights]))
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
