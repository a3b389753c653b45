"""The FeatSharp upsampler (arXiv 2502.16025): a learned, integer-factor feature upsampler.

Inputs, for a factor f and a teacher with an n x n native token grid:
  - the teacher's features on the *global view* (the image resized to the native size), (B, n, n, C);
  - its features on the f x f native-size *tiles* of the image, stitched, (B, f*n, f*n, C);
  - the pixels (B, 3, H, W) in [0, 1], which guide the upsampling.

Pipeline (all in the upsampler's own standardised feature space):
  1. de-bias: subtract a learned per-token-position vector (the teacher's fixed-pattern noise, which
     sits at the same place of every native-size run) from the global view and from every tile;
  2. a FeatUp-style stack of joint bilateral upsampling levels (one per prime factor of f) lifts the
     global features to f*n x f*n, each level weighting a (2r+1)^2 neighbourhood by a spatial Gaussian
     times a range kernel computed from the pixels;
  3. a pre-norm transformer block with local (windowed) attention fuses the upsampled global features
     with the tile features (plus a learned per-tile-position offset, so it can tell tiles apart):
     the tiles bring detail, the global view coherence across the tile seams. Its output is a residual
     on the upsampled global features, started near zero (LayerScale), so an untrained fusion block
     leaves the JBU output;
  4. the result is mapped back to the teacher's feature scale (the de-bias stays subtracted).

Neighbourhood operations (JBU and local attention) loop over the (2r+1)^2 offsets on zero-padded
maps, so memory stays O(B*C*H*W) instead of materialising every neighbourhood.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatSharpUpsampler", "FusionBlock", "JBULevel", "LocalAttention", "prime_factors"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` in ascending order (``prime_factors(12) == [2, 2, 3]``; 1 -> [])."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"prime_factors: n must be a positive int, got {n!r}")
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _offsets(radius: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _shifted(x: torch.Tensor, radius: int) -> Iterator[torch.Tensor]:
    """For each offset (dy, dx) of ``_offsets(radius)``: y[..., i, j] = x[..., i + dy, j + dx] (zero outside)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius))
    for dy, dx in _offsets(radius):
        yield padded[..., radius + dy : radius + dy + h, radius + dx : radius + dx + w]


def _valid(h: int, w: int, radius: int, device) -> torch.Tensor:
    """(K, h, w) bool: whether the neighbour at each offset lies inside the map (borders renormalise)."""
    ones = torch.ones(1, h, w, device=device)
    return torch.cat(list(_shifted(ones, radius)), 0) > 0


