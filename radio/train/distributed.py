"""Data-parallel training through ``torchrun`` (nccl on GPU, gloo on CPU).

``torchrun --nproc-per-node N -m radio train`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup``
initialises the process group from them. Each rank takes its share of the global batch
(radio.train.data.StepSampler), the student is wrapped in DistributedDataParallel (gradients
averaged), and PHI-S and the dispersion meters all-reduce their statistics themselves, so every
rank holds the same teacher normalisation.

Exactness against one process on the same global batch: the spatial and MESA losses are means
over the overlap Omega of each sample, so each rank's loss is re-weighted by its share of the
global |Omega| (``radio.train.step``) and the DDP gradient average equals the single-process
gradient. The student's CPE augmentation (table crop, position dropout) comes from each sample's
own seed in the data pipeline (``Batch.cpe_uniforms``), so a rank draws for its samples exactly
what one process would. Two things cannot match a single process exactly: DAMP noise, which is
independent per rank by design (DAMP perturbs each device's weights separately; the stream is
checkpointed, so a resume is still exact), and mosaics of a teacher with global attention (SAM3),
whose features for a view depend on the views packed next to it. Views are packed in batch order,
so the mosaics agree when the local batch is a multiple of the views per canvas;
``high_res_mode = "resize"`` gives one view per canvas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "cleanup", "setup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (or when already initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def cleanup(info: DistInfo, created: bool) -> None:
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
