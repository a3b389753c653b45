"""ViTDet: running a stack of blocks where some attend inside w x w token windows.

Token order. At entry the patch tokens of the h x w grid are permuted once from raster order to
window-major order: window (wy, wx) holds tokens (wy*w + py, wx*w + px) for py, px in [0, w), and each
window's T = w*w tokens are contiguous (windows themselves in raster order). A windowed block then sees
windows as contiguous runs, switching windowed <-> global is a reshape, and global attention does not
care about order (positions were added before the blocks). Raster order is restored once at exit.

Prefix tokens (P CLS + registers) in windowed blocks, three modes:

- "skip" (official RADIO inference): windowed blocks see the patch tokens only (attention with
  ``window_tokens=T, num_prefix=0``); the prefix is set aside and rejoins unchanged at the next global block.
- "global": the whole sequence goes through the block with ``num_prefix=P, window_tokens=T``: a patch
  query sees its window plus the P prefix keys, a prefix query sees every key; the MLP updates all tokens.
- "replicate" (training augmentation): the prefix is copied into each window, giving B*nw sequences of
  P + T tokens run with global attention; consecutive windowed blocks keep the per-window copies; on
  return to global the prefix is the mean of its nw copies.

Padding (``pad=True``, used by ViTDet-mode training, ``RadioModel.windowed``): a grid that is not a
multiple of the window is padded at the bottom and right with zero tokens inside windowed blocks only,
as ViTDet and SAM's encoder do (no attention mask: a border window's queries also see the constant
keys of the zero tokens). Global blocks never see the padding: in a padded run the global layout stays
in raster order, and each switch to windowed scatters the patches into the padded window-major layout
(pad slots zero), each switch back gathers them and drops the pad slots.
"""

from __future__ import annotations

import torch


def window_major_permutation(h: int, w: int, window: int, device=None) -> torch.Tensor:
    """perm such that ``x_raster[:, perm]`` lists the h x w grid window by window (window-major)."""
    if h % window or w % window:
        raise ValueError(f"the token grid {h}x{w} must be a multiple of the window size {window}")
    idx = torch.arange(h * w, device=device).view(h // window, window, w // window, window)
    return idx.permute(0, 2, 1, 3).reshape(-1)


class WindowedRun:
    """Layout bookkeeping for one forward pass through blocks with a ViTDet schedule.

    Tokens move through three layouts: raster (outside), global (prefix + window-major patches,
    (B, P+N, D)) and windowed (mode dependent, see module docstring). ``block_kwargs(windowed)`` gives
    the attention layout a block must use; ``peek`` returns the tokens in raster order, without changing
    state, for intermediate outputs.
    """

    def __init__(
        self, grid_hw: tuple[int, int], num_prefix: int, window: int | None, mode: str, pad: bool = False
    ) -> None:
        self.h, self.w = grid_hw
        self.num_prefix = num_prefix
        self.window = window
        self.mode = mode
        self.windowed = False
        self.padded = False
        self._stash: torch.Tensor | None = None
        self.perm = self.inverse = None
        if window is not None:
            hp, wp = -(-self.h // window) * window, -(-self.w // window) * window
            self.padded = pad and (hp, wp) != (self.h, self.w)
            if not self.padded:
                hp, wp = self.h, self.w
            self.tokens_per_window = window * window
            self.num_windows = (hp // window) * (wp // window)
            self._padded_grid = (hp, wp)

    def _pad_indices(self, device) -> None:
        """``perm``: for each padded window-major slot, its raster token index (``h*w`` = a zero pad
        token); ``inverse``: for each raster token, its slot."""
        hp, wp = self._padded_grid
        slots = window_major_permutation(hp, wp, self.window, device=device)  # padded-raster index per slot
        r, c = slots // wp, slots % wp
        inside = (r < self.h) & (c < self.w)
        self.perm = torch.where(inside, r * self.w + c, torch.full_like(slots, self.h * self.w))
        position = torch.empty_like(slots)
        position[slots] = torch.arange(slots.numel(), device=device)  # slot of each padded-raster index
        rows, cols = torch.meshgrid(
            torch.arange(self.h, device=device), torch.arange(self.w, device=device), indexing="ij"
        )
        self.inverse = position[(rows * wp + cols).reshape(-1)]

    # -------------------------------------------------------------- entry / exit (raster <-> window-major)
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return x
        if self.padded:  # the global layout stays in raster order; windows are cut at each switch
            self._pad_indices(x.device)
            return x
        self.perm = window_major_permutation(self.h, self.w, self.window, device=x.device)
        self.inverse = torch.argsort(self.perm)
        P = self.num_prefix
        return torch.cat([x[:, :P], x[:, P:][:, self.perm]], dim=1)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_global(x)
        if self.window is None or self.padded:
            return x
        P = self.num_prefix
        return torch.cat([x[:, :P], x[:, P:][:, self.inverse]], dim=1)

    # -------------------------------------------------------------- global <-> windowed
    def to_windowed(self, x: torch.Tensor) -> torch.Tensor:
        if self.windowed:
            return x
        self.windowed = True
        P, T, nw = self.num_prefix, self.tokens_per_window, self.num_windows
        if self.padded:
            patches = x[:, P:]
            zero = patches.new_zeros(patches.shape[0], 1, patches.shape[-1])
            x = torch.cat([x[:, :P], torch.cat([patches, zero], dim=1)[:, self.perm]], dim=1)
        if self.mode == "skip":
            self._stash = x[:, :P]
            return x[:, P:]
        if self.mode == "replicate":
            B, _, D = x.shape
            prefix = x[:, None, :P].expand(B, nw, P, D)
            patches = x[:, P:].reshape(B, nw, T, D)
            return torch.cat([prefix, patches], dim=2).reshape(B * nw, P + T, D)
        return x  # "global": same layout, the attention mask does the work

    def to_global(self, x: torch.Tensor) -> torch.Tensor:
        if not self.windowed:
            return x
        self.windowed = False
        return self._global_view(x, consume=True)

    def _global_view(self, x: torch.Tensor, consume: bool) -> torch.Tensor:
        P, T, nw = self.num_prefix, self.tokens_per_window, self.num_windows
        if self.mode == "skip":
            prefix, patches = self._stash, x
            if consume:
                self._stash = None
        elif self.mode == "replicate":
            D = x.shape[-1]
            x = x.reshape(-1, nw, P + T, D)
            prefix, patches = x[:, :, :P].mean(dim=1), x[:, :, P:].reshape(x.shape[0], nw * T, D)
        elif not self.padded:
            return x
        else:
            prefix, patches = x[:, :P], x[:, P:]
        if self.padded:  # back to raster order, pad slots dropped
            patches = patches[:, self.inverse]
        return torch.cat([prefix, patches], dim=1)

    # -------------------------------------------------------------- what a block needs / what we report
    def block_kwargs(self) -> dict[str, int]:
        """Attention layout for a block run in the current state."""
        if not self.windowed:
            return dict(num_prefix=0, window_tokens=0)
        if self.mode == "skip":
            return dict(num_prefix=0, window_tokens=self.tokens_per_window)
        if self.mode == "global":
            return dict(num_prefix=self.num_prefix, window_tokens=self.tokens_per_window)
        return dict(num_prefix=0, window_tokens=0)  # replicate: each sequence is one window + its prefix

    def peek(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P+N, D) in raster order for the current tokens, leaving the run's state untouched."""
        if self.windowed:
            x = self._global_view(x, consume=False)
        if self.window is None or self.padded:
            return x
        P = self.num_prefix
        return torch.cat([x[:, :P], x[:, P:][:, self.inverse]], dim=1)