def _guide(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The pixels at the resolution of a feature map (antialiased), centred on 0."""
    return F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True) - 0.5


class JBULevel(nn.Module):
    """One joint bilateral upsampling level (FeatUp): features x ``scale``, guided by the pixels.

    out[p] = sum_q w[p, q] * up(x)[q] over the (2r+1)^2 neighbours q of p, where up() is bilinear and
    w = softmax_q(temperature * <k_p, k_q> - |p - q|^2 / (2 sigma^2)): k are unit-norm keys computed
    from the pixels by a small conv net, so the kernel follows image edges. A 1x1 conv then corrects
    the result (residual, zero-initialised).
    """

    def __init__(self, feature_dim: int, scale: int, radius: int = 3, key_dim: int = 16):
        super().__init__()
        if scale < 2:
            raise ValueError(f"JBULevel: scale must be >= 2, got {scale}")
        self.scale, self.radius = int(scale), int(radius)
        self.keys = nn.Sequential(
            nn.Conv2d(3, key_dim, 3, padding=1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1, bias=False)
        )
        self.log_temperature = nn.Parameter(torch.tensor(math.log(4.0)))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(1.0)))
        self.fixup = nn.Conv2d(feature_dim, feature_dim, 1)
        nn.init.zeros_(self.fixup.weight)
        nn.init.zeros_(self.fixup.bias)

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w) -> (B, C, h*scale, w*scale); images (B, 3, H, W) in [0, 1], any size."""
        h, w = features.shape[-2:]
        side_h, side_w = h * self.scale, w * self.scale
        up = F.interpolate(features, size=(side_h, side_w), mode="bilinear", align_corners=False)
        keys = F.normalize(self.keys(_guide(images, side_h, side_w)), dim=1)
        temperature, sigma2 = self.log_temperature.exp(), self.log_sigma.exp() ** 2
        logits = []
        for (dy, dx), k in zip(_offsets(self.radius), _shifted(keys, self.radius)):
            logits.append(temperature * (keys * k).sum(1) - (dy * dy + dx * dx) / (2 * sigma2))
        logits = torch.stack(logits, 1)  # (B, K, H, W)
        logits = logits.masked_fill(~_valid(side_h, side_w, self.radius, features.device), float("-inf"))
        weights = logits.softmax(1)
        out = torch.zeros_like(up)
        for i, u in enumerate(_shifted(up, self.radius)):
            out = out + weights[:, i : i + 1] * u
        return out + self.fixup(out)


class LocalAttention(nn.Module):
    """Multi-head attention of each token over its ``window`` x ``window`` neighbourhood (channels first).

    A learned bias per head and relative offset (zero-initialised) gives it a sense of position that
    is the same everywhere, so the block is translation-equivariant away from the borders.
    """

    def __init__(self, dim: int, heads: int, window: int = 7):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LocalAttention: dim={dim} is not divisible by heads={heads}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"LocalAttention: window must be a positive odd int, got {window}")
        self.heads, self.radius = heads, window // 2
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.position_bias = nn.Parameter(torch.zeros(heads, window * window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, d, h, w).unbind(1)
        q = q * d**-0.5
        scores = torch.stack([(q * kk).sum(2) for kk in _shifted(k, self.radius)], 2)  # (B, heads, K, H, W)
        scores = scores + self.position_bias[None, :, :, None, None]
        scores = scores.masked_fill(~_valid(h, w, self.radius, x.device)[None, None], float("-inf"))
        attn = scores.softmax(2)
        out = torch.zeros_like(v)
        for i, vv in enumerate(_shifted(v, self.radius)):
            out = out + attn[:, :, i : i + 1] * vv
        return self.proj(out.reshape(b, c, h, w))


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FusionBlock(nn.Module):
    """Pre-norm transformer block over [upsampled global ; tiles] (2C channels) -> C channels.

    z = [g ; t];  z = z + ls1 * attn(norm(z));  out = g + ls2 * mlp(norm(z)), the MLP mapping 2C -> C.
    """

    def __init__(self, feature_dim: int, heads: int, window: int = 7, mlp_ratio: float = 4.0, init_scale=1e-4):
        super().__init__()
        dim = 2 * feature_dim
        hidden = max(1, int(feature_dim * mlp_ratio))
        self.norm1, self.norm2 = _ChannelNorm(dim), _ChannelNorm(dim)
        self.attn = LocalAttention(dim, heads, window)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, feature_dim, 1))
        self.scale1 = nn.Parameter(torch.full((dim, 1, 1), float(init_scale)))
        self.scale2 = nn.Parameter(torch.full((feature_dim, 1, 1), float(init_scale)))

    def forward(self, upsampled: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        z = torch.cat([upsampled, tiles], 1)
        z = z + self.scale1 * self.attn(self.norm1(z))
        return upsampled + self.scale2 * self.mlp(self.norm2(z))


class FeatSharpUpsampler(nn.Module):
    """Upsample a teacher's n x n native feature grid by the integer ``factor`` (module docstring).

    Args:
        feature_dim: the teacher's channel count C.
        native_tokens: n, the teacher's token grid side at its native size.
        factor: integer upsampling factor f >= 1 (1: de-bias and fusion only).
        radius: JBU neighbourhood radius; window: local-attention window (odd); heads: attention heads
            (default: one per 64 channels of the 2C-wide block, at least 1).
        mlp_ratio: the fusion MLP's hidden width / C; key_dim: JBU key channels.
    """

    def __init__(
        self,
        feature_dim: int,
        native_tokens: int,
        factor: int,
        *,
        radius: int = 3,
        window: int = 7,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        key_dim: int = 16,
    ):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("native_tokens", native_tokens), ("factor", factor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FeatSharpUpsampler: {name} must be a positive int, got {value!r}")
        if heads is None:
            heads = max(1, (2 * feature_dim) // 64)
            while (2 * feature_dim) % heads:
                heads -= 1
        self.feature_dim, self.native_tokens, self.factor = feature_dim, native_tokens, factor
        self.hparams = dict(radius=radius, window=window, heads=heads, mlp_ratio=mlp_ratio, key_dim=key_dim)
        self.levels = nn.ModuleList(JBULevel(feature_dim, s, radius, key_dim) for s in prime_factors(factor))
        self.fusion = FusionBlock(feature_dim, heads, window, mlp_ratio)
        # Which of the f x f tiles a token came from (added to the tile features only).
        self.tile_position = nn.Parameter(torch.zeros(feature_dim, factor, factor))
        # The de-bias buffer: the teacher's fixed-pattern noise per native token position (standardised units).
        self.bias = nn.Parameter(torch.zeros(native_tokens, native_tokens, feature_dim))
        # Per-channel standardisation of the teacher's features, fitted once (``fit_normalization``).
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    # ------------------------------------------------------------------ feature space

    @torch.no_grad()
    def fit_normalization(self, features: torch.Tensor) -> None:
        """Set the per-channel mean/std from teacher features (..., C) (the start of training)."""
        flat = features.detach().reshape(-1, self.feature_dim).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0, unbiased=False).clamp_min(1e-6))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Teacher features (B, h, w, C), h and w multiples of n -> standardised, de-biased (B, h, w, C)."""
        self._check_grid(features, "features")
        x = (features.to(self.bias.dtype) - self.feature_mean) / self.feature_std
        reps = (features.shape[1] // self.native_tokens, features.shape[2] // self.native_tokens)
        return x - self.debias_pattern().repeat(reps[0], reps[1], 1)

    def debias_pattern(self) -> torch.Tensor:
        """The subtracted pattern (n, n, C): the buffer minus its mean over positions. A constant offset
        would shift the input and the consistency target alike (the loss cannot see it), so it is removed:
        the buffer holds only the deviation of each position from the others."""
        return self.bias - self.bias.mean((0, 1))

    def destandardize(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.feature_std + self.feature_mean

    def _check_grid(self, features: torch.Tensor, name: str) -> None:
        n = self.native_tokens
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[-1] != self.feature_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"FeatSharpUpsampler: {name} must be (B, h, w, {self.feature_dim}), got {shape}")
        if features.shape[1] % n or features.shape[2] % n:
            raise ValueError(
                f"FeatSharpUpsampler: {name} grid {tuple(features.shape[1:3])} is not a multiple of the native {n}"
            )

    # ------------------------------------------------------------------ upsampling

    def upsample_standardized(self, images: torch.Tensor, global_std: torch.Tensor, tiles_std: torch.Tensor):
        """The core in standardised space: global (B, n, n, C), tiles (B, f*n, f*n, C) -> (B, f*n, f*n, C)."""
        n, f = self.native_tokens, self.factor
        b = global_std.shape[0]
        if global_std.shape != (b, n, n, self.feature_dim):
            raise ValueError(
                f"FeatSharpUpsampler: global features must be ({b}, {n}, {n}, {self.feature_dim}), "
                f"got {tuple(global_std.shape)}"
            )
        if tiles_std.shape != (b, f * n, f * n, self.feature_dim):
            raise ValueError(
                f"FeatSharpUpsampler: tile features must be ({b}, {f * n}, {f * n}, {self.feature_dim}), "
                f"got {tuple(tiles_std.shape)}"
            )
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[:2] != (b, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"FeatSharpUpsampler: images must be ({b}, 3, H, W), got {shape}")
        x = global_std.permute(0, 3, 1, 2)
        for level in self.levels:
            x = level(x, images.to(x.dtype))
        tile_pos = self.tile_position.repeat_interleave(n, 1).repeat_interleave(n, 2)
        tiles = tiles_std.permute(0, 3, 1, 2) + tile_pos
        return self.fusion(x, tiles).permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor, global_features: torch.Tensor, tile_features: torch.Tensor):
        """Raw teacher features in, de-biased upsampled features (B, f*n, f*n, C) out, in the teacher's scale.

        images: (B, 3, H, W) in [0, 1], the tiled input (any H, W: it is resized per level);
        global_features: (B, n, n, C) on the whole image at the native size;
        tile_features: (B, f*n, f*n, C) stitched from the f x f native tiles.
        """
        out = self.upsample_standardized(images, self.standardize(global_features), self.standardize(tile_features))
        return self.destandardize(out)

    def config(self) -> dict:
        return dict(feature_dim=self.feature_dim, native_tokens=self.native_tokens, factor=self.factor, **self.hparams)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, native_tokens={self.native_tokens}, factor={self.factor}"
