"""Common teacher interface: a frozen image encoder that returns (summary, dense feature grid)."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Teacher", "TeacherOutput", "PREPROCESSOR_FILE"]

# Written by ``save_pretrained`` next to the weights; the same file (and keys) the Hugging Face
# image processors use, so real checkpoints and our saved ones are read the same way.
PREPROCESSOR_FILE = "preprocessor_config.json"


class TeacherOutput(NamedTuple):
    """summary: (B, Cs) or None when the teacher has none; features: (B, h, w, Cf) patch grid."""

    summary: torch.Tensor | None
    features: torch.Tensor


class Teacher(nn.Module):
    """Base class of every teacher.

    Subclasses implement ``_encode(pixels) -> TeacherOutput`` on already-normalised pixels in the
    teacher's dtype. This class owns everything shared: input checks, ``(x - mean) / std``
    normalisation of [0, 1] images, dtype, eval mode and no-grad.

    Args:
        name: human-readable teacher id (checkpoint name or "tiny-<kind>").
        patch_size: token pitch in pixels; input sides must be multiples of it.
        feature_dim / summary_dim: channel counts of ``features`` / ``summary`` (None: no summary).
        mean / std: per-channel normalisation constants (3 floats each).
        fixed_size: the only input side the teacher accepts (square), or None for any size.
        native_size: the side the teacher was trained at (tiling cuts tiles of this size).
        dtype: compute dtype of the encoder.
    """

    def __init__(
        self,
        *,
        name: str,
        patch_size: int,
        feature_dim: int,
        summary_dim: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        fixed_size: int | None,
        native_size: int,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{type(self).__name__}: mean and std need 3 values each, got {mean}, {std}")
        self.name = name
        self.patch_size = int(patch_size)
        self.feature_dim = int(feature_dim)
        self.summary_dim = None if summary_dim is None else int(summary_dim)
        self.fixed_size = None if fixed_size is None else int(fixed_size)
        self.native_size = int(native_size)
        self._dtype = dtype
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.requires_grad_(False)
        self.training = False

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: that of the encoder's weights, so a later ``teacher.to(dtype)`` is honoured."""
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return self._dtype

    # Teachers are frozen: trainer.train() on a parent module must not switch on dropout etc.
    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise TypeError/ValueError unless ``images`` is a float (B, 3, H, W) batch this teacher accepts."""
        cls = type(self).__name__
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"{cls}: images must be a floating-point tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{cls}: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"{cls}: image sides must be multiples of patch_size={p}, got {h}x{w}")
        if self.fixed_size is not None and (h, w) != (self.fixed_size, self.fixed_size):
            raise ValueError(
                f"{cls}: this teacher only accepts {self.fixed_size}x{self.fixed_size} images, got {h}x{w} "
                "(use radio.teachers.mosaic_features to pack smaller views)"
            )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images: (B, 3, H, W) in [0, 1] -> TeacherOutput(summary (B, Cs) | None, features (B, h, w, Cf))."""
        self.check_images(images)
        # Built from the float tuples each call: a buffer would be rounded by teacher.to(bfloat16).
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        pixels = ((images.float() - mean) / std).to(self.dtype)
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature-grid size (h, w) for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the wrapped checkpoint plus its normalisation so ``load_teacher`` can rebuild it."""
        model = getattr(self, "model", None)
        if model is None:
            raise NotImplementedError(f"{type(self).__name__} has no Hugging Face model to save")
        os.makedirs(directory, exist_ok=True)
        model.save_pretrained(directory)
        with open(os.path.join(directory, PREPROCESSOR_FILE), "w") as f:
            json.dump({"image_mean": list(self.mean), "image_std": list(self.std)}, f, indent=2)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch_size={self.patch_size}, feature_dim={self.feature_dim}, "
            f"summary_dim={self.summary_dim}, fixed_size={self.fixed_size}, dtype={self.dtype}"
        )
