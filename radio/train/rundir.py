"""What a run directory holds, and how the trainer writes and reads it.

    DIR/config.toml        the resolved config (rewritten by a resume that changes --steps / --set)
    DIR/run.lock           the one writer's lock (radio.train.runlock)
    DIR/metrics.jsonl      one record per logged step (``log_record``); a resume truncates it to the
                           checkpoint's step (``truncate_metrics``)
    DIR/checkpoints/       verified checkpoints (radio.train.checkpoint) written by ``write_checkpoint``:
                           model / EMA / optimizer state through the parallel policy, plus the
                           replicated state (schedule, teachers' statistics, every rank's RNG, data
                           position, non-finite guard)

``resume_point`` finds the checkpoint to continue from (rank 0 verifies, the others follow).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from radio.finite import NonFiniteError, nonfinite_entries

from .checkpoint import load_checkpoint, load_latest_good, save_checkpoint, save_sharded_checkpoint
from .config import config_to_dict
from .distributed import DistInfo, all_reduce_sum
from .runlock import RunLock, RunLockedError

__all__ = [
    "fresh_run_dir",
    "last_good_message",
    "lock_run_dir",
    "log_record",
    "resume_point",
    "rng_state",
    "set_rng_state",
    "truncate_metrics",
    "write_checkpoint",
]


def fresh_run_dir(out: str, info: DistInfo) -> Path:
    """``out``, or ``out-1``, ``out-2``, ... when ``out`` already holds a run (never overwrite one)."""
    path = Path(out)
    if info.is_main:
        k = 0
        while (path / "config.toml").exists() or (path / "checkpoints").exists():
            k += 1
            path = Path(f"{out}-{k}")
        path.mkdir(parents=True, exist_ok=True)
    if info.enabled:
        holder = [str(path)]
        dist.broadcast_object_list(holder, src=0)
        path = Path(holder[0])
    return path


def lock_run_dir(run_dir: Path, info: DistInfo, log, cleanup: ExitStack) -> RunLock | None:
    """Rank 0 takes ``run_dir``'s lock (released when the run ends; None on other ranks); every rank
    fails alike if it cannot."""
    error, lock = None, None
    if info.is_main:
        try:
            lock = cleanup.enter_context(RunLock(run_dir, log=log))
        except RunLockedError as err:
            error = str(err)
    if info.enabled:
        holder = [error]
        dist.broadcast_object_list(holder, src=0)
        error = holder[0]
    if error is not None:
        raise RunLockedError(error)
    return lock


def resume_point(run_dir: Path, info: DistInfo, log) -> tuple[Path, dict]:
    """The newest good checkpoint: rank 0 verifies (newer broken ones are reported and skipped) and
    tells the others which one to load."""
    found: list = [None]
    if info.is_main:
        try:
            path, state = load_latest_good(run_dir, map_location="cpu", log=log)
            found = [str(path)]
        except ValueError as err:  # also CorruptCheckpointError
            found = [err]
    if info.enabled:
        dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], Exception):
        raise found[0]
    if not info.is_main:
        path = Path(found[0])
        state = load_checkpoint(path, map_location="cpu", verify=False)
    return path, state


def truncate_metrics(path: Path, last_step: int, log=print) -> None:
    """Drop records logged after the checkpoint we resume from (the run died after logging them),
    and a partial last line (the run died while writing it)."""
    if not path.is_file():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log(f"{path}: dropping a partial last line (the run was interrupted while writing it)")
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; fix or delete that line to resume") from None
        if record["step"] <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(keep)


def log_record(
    metrics_file, done, lr, totals, grad_norm, sigma, batch, step_time, accum, d, skipped, guard, times=None
) -> dict:
    """One metrics.jsonl record of step ``done`` (loss terms summed over ranks; NaN stays NaN); ``times``:
    seconds per step in data / teachers / student / losses_optimizer (``radio.train.timing``)."""
    keys = sorted(k for k in totals if not k.startswith("nonfinite/"))
    values = all_reduce_sum(torch.stack([totals[k] for k in keys]).double()).tolist()
    images = d.batch_size + (d.high_batch_size if d.partition_mode == "rank" else 0)
    images_per_s = accum * images / max(time.perf_counter() - step_time, 1e-9)
    record = {"step": done, "lr": lr, **dict(zip(keys, values))}
    record |= {
        "grad_norm": float(grad_norm),
        "damp_sigma": sigma,
        "resolution": batch.resolution,
        "images_per_s": images_per_s,
        "skipped_images": len(skipped),
        "skipped_steps": guard.skipped_steps,
    }
    record |= times or {}
    if not all(math.isfinite(v) for v in values) or not math.isfinite(record["grad_norm"]):
        record["applied"] = False
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    return record


def last_good_message(run_dir: Path, last_saved: int) -> str:
    if last_saved < 0:
        return "; no checkpoint had been written yet"
    return f"; the last good checkpoint is {run_dir}/checkpoints/step_{last_saved:08d}.pt"


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    run_dir, step, cfg, raw, ema, optimizer, scheduler, slots, generators, skipped, info, guard, parallel, streams=None
) -> None:
    """Gather every rank's RNG state (and shard stream positions: ``streams()``), then write the
    checkpoint (finite weights only): rank 0 alone (``ddp``), or every rank its shards (``fsdp``).
    Collective."""
    rng = rng_state(generators)
    per_rank = [rng]
    positions = streams() if streams is not None else None
    if info.enabled:
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, rng)
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, sorted(skipped))
        skipped = set().union(*gathered)
        if positions is not None:
            parts = [None] * info.world_size
            dist.all_gather_object(parts, positions)
            positions = {s: p for part in parts for s, p in part.items()}
    tensors = parallel.states(raw, ema, optimizer)  # a collective under FSDP
    meta = {
        "step": step,
        "config": config_to_dict(cfg),
        "model_config": raw.config.to_dict(),
        "adaptors": [spec.to_dict() for spec in raw.adaptor_specs],
        "scheduler": scheduler.state_dict(),
        "teachers": {name: slot.state() for name, slot in slots.items()},
        "rng": {"per_rank": per_rank},
        "data": {"skipped": sorted(skipped)} | ({"streams": positions} if positions is not None else {}),
        "guard": guard.state_dict(),
    }
    # Every rank checks its own shards; all refuse together if any found a NaN / Inf.
    bad = nonfinite_entries({**parallel.local_tensors(tensors), "teachers": meta["teachers"]})
    if all_reduce_sum(torch.tensor([float(len(bad))], device=parallel.device)).item() > 0:
        where = ", ".join(bad[:5]) if bad else "tensors of another rank"
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: non-finite values in {where}")
    if parallel.sharded:
        barrier = dist.barrier if info.enabled else (lambda: None)
        save_sharded_checkpoint(run_dir, step, tensors, meta, cfg.run.keep_last, info.is_main, barrier)
    elif info.is_main:
        save_checkpoint(run_dir, step, {**meta, **tensors}, cfg.run.keep_last)
