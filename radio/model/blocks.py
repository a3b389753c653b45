"""Pre-norm ViT block on the fused ``radio_kernels.attention``.

    x = x + ls1 * Attn(LN1(x))          Attn: qkv = Linear(D -> 3D), heads split as (3, H, Dh)
    x = x + ls2 * MLP(LN2(x))           MLP: Linear(D -> M), GELU, Linear(M -> D)

``ls`` is LayerScale (a learned per-channel gain initialised to ``layer_scale``) or the identity.
Parameter names follow timm's ``Block`` (norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma), which keeps official-checkpoint loading a renaming of prefixes only.

The attention call receives the ViTDet layout: ``num_prefix`` leading prefix tokens and windows of
``window_tokens`` contiguous tokens (0 = global); see ``radio_kernels.attention``.
"""

from __future__ import annotations

import torch
from torch import nn

import radio_kernels


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, num_prefix: int = 0, window_tokens: int = 0, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3, H, Dh) -> three (B, H, N, Dh) views with unit stride in Dh; no copies.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = radio_kernels.attention(
            q, k, v, num_prefix=num_prefix, window_tokens=window_tokens, backend=self.backend, cu_seqlens=cu_seqlens
        )
        # The kernel stores (B, H, N, Dh) as (B, N, H, Dh): this reshape is free.
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the feed-forward of SwiGLU RADIO variants (transformers' names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        ffn: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_dim) if ffn == "swiglu" else Mlp(dim, mlp_dim)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, num_prefix: int = 0, window_tokens: int = 0, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``cu_seqlens``: packed sequences that attend only to themselves (``radio_kernels.attention``)."""
        attended = self.attn(self.norm1(x), num_prefix=num_prefix, window_tokens=window_tokens, cu_seqlens=cu_seqlens)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """timm-style init: Linear weights ~ truncated N(0, 0.02), biases 0; LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
