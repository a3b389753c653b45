"""Adaptor heads: map student tokens into one teacher's (normalised) feature space.

MLP2 (summary heads and the "mlp" spatial head)::

    x = GELU(LN(x))                       only with pre_norm
    x = Linear(in -> hidden)(x)
    x = x + Linear(GELU(LN(x)))           num_inner times
    y = Linear(hidden -> out)(GELU(LN(x)))

Attention spatial head ("attn", C-RADIOv4): two pre-norm transformer blocks on the student tokens
(16 heads, fewer when the width is small, LayerScale init 1e-5, no qkv bias, MLP ratio 4) then MLP2.

Upsampling (FeatSharp-style learned upsampling): with factor k the spatial head outputs k*k*C channels
per token, read as (k, k, C) and pixel-shuffled, token (i, j) filling the k x k cell (k*i + a, k*j + b),
so (B, h*w, k*k*C) becomes (B, (k*h)*(k*w), C) in raster order.

Parameter names (fc1, blocks.i.{0,2}, final.{0,2}, pre_norm.0; blocks.i.* / mlp.* in the attention
head) follow the public RADIO checkpoints so their heads load by prefix renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block
from .config import AdaptorSpec


class MLP2(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_inner: int = 0, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = nn.Sequential(nn.LayerNorm(in_dim), nn.GELU()) if pre_norm else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_inner)
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.pre_norm(x))
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


def attn_head_num_heads(dim: int, max_heads: int = 16, min_head_dim: int = 8) -> int:
    """16 heads, halved while the width is not divisible or heads would be narrower than 8 channels."""
    heads = max_heads
    while heads > 1 and (dim % heads or dim // heads < min_head_dim):
        heads //= 2
    return heads


class AttnFeatureHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_inner: int, pre_norm: bool, backend: str):
        super().__init__()
        heads = attn_head_num_heads(in_dim)
        # Norm eps 1e-5 (nn.LayerNorm's default) as in the public heads, unlike the backbone's 1e-6.
        self.blocks = nn.Sequential(
            *(
                Block(in_dim, heads, 4 * in_dim, qkv_bias=False, layer_scale=1e-5, norm_eps=1e-5, backend=backend)
                for _ in range(2)
            )
        )
        self.mlp = MLP2(in_dim, hidden_dim, out_dim, num_inner=num_inner, pre_norm=pre_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # global attention: the head sees the whole (prefix-free) token grid
        return self.mlp(x)


def pixel_shuffle_tokens(x: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """(B, h*w, k*k*C) -> (B, (k*h)*(k*w), C), channels read as (k_row, k_col, C)."""
    if k == 1:
        return x
    B, _, kkc = x.shape
    c = kkc // (k * k)
    x = x.view(B, h, w, k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * k * w * k, c)


class Adaptor(nn.Module):
    """One teacher's heads: ``summary_head`` (absent when spec.summary_dim is None) and ``feature_head``."""

    def __init__(self, spec: AdaptorSpec, embed_dim: int, backend: str = "auto") -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_dim or embed_dim
        feat_hidden = spec.feature_hidden_dim or hidden
        k2 = spec.upsample_factor**2
        if spec.summary_dim is not None:
            self.summary_head = MLP2(embed_dim, hidden, spec.summary_dim, spec.num_inner, spec.pre_norm)
        else:
            self.summary_head = None
        if spec.head == "attn":
            inner = spec.feature_num_inner if spec.feature_num_inner is not None else 0
            self.feature_head = AttnFeatureHead(
                embed_dim, feat_hidden, k2 * spec.feature_dim, inner, spec.pre_norm, backend
            )
        else:
            inner = spec.feature_num_inner if spec.feature_num_inner is not None else spec.num_inner
            self.feature_head = MLP2(embed_dim, feat_hidden, k2 * spec.feature_dim, inner, spec.pre_norm)

    def forward(
        self, cls_token: torch.Tensor, patch_tokens: torch.Tensor, grid_hw: tuple[int, int]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """cls_token (B, D), patch_tokens (B, h*w, D) -> summary (B, S) | None, features (B, k*k*h*w, C)."""
        summary = self.summary_head(cls_token) if self.summary_head is not None else None
        features = self.feature_head(patch_tokens)
        return summary, pixel_shuffle_tokens(features, *grid_hw, self.spec.upsample_factor)
