"""DINOv3 ViT teacher (``DINOv3ViTModel``): summary = CLS, features = patch tokens (registers dropped)."""

from __future__ import annotations

import torch
from transformers import DINOv3ViTModel

from .base import Teacher, TeacherOutput
from .siglip2 import _side

__all__ = ["DINOv3Teacher", "IMAGENET_MEAN", "IMAGENET_STD"]

# DINOv3ViTImageProcessor default normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv3Teacher(Teacher):
    """Token layout of the final (normed) hidden state: [CLS, registers..., patches...]; RoPE, any size."""

    def __init__(self, model: DINOv3ViTModel, *, name: str, mean, std, dtype=torch.float32):
        cfg = model.config
        super().__init__(
            name=name,
            patch_size=_side(cfg.patch_size),
            feature_dim=cfg.hidden_size,
            summary_dim=cfg.hidden_size,
            mean=mean,
            std=std,
            fixed_size=None,
            native_size=_side(cfg.image_size),
            dtype=dtype,
        )
        self.num_prefix_tokens = 1 + cfg.num_register_tokens
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        b, _, h, w = pixels.shape
        tokens = self.model(pixel_values=pixels).last_hidden_state
        gh, gw = self.grid(h, w)
        features = tokens[:, self.num_prefix_tokens :].reshape(b, gh, gw, -1)
        return TeacherOutput(tokens[:, 0], features)
