"""SigLIP2 teachers: fixed-resolution (``SiglipVisionModel``) and NaFlex (``Siglip2VisionModel``).

summary = the attention-pooling head output (``pooler_output``); features = the patch tokens
after the final LayerNorm, reshaped to the (h, w) grid.
"""

from __future__ import annotations

import math

import torch
from transformers import SiglipVisionModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel

from .base import Teacher, TeacherOutput

__all__ = ["SiglipTeacher", "Siglip2NaFlexTeacher", "SIGLIP_MEAN", "SIGLIP_STD", "naflex_inputs"]

# SigLIP / SigLIP2 image processors normalise to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _side(value) -> int:
    """Config sizes may be an int or a (h, w) pair; teachers here are square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value} is not supported")
        return int(value[0])
    return int(value)


def _pooled(output, use_head: bool) -> torch.Tensor | None:
    return output.pooler_output if use_head else None


def _uses_head(config) -> bool:
    """Whether the vision model has its attention-pool head (older transformers configs may not
    store ``vision_use_head``; their models then default to a head, as this does)."""
    return getattr(config, "vision_use_head", True)


class SiglipTeacher(Teacher):
    """Fixed-resolution SigLIP/SigLIP2 (e.g. ``google/siglip2-giant-opt-patch16-384``).

    Any input size that is a multiple of the patch is accepted; off-native sizes use bicubic
    position-embedding interpolation (``interpolate_pos_encoding=True``).
    """

    def __init__(self, model: SiglipVisionModel, *, name: str, mean, std, dtype=torch.float32):
        cfg = model.config
        super().__init__(
            name=name,
            patch_size=_side(cfg.patch_size),
            feature_dim=cfg.hidden_size,
            summary_dim=cfg.hidden_size if _uses_head(cfg) else None,
            mean=mean,
            std=std,
            fixed_size=None,
            native_size=_side(cfg.image_size),
            dtype=dtype,
        )
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        b, _, h, w = pixels.shape
        off_native = (h, w) != (self.native_size, self.native_size)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=off_native)
        gh, gw = self.grid(h, w)
        features = out.last_hidden_state.reshape(b, gh, gw, -1)
        return TeacherOutput(_pooled(out, _uses_head(self.model.config)), features)


def naflex_inputs(pixels: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Patchify a (B, 3, H, W) batch into NaFlex model inputs, no processor needed.

    pixel_values: (B, N, p*p*3) with patches in raster order and each patch flattened as
    (row, col, channel), the layout ``Siglip2ImageProcessor`` produces; every patch is valid
    (all images in a batch share one size), so the attention mask is all ones and
    spatial_shapes = (H/p, W/p) for each image.
    """
    b, c, h, w = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(b, gh * gw, patch_size * patch_size * c),
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=pixels.device),
        "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixels.device),
    }


class Siglip2NaFlexTeacher(Teacher):
    """NaFlex SigLIP2 (``Siglip2VisionModel``): native aspect ratio, resized position table.

    native_size = sqrt(num_patches) * patch, the square the position table was trained for.
    """

    def __init__(self, model: Siglip2VisionModel, *, name: str, mean, std, dtype=torch.float32):
        cfg = model.config
        p = _side(cfg.patch_size)
        super().__init__(
            name=name,
            patch_size=p,
            feature_dim=cfg.hidden_size,
            summary_dim=cfg.hidden_size if _uses_head(cfg) else None,
            mean=mean,
            std=std,
            fixed_size=None,
            native_size=math.isqrt(cfg.num_patches) * p,
            dtype=dtype,
        )
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        b, _, h, w = pixels.shape
        out = self.model(**naflex_inputs(pixels, self.patch_size))
        gh, gw = self.grid(h, w)
        features = out.last_hidden_state.reshape(b, gh, gw, -1)
        return TeacherOutput(_pooled(out, _uses_head(self.model.config)), features)
