"""Where a training step's time goes: data, teachers, student forward + backward, losses + optimizer.

``StepTimer("teachers")`` etc. are nested-free wall-clock sections; on CUDA each section boundary
synchronises the device, so a section is charged with its own kernels and not with the queue left by
the one before (a few synchronisations per micro-step: negligible next to the step itself). The
metrics record holds each section's seconds per optimizer step (``time/<section>``), averaged over
the steps since the last record; the sections add up to the step's time but for logging and
checkpoints. Timed on each rank, logged from rank 0.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

__all__ = ["SECTIONS", "StepTimer"]

SECTIONS = ("data", "teachers", "student", "losses_optimizer")


class StepTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.sync = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(SECTIONS, 0.0)
        self.steps = 0

    @contextmanager
    def __call__(self, section: str):
        if section not in self.seconds:
            raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[section] += time.perf_counter() - start

    def step(self) -> None:
        self.steps += 1

    def pop(self) -> dict[str, float]:
        """{"time/<section>": seconds per step} since the last pop, then start over."""
        n = max(self.steps, 1)
        out = {f"time/{k}": v / n for k, v in self.seconds.items()}
        self.seconds, self.steps = dict.fromkeys(SECTIONS, 0.0), 0
        return out
