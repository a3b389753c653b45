"""``torch.nn`` front end of the fused attention: a drop-in for timm's ``Attention``.

``Attention`` has the submodules (and so the state_dict keys) of ``timm.layers.Attention``:
``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate`` (when gated), ``proj``,
``proj_drop``; its forward additionally takes the ViTDet window and prefix arguments::

    y = proj(norm(attention(q, k, v, num_prefix=P, window_tokens=T)) [* sigmoid(gate(x))])

where q, k, v are the three head-split views of ``qkv(x)`` (no copies) with q_norm / k_norm
applied. ``swap_attention(vit)`` replaces the attention of every block of a timm
VisionTransformer with this module, weights and norms copied, outputs unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._backend import BACKENDS
from .attention import attention


class Attention(nn.Module):
    """Multi-head self-attention on ``radio_kernels.attention``; timm ``Attention``'s parameters.

    Args mirror timm's; ``backend`` picks the attention implementation ("auto", "triton",
    "torch"). Attention dropout is not fused into the kernel: ``attn_drop > 0`` is accepted (for
    checkpoints and configs that carry it) but a forward in training mode then raises.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is set")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.backend = backend

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(attn_head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        num_prefix: int = 0,
        window_tokens: int = 0,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x (B, N, C) -> (B, N, dim_out). ``attn_mask`` / ``is_causal`` exist for timm's block
        call signature; the windows and prefix are the only masks this kernel expresses."""
        if attn_mask is not None or is_causal:
            raise ValueError("radio_kernels.nn.Attention supports no attn_mask / is_causal; use window_tokens")
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("attention dropout is not fused into the kernel; set attn_drop=0")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(
            q, k, v, num_prefix=num_prefix, window_tokens=window_tokens, scale=self.scale, backend=self.backend
        )
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))  # free: out is stored (B, N, H, D)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: str = "auto") -> Attention:
        """Our module with deep copies of a timm ``Attention``'s submodules (weights, norm types)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.attn_dim = attn.num_heads * attn.head_dim
        new.scale = attn.scale
        new.backend = backend
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            sub = getattr(attn, name, None)  # older timm versions lack norm / gate
            if sub is None and name != "gate":
                sub = nn.Identity() if name.endswith("norm") else nn.Dropout(0.0)
            setattr(new, name, copy.deepcopy(sub))
        new.train(attn.training)
        return new


def swap_attention(vit: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the ``attn`` of every block of a timm VisionTransformer with ``Attention``.

    Weights, norms and dropout settings are copied, so the model's outputs stay the same (up to
    floating-point rounding). Returns ``vit`` (modified in place). Blocks already holding our
    ``Attention`` only get the new backend; any other attention class raises TypeError.
    """
    from timm.layers import Attention as TimmAttention

    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise TypeError(f"vit must be a timm VisionTransformer with .blocks, got {type(vit).__name__}")
    for block in blocks:
        attn = getattr(block, "attn", None)
        if isinstance(attn, TimmAttention):
            block.attn = Attention.from_timm(attn, backend=backend)
        elif isinstance(attn, Attention):
            attn.backend = backend  # already swapped: only the backend changes
        else:
            raise TypeError(f"block attention {type(attn).__name__} is not a timm Attention; cannot swap it")
    return vit
