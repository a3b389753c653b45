"""ViTDet-mode training: some micro-batches run the student with windowed attention (METHOD.md §3).

Which micro-batches: micro-batch ``m`` runs windowed when ``u < prob`` for ``u`` the first U(0, 1)
draw of its own stream ``(seed, m, _TAG_VITDET)``; its window is then a uniform choice among
``window_sizes`` from the same stream. The choice is a pure function of the seed and the global
micro-step, so it is the same on every rank (the global batch of a micro-step runs in one mode, so DDP
equals one process), after a resume, and for any number of DataLoader workers. In
``data.partition_mode = "rank"`` the partition is part of the key, so the two partitions of one step
draw independently.

Only the student runs windowed; the EMA copy (the MESA target) and the teachers stay global: the
windowed student learns to match global features, which is what windowed inference needs.

Resolutions that are not a multiple of ``window * patch`` (224 or 432 px with windows of 8 at patch 16):
the token grid is **padded** with zero tokens inside windowed blocks (``RadioModel.windowed``), not
cropped. Why: cropping the student's view to the nearest window multiple would drop up to ``w - 1``
token rows and columns of supervision and break the view plans of the teachers whose grid is not the
student's (resampled and mosaic views are planned for the full crop); padding keeps every target cell
and every plan, the global blocks never see the padding, and it is the convention of ViTDet and of
SAM's windowed encoder. The cost is the padded tokens' compute in windowed blocks (432 px, w = 8:
27 -> 32 tokens a side).
"""

from __future__ import annotations

import numpy as np

from .config import VitdetTrainConfig

__all__ = ["vitdet_window"]

_TAG_VITDET = 0x5EED07


def vitdet_window(cfg: VitdetTrainConfig, seed: int, micro_step: int, partition: str = "") -> int | None:
    """The window size micro-batch ``micro_step`` trains with, or None for global attention."""
    if cfg.prob <= 0 or not cfg.window_sizes:
        return None
    key = [seed, micro_step, _TAG_VITDET] + ([1 if partition == "high" else 2] if partition else [])
    rng = np.random.default_rng(key)
    if rng.random() >= cfg.prob:
        return None
    return int(cfg.window_sizes[rng.integers(len(cfg.window_sizes))])
