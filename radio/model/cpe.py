"""CPE: one learned position table that serves every input resolution.

The table holds R x R positions, R = cpe_max_size / patch_size (128 for 2048 px, patch 16), and is
turned into an h x w position embedding for an h x w token grid:

Training (per sample b, from its own five uniforms ``U[b] = (u0, u1, u2, u3, u4)``, each U(0, 1))::

    s   = sqrt(0.1) + (1 - sqrt(0.1)) u0       side scale, s ~ U(sqrt(0.1), 1)
    a   = exp((2 u1 - 1) log(4/3))             aspect, log a ~ U(log 3/4, log 4/3)
    sx  = clamp(s * a, 0, 1),  sy = clamp(s / a, 0, 1)
    ox  = u2 (1 - sx),  oy = u3 (1 - sy)       offset of the crop in the table, in [0, 1] units
    u_j = j / (w - 1),  v_i = i / (h - 1)      (linspace(0, 1); 0 for a single row/column)
    pos[b, i, j] = bilinear(table, x = ox + sx * u_j, y = oy + sy * v_i)   (grid_sample, align_corners=True)
    pos[b] = 0  if u4 < pos_dropout            (the whole embedding of sample b is dropped)

The student never sees the same absolute position twice for a given pixel, so it cannot memorise
position-dependent noise. Sample b's embedding depends on ``U[b]`` only, never on the rest of the
batch, so a data pipeline that draws ``U[b]`` from the sample's own seed makes the augmentation
independent of how samples are split over ranks and micro-batches.

Evaluation: the table is resized bilinearly (``align_corners=False``, like the public RADIO inference
code) to a square of side m = max(h, w) and its top-left h x w corner is used, so a non-square image
sees the same positions as the matching part of a square one.

Where ``U`` comes from (training only): the ``uniforms`` argument when given (a (B, 5) tensor), else
``draw_cpe_uniforms`` from ``generator`` (on any device), else from the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPE_UNIFORMS", "MIN_SIDE_SCALE", "PositionEmbedding", "check_cpe_uniforms", "draw_cpe_uniforms"]

MIN_SIDE_SCALE = math.sqrt(0.1)
LOG_ASPECT = math.log(4 / 3)
# Columns of a (B, CPE_UNIFORMS) uniforms tensor: side scale, aspect, offset x, offset y, dropout.
CPE_UNIFORMS = 5


def draw_cpe_uniforms(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(batch, 5) float32 U(0, 1) draws, from ``generator`` on its own device (else the global RNG),
    returned on ``device``."""
    shape = (batch, CPE_UNIFORMS)
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def check_cpe_uniforms(uniforms, batch: int, name: str = "cpe_uniforms") -> None:
    """ValueError/TypeError unless ``uniforms`` is a finite floating (batch, 5) tensor in [0, 1]."""
    if not isinstance(uniforms, torch.Tensor):
        shape = f"({batch}, {CPE_UNIFORMS})"
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(uniforms).__name__}")
    if not uniforms.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of U(0, 1) draws, got dtype {uniforms.dtype}")
    if tuple(uniforms.shape) != (batch, CPE_UNIFORMS):
        raise ValueError(
            f"{name} must have shape (B, {CPE_UNIFORMS}) = ({batch}, {CPE_UNIFORMS}) (side scale, aspect, offset x, "
            f"offset y, dropout per sample), got {tuple(uniforms.shape)}"
        )
    # A data-dependent check synchronises with the device and breaks a compiled graph: skip it there.
    if not torch.compiler.is_compiling() and uniforms.numel() and not bool(((uniforms >= 0) & (uniforms <= 1)).all()):
        raise ValueError(
            f"{name} must hold U(0, 1) draws in [0, 1], got values in "
            f"[{uniforms.min().item():.4g}, {uniforms.max().item():.4g}] (NaN counts as out of range)"
        )


def random_crop_grid(uniforms: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid (B, h, w, 2) in grid_sample's [-1, 1] (x, y) convention for the table crops that
    ``uniforms`` (B, 5) select (module docstring; the dropout column is not used here)."""
    u = uniforms.float()
    side = MIN_SIDE_SCALE + (1.0 - MIN_SIDE_SCALE) * u[:, 0]
    aspect = torch.exp((2.0 * u[:, 1] - 1.0) * LOG_ASPECT)
    scale = torch.stack([side * aspect, side / aspect], dim=-1).clamp(0.0, 1.0)  # (B, 2) as (x, y)
    offset = u[:, 2:4] * (1.0 - scale)  # (B, 2)
    lin_x = torch.linspace(0.0, 1.0, w, device=u.device)
    lin_y = torch.linspace(0.0, 1.0, h, device=u.device)
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

    def train_embedding(
        self,
        batch: int,
        h: int,
        w: int,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, h, w, D): a random crop of the table per sample, some samples zeroed (pos_dropout).

        ``uniforms`` (B, 5) in [0, 1] fixes the randomness; without it, it is drawn from ``generator``.
        """
        device = self.pos_embed.device
        if uniforms is None:
            uniforms = draw_cpe_uniforms(batch, generator, device)
        else:
            check_cpe_uniforms(uniforms, batch)
            uniforms = uniforms.to(device=device, dtype=torch.float32)
        grid = random_crop_grid(uniforms, h, w)
        table = self.table().float().expand(batch, -1, -1, -1)
        pos = F.grid_sample(table, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        pos = pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1)
        if self.pos_dropout > 0:
            keep = uniforms[:, 4] >= self.pos_dropout
            pos = pos * keep.to(pos.dtype)[:, None, None, None]
        return pos

    def forward(
        self,
        patches: torch.Tensor,
        grid_hw: tuple[int, int],
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``patches`` (B, h*w, D) raster order -> patches + position embedding.

        In training mode the crops come from ``uniforms`` (B, 5), else from ``generator``; in eval mode
        both are ignored (``uniforms`` is still validated, so a malformed one never passes silently).
        """
        h, w = grid_hw
        if self.training:
            pos = self.train_embedding(patches.shape[0], h, w, generator, uniforms)
        else:
            if uniforms is not None:
                check_cpe_uniforms(uniforms, patches.shape[0])
            pos = self.eval_embedding(h, w)
        return patches + pos.reshape(pos.shape[0], h * w, -1).to(patches.dtype)
