"""Resolution partitions per step (``data.partition_mode``) and the objective's weighting.

"step" (the default): each micro-step trains one partition, the high one with probability
``p = data.high_prob``; over the run the objective is the weighted mean ``(1 - p) L_low + p L_high``
(in expectation), each step's gradient about one partition only.

"rank": every micro-step trains both partitions, the RADIO way: ``data.batch_size`` low-resolution
images and ``data.high_batch_size`` high-resolution ones (fewer: their tokens cost more). With W > 1
processes, the last ``H`` ranks (``data.high_ranks``, or ``round(W * p)`` clamped to [1, W - 1] when 0)
train the high partition and split its batch, the first ``W - H`` the low one. One process runs the two
sub-batches in turn (low, then high) within the micro-step, as if it were both groups.

Weighting, exactly: with ``L_part`` each loss term's mean over its own partition's global sub-batch
(spatial and MESA terms: over the overlap cells of that sub-batch, summed over its ranks; summary
terms: over its samples), the micro-step's objective is

    L = (1 - p) * L_low + p * L_high

so its expectation over the run is the "step" mode's objective, now with both partitions in every
gradient. A rank's share of ``L_part`` is normalised by its own group's totals (all-reduced per group,
``radio.train.step``), weighted by ``1 - p`` or ``p``, and DDP's mean over ranks undoes the
``* world_size`` of ``micro_step_losses``. Logged loss terms are this weighted sum too.
"""

from __future__ import annotations

__all__ = ["PARTITION_MODES", "high_rank_count", "partition_weighting", "rank_partitions"]

PARTITION_MODES = ("step", "rank")
PARTITION_GROUPS = {"low": 0, "high": 1}


def high_rank_count(world_size: int, high_prob: float, high_ranks: int = 0) -> int:
    """How many ranks (the last ones) train the high partition in "rank" mode with ``world_size > 1``."""
    if world_size < 2:
        raise ValueError(f"rank groups need at least 2 ranks, got world_size={world_size}")
    count = high_ranks if high_ranks > 0 else min(max(round(world_size * high_prob), 1), world_size - 1)
    if not 1 <= count <= world_size - 1:
        raise ValueError(
            f"data.high_ranks={high_ranks} must leave at least one rank to each partition (world size {world_size})"
        )
    return count


def rank_partitions(mode: str, world_size: int, rank: int, high_prob: float, high_ranks: int = 0) -> list[str | None]:
    """The sub-batches one micro-step of ``rank`` runs: [None] ("step": whichever partition the step
    drew), ["low", "high"] ("rank", one process), or this rank's group (["low"] or ["high"])."""
    if mode == "step":
        return [None]
    if mode != "rank":
        raise ValueError(f"data.partition_mode must be one of {list(PARTITION_MODES)}, got {mode!r}")
    if world_size == 1:
        return ["low", "high"]
    return ["high"] if rank >= world_size - high_rank_count(world_size, high_prob, high_ranks) else ["low"]


def partition_weighting(mode: str, partition: str, high_prob: float) -> dict:
    """``micro_step_losses`` keywords for a sub-batch: its weight in the objective and its rank group."""
    if mode == "step":
        return dict(weight=1.0, group=0, num_groups=1)
    return dict(
        weight=high_prob if partition == "high" else 1.0 - high_prob,
        group=PARTITION_GROUPS[partition],
        num_groups=len(PARTITION_GROUPS),
    )
