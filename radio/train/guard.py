"""The non-finite guard: a step whose loss or gradient norm is NaN / Inf is never applied.

After the backward passes of a step and before AdamW, the trainer asks ``NonFiniteGuard.check``
whether the step may be applied. Every rank takes the same decision (the verdict is all-reduced), so
DDP ranks stay in lockstep. On a bad step:

- ``run.nonfinite = "stop"``: ``NonFiniteError`` names the step and the terms that went non-finite
  (per teacher: spatial / summary; MESA; the total; the gradient norm; a teacher whose own output
  was non-finite). Nothing of that step is applied, so the last checkpoint stays the last good one.
- ``run.nonfinite = "skip"``: the step's gradients are dropped (weights, AdamW moments and EMA stay
  as they were; the LR schedule still advances, so step s always has the LR of step s), the step is
  counted (``skipped_steps`` in metrics.jsonl) and the run stops with ``NonFiniteError`` after
  ``run.max_skipped`` consecutive skips. The counts are checkpointed, so a resumed run goes on
  counting where it left off.

The check costs one small all-reduce and one host sync per step.
"""

from __future__ import annotations

import math

import torch

from radio.finite import NonFiniteError

from .distributed import all_reduce_sum

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteGuard:
    def __init__(self, mode: str, max_skipped: int, log=print):
        if mode not in ("stop", "skip"):
            raise ValueError(f"run.nonfinite must be 'stop' or 'skip', got {mode!r}")
        self.mode, self.max_skipped, self.log = mode, max_skipped, log
        self.skipped_steps = 0  # over the whole run
        self.consecutive = 0

    def check(self, step: int, totals: dict[str, torch.Tensor], grad_norm: torch.Tensor, where: str = "") -> bool:
        """Whether optimizer step ``step`` (1-based, as logged) may be applied.

        ``totals``: this rank's loss terms of the step (and ``nonfinite/...`` flags); ``grad_norm``:
        the global gradient norm before clipping. ``where``: appended to a stop message (e.g. which
        checkpoint is the last good one). Raises ``NonFiniteError`` when the run must stop.
        """
        values = torch.stack([v.detach().float().reshape(()) for v in totals.values()] + [grad_norm.float()])
        bad = all_reduce_sum((~torch.isfinite(values)).any().float().reshape(1))
        if not bool(bad.item()):
            self.consecutive = 0
            return True
        culprits = self._culprits(totals, grad_norm)
        if self.mode == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite {culprits}; the step was not applied and the run stops "
                f"(run.nonfinite='stop'){where}"
            )
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_skipped:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive non-finite steps (run.max_skipped={self.max_skipped}), "
                f"last: {culprits}; the run stops{where}"
            )
        self.log(f"warning: step {step} skipped: non-finite {culprits} ({self.skipped_steps} skipped so far)")
        return False

    @staticmethod
    def _culprits(totals: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> str:
        keys = list(totals)
        summed = all_reduce_sum(torch.stack([totals[k].detach().double().reshape(()) for k in keys])).tolist()
        names = []
        for key, value in zip(keys, summed):
            if key.startswith("nonfinite/"):
                if value != 0:  # a flag: micro-batches whose teacher output held NaN / Inf
                    names.append(f"output of teacher {key.split('/', 2)[2]!r}")
            elif not math.isfinite(value):
                names.append(f"{key} ({value})")
        if not math.isfinite(float(grad_norm)):
            names.append(f"gradient norm ({float(grad_norm)})")
        return ", ".join(names) if names else "values on another rank"

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))
