"""SAM3 vision-trunk teacher (``Sam3ViTModel``): features only, one fixed input size.

The trunk's global-attention layers use RoPE positions precomputed for ``config.image_size``,
so it only accepts that square (1008 px = 72 x 72 tokens for the released model); smaller
views go through ``radio.teachers.mosaic_features``.
"""

from __future__ import annotations

import torch
from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

from .base import Teacher, TeacherOutput
from .siglip2 import _side

__all__ = ["Sam3Teacher", "SAM3_MEAN", "SAM3_STD"]

# Sam3ImageProcessor default normalisation (IMAGENET_STANDARD_*).
SAM3_MEAN = (0.5, 0.5, 0.5)
SAM3_STD = (0.5, 0.5, 0.5)


class Sam3Teacher(Teacher):
    """features = the trunk's last hidden state as a (B, h, w, C) grid; summary is always None."""

    def __init__(self, model: Sam3ViTModel, *, name: str, mean, std, dtype=torch.float32):
        cfg = model.config
        size = _side(cfg.image_size)
        super().__init__(
            name=name,
            patch_size=_side(cfg.patch_size),
            feature_dim=cfg.hidden_size,
            summary_dim=None,
            mean=mean,
            std=std,
            fixed_size=size,
            native_size=size,
            dtype=dtype,
        )
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        b, _, h, w = pixels.shape
        gh, gw = self.grid(h, w)
        features = self.model(pixel_values=pixels).last_hidden_state.reshape(b, gh, gw, -1)
        return TeacherOutput(None, features)
