"""Input side of the student: pixel normalisation and the linear patch embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI-CLIP statistics, the normalisation every RADIO model applies to [0, 1] RGB input.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class InputNormalizer(nn.Module):
    """``(x - mean) / std`` per RGB channel; mean and std are (3, 1, 1) buffers saved with the model."""

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each flattened as (channel, row, col) and mapped by
    ``Linear(3*p*p -> D)`` without bias. (B, 3, H, W) -> (B, (H/p)*(W/p), D) in raster order."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size * patch_size, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        # unfold yields (B, C*p*p, L) with the (c, row, col) flattening order that matches the weight layout.
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
        return self.proj(patches)


class FeatureNormalizer(nn.Module):
    """Fixed affine whitening of output patch tokens, ``y = (x - mean) @ tx^T`` (buffers ``mean`` (D,), ``tx`` (D, D)).

    Official RADIO checkpoints may store one (``_feature_normalizer``); it is applied to the patch tokens
    only, before the features and the adaptor feature heads; summaries (backbone and adaptor summary
    heads) read the un-normalised CLS tokens. Identity until loaded.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("tx", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) @ self.tx.to(x.dtype).T


class IntermediateNormalizer(nn.Module):
    """Fixed per-block whitening of intermediate patch tokens (official checkpoints' ``inter_feature_normalizer``).

    For block ``l``: ``y = alpha_l * (x - mean_l) @ R_l^T`` with buffers ``means`` (L, D), ``alphas`` (L,)
    and ``rotation`` (D, D) shared by all blocks, or (L, D, D) per block. It brings every block's output
    to a comparable scale for dense probes; prefix tokens are left as they are. Identity until loaded.
    """

    def __init__(self, depth: int, dim: int, per_block_rotation: bool = False) -> None:
        super().__init__()
        rotation = torch.eye(dim)
        if per_block_rotation:
            rotation = rotation.expand(depth, dim, dim).clone()
        self.register_buffer("means", torch.zeros(depth, dim))
        self.register_buffer("alphas", torch.ones(depth))
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x (B, N, D): block ``block``'s patch tokens."""
        rotation = self.rotation if self.rotation.ndim == 2 else self.rotation[block]
        y = (x - self.means[block].to(x.dtype)) @ rotation.to(x.dtype).T
        return y * self.alphas[block].to(x.dtype)
