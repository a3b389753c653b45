"""How the student is spread over ranks: ``run.parallel = "ddp"`` (replicated) or ``"fsdp"`` (sharded).

- ``ddp``: ``DistributedDataParallel`` over the student; every rank holds all weights, AdamW moments
  and the EMA. Checkpoints are one file written by rank 0 (``radio.train.checkpoint``).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and then on the
  whole student; the EMA copy is sharded alike, so its update is a per-shard lerp and each rank holds
  1 / world of the student, the EMA and the AdamW moments. Gradients are reduce-scattered with the
  same averaging as DDP, so the objective (``radio.train.step``) is unchanged. Checkpoints go through
  ``torch.distributed.checkpoint`` (DCP): a directory per step written by every rank in parallel,
  keyed by parameter name, so a run resumes at another world size (DCP reshards on load), also as one
  process, where the model is simply not wrapped.

Teachers stay replicated (frozen, run in inference mode).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .distributed import DistInfo

__all__ = ["PARALLEL_MODES", "Parallel"]

PARALLEL_MODES = ("ddp", "fsdp")


def _local(t):
    """The local shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


class Parallel:
    """The wrapping, gradient-sync and state-dict policy of one parallel mode."""

    def __init__(self, mode: str, info: DistInfo, device: torch.device):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"run.parallel must be one of {list(PARALLEL_MODES)}, got {mode!r}")
        self.mode, self.info, self.device = mode, info, device
        self._ddp: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        """Whether checkpoints are DCP directories (``fsdp``, at any world size)."""
        return self.mode == "fsdp"

    def wrap(self, raw: nn.Module, ema: nn.Module) -> nn.Module:
        """The module the training step calls: DDP(raw), or raw itself (sharded in place under FSDP).

        Call before building the optimizer: FSDP replaces the parameters with sharded ones.
        """
        if not self.info.enabled:
            return raw
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(raw, device_ids=ids)
            return self._ddp
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for model in (raw, ema):
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            # The EMA target is computed by forward_features, not forward: gather for it too.
            register_fsdp_forward_method(model, "forward_features")
        return raw

    def sync(self, student: nn.Module, raw: nn.Module, last_micro: bool):
        """Context for one micro-batch's backward: gradients are synchronised on the last one only."""
        if not self.info.enabled or last_micro:
            if self.mode == "fsdp" and self.info.enabled:
                raw.set_requires_gradient_sync(True)
            return nullcontext()
        if self.mode == "ddp":
            return self._ddp.no_sync()
        raw.set_requires_gradient_sync(False)
        return nullcontext()

    @staticmethod
    def grad_norm(norm: torch.Tensor) -> torch.Tensor:
        """A plain tensor of the global gradient norm (FSDP's clipping returns a replicated DTensor)."""
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ------------------------------------------------------------------ state
    def states(self, raw: nn.Module, ema: nn.Module, optimizer) -> dict:
        """Student, EMA and optimizer state to checkpoint (sharded, keyed by name, under ``fsdp``)."""
        if not self.sharded:
            return {"student": raw.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        student, optim = get_state_dict(raw, optimizer)
        return {"student": student, "ema": get_model_state_dict(ema), "optimizer": optim}

    def load_states(self, raw: nn.Module, ema: nn.Module, optimizer, state: dict) -> None:
        """Restore what ``states`` saved: from the checkpoint dict (``ddp``) or its DCP directory (``fsdp``)."""
        if not self.sharded:
            raw.load_state_dict(state["student"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from .checkpoint import load_sharded_tensors

        template = self.states(raw, ema, optimizer)  # initialises the optimizer state to load into
        load_sharded_tensors(state["sharded"], template)
        set_state_dict(raw, optimizer, model_state_dict=template["student"], optim_state_dict=template["optimizer"])
        set_model_state_dict(ema, template["ema"])

    def full_model_state(self, module: nn.Module) -> dict | None:
        """The whole state dict on rank 0, on the CPU (a collective under FSDP: every rank calls it);
        None on the other ranks."""
        if not (self.sharded and self.info.enabled):
            return {k: v.detach().cpu() for k, v in module.state_dict().items()} if self.info.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.info.is_main else None

    @staticmethod
    def local_tensors(states: dict) -> dict:
        """The local shards of ``states`` (for a per-rank finiteness check)."""

        def walk(obj):
            if isinstance(obj, dict):
                return {k: walk(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [walk(v) for v in obj]
            return _local(obj)

        return walk(states)
