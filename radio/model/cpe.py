"""CPE: one learned position table that serves every input resolution.

The table holds R x R positions, R = cpe_max_size / patch_size (128 for 2048 px, patch 16), and is
turned into an h x w position embedding for an h x w token grid:

Training (per sample b)::

    s   ~ U(sqrt(0.1), 1)                      side scale
    a   = exp(U(log 3/4, log 4/3))             aspect
    sx  = clamp(s * a, 0, 1),  sy = clamp(s / a, 0, 1)
    ox  ~ U(0, 1 - sx),  oy ~ U(0, 1 - sy)     offset of the crop in the table, in [0, 1] units
    u_j = j / (w - 1),  v_i = i / (h - 1)      (linspace(0, 1); 0 for a single row/column)
    pos[b, i, j] = bilinear(table, x = ox + sx * u_j, y = oy + sy * v_i)   (grid_sample, align_corners=True)

and with probability ``pos_dropout`` the whole embedding of sample b is zeroed. The student never sees
the same absolute position twice for a given pixel, so it cannot memorise position-dependent noise.

Evaluation: the table is resized bilinearly (``align_corners=False``, like the public RADIO inference
code) to a square of side m = max(h, w) and its top-left h x w corner is used, so a non-square image
sees the same positions as the matching part of a square one.

All random draws come from ``generator`` when one is given (on any device), else from the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIDE_SCALE = math.sqrt(0.1)
LOG_ASPECT = math.log(4 / 3)


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U(0, 1) float32 samples drawn on the generator's device, then moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def random_crop_grid(
    batch: int, h: int, w: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Sampling grid (B, h, w, 2) in grid_sample's [-1, 1] (x, y) convention for random table crops."""
    u = _uniform((4, batch), generator, device)
    side = MIN_SIDE_SCALE + (1.0 - MIN_SIDE_SCALE) * u[0]
    aspect = torch.exp((2.0 * u[1] - 1.0) * LOG_ASPECT)
    scale = torch.stack([side * aspect, side / aspect], dim=-1).clamp(0.0, 1.0)  # (B, 2) as (x, y)
    offset = u[2:].T * (1.0 - scale)  # (B, 2)
    lin_x = torch.linspace(0.0, 1.0, w, device=device)
    lin_y = torch.linspace(0.0, 1.0, h, device=device)
    unit = torch.stack(torch.meshgrid(lin_x, lin_y, indexing="xy"), dim=-1)  # (h, w, 2), [..., 0] = x
    grid = unit[None] * scale[:, None, None, :] + offset[:, None, None, :]
    return grid * 2.0 - 1.0


class PositionEmbedding(nn.Module):
    """The CPE table ``pos_embed`` of shape (1, R*R, D) (row-major R x R grid) and its resampling."""

    def __init__(self, embed_dim: int, table_side: int, pos_dropout: float = 0.1) -> None:
        super().__init__()
        self.table_side = table_side
        self.pos_dropout = pos_dropout
        self.pos_embed = nn.Parameter(torch.randn(1, table_side * table_side, embed_dim) * embed_dim**-0.5)

    def table(self) -> torch.Tensor:
        """The table as an image (1, D, R, R)."""
        r = self.table_side
        return self.pos_embed.reshape(1, r, r, -1).permute(0, 3, 1, 2)

    def eval_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, D): the table resized to max(h, w) squared, top-left h x w corner."""
        table = self.table()
        m = max(h, w)
        if m != self.table_side:
            table = F.interpolate(table.float(), size=(m, m), mode="bilinear", align_corners=False)
            table = table.to(self.pos_embed.dtype)
        return table[:, :, :h, :w].permute(0, 2, 3, 1)

    def train_embedding(self, batch: int, h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, h, w, D): a random crop of the table per sample, some samples zeroed (pos_dropout)."""
        device = self.pos_embed.device
        grid = random_crop_grid(batch, h, w, generator, device)
        table = self.table().float().expand(batch, -1, -1, -1)
        pos = F.grid_sample(table, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        pos = pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1)
        if self.pos_dropout > 0:
            keep = _uniform((batch,), generator, device) >= self.pos_dropout
            pos = pos * keep.to(pos.dtype)[:, None, None, None]
        return pos

    def forward(
        self, patches: torch.Tensor, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``patches`` (B, h*w, D) raster order -> patches + position embedding."""
        h, w = grid_hw
        if self.training:
            pos = self.train_embedding(patches.shape[0], h, w, generator)
        else:
            pos = self.eval_embedding(h, w)
        return patches + pos.reshape(pos.shape[0], h * w, -1).to(patches.dtype)
