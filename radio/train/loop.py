"""The training loop, top to bottom: setup, resume, steps, checkpoints, fidelity.

    teachers, student, EMA copy, AdamW + warmup/cosine, step-indexed data
    for step in [start, stop):
        for each of accum_steps micro-batches:
            losses = radio.train.step.micro_step_losses(...)   # teachers -> PHI-S -> losses
            backward(objective / accum_steps)
        clip gradients; AdamW step; LR step; EMA update
        log metrics.jsonl; checkpoint every N steps (atomic, keep last K)
    checkpoint; loss.png; fidelity before/after (held-out crops) -> fidelity.json

A run directory holds config.toml, metrics.jsonl, checkpoints/, loss.png and fidelity.json; how
its parts are written and read back is radio.train.rundir.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from radio.model import RadioModel

from .align import ViewPlan
from .build import apply_step, build_optimizer, build_student, clip_gradients, lr_factor, skip_step
from .checkpoint import atomic_save, load_checkpoint, quarantine_after
from .config import TrainConfig, check_resume_compatible, check_runtime, load_config, save_config
from .damp import damp_sigma, linear_weight_names
from .data import ImageSource, StepSampler, ViewDataset, make_loader, split_holdout
from .distributed import DistInfo, setup
from .fidelity import fidelity_batches, measure_fidelity
from .guard import NonFiniteError, NonFiniteGuard
from .parallel import Parallel
from .partitions import partition_weighting
from .plots import plot_losses
from .rundir import (
    fresh_run_dir,
    last_good_message,
    lock_run_dir,
    log_record,
    resume_point,
    set_rng_state,
    truncate_metrics,
    write_checkpoint,
)
from .step import StepModels, joint_teacher_targets, micro_step_losses
from .tblog import TensorBoardLog
from .teaching import build_teachers, plan_all_views, plan_for
from .timing import StepTimer
from .vitdet_train import vitdet_window

__all__ = ["load_run_config", "train"]

INITIAL_WEIGHTS = "initial_student.pt"


def _device(choice: str, info: DistInfo) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device='cuda' but no CUDA device is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _quiet(*args) -> None:
    pass


def _amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run ``cfg`` (or, with ``resume=True``, continue the run in ``cfg.run.out``) to ``cfg.run.steps``.

    ``stop_after``: end after that step as an interruption would (a checkpoint is written, no
    fidelity). Returns {"run_dir", "step", "fidelity" (None unless the run completed), "skipped_images"}.
    """
    cfg.validate()
    check_runtime(cfg)  # the device and the loss backend exist here: before anything is written
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    threads = torch.get_num_threads()
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        with ExitStack() as cleanup:  # the run directory's lock, released however the run ends
            return _train(cfg, resume, stop_after, progress, log, cleanup)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as we found it


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None, progress: bool, log, cleanup: ExitStack) -> dict:
    was_initialised = dist.is_available() and dist.is_initialized()
    wanted = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = setup(wanted)
    device = _device(cfg.run.device, info)
    started = time.perf_counter()
    # The images first: a bad folder should fail before anything is built or written.
    if cfg.data.shards is not None:  # webdataset shards (radio.data.loader): nothing is listed but the shards
        from radio.data.loader import expand_shards, held_out_images, shard_loader

        shards = expand_shards(cfg.data.shards)
        held_images, held_keys = held_out_images(shards, cfg.data.holdout, cfg.data.min_image_side)
    else:
        source = ImageSource.from_config(cfg.data.image_dir, cfg.data.min_image_side)
        train_images, held_images = split_holdout(source, cfg.data.holdout)

    # ---------------------------------------------------------------- run directory and resume point
    if resume:
        run_dir = Path(cfg.run.out)
        lock = lock_run_dir(run_dir, info, log, cleanup)  # before reading: no second writer of this run
        ckpt_path, state = resume_point(run_dir, info, log)
        check_resume_compatible(state["config"], cfg)  # same teachers, same student
        saved_parallel = state["config"]["run"].get("parallel", "ddp")
        if saved_parallel != cfg.run.parallel:
            raise ValueError(
                f"run.parallel = {cfg.run.parallel!r}, but the run was trained with {saved_parallel!r} "
                f"({ckpt_path.name}); resume it with --set run.parallel={saved_parallel}"
            )
        if cfg.run.steps < state["step"]:
            raise ValueError(
                f"--steps / run.steps = {cfg.run.steps} is below the step of the checkpoint to resume from "
                f"({state['step']}, {ckpt_path.name}); a resumed run can only go on (give --steps >= {state['step']})"
            )
    else:
        state = None

    # ---------------------------------------------------------------- models
    torch.manual_seed(cfg.run.seed)  # student initialisation
    slots = build_teachers(cfg, device)
    raw = build_student(cfg, slots).to(device)
    raw.set_grad_checkpointing(cfg.student.grad_checkpointing)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    plans, geometry = plan_all_views(cfg, slots, raw.patch_size, raw.min_resolution_step)
    if cfg.fidelity.enabled and cfg.fidelity.resolution % raw.min_resolution_step:
        raise ValueError(
            f"fidelity.resolution={cfg.fidelity.resolution} is not a multiple of the student's "
            f"min_resolution_step={raw.min_resolution_step}"
        )
    if state is None:  # only now, when the config is known to work, claim a run directory
        run_dir = fresh_run_dir(cfg.run.out, info)
        cfg.run.out = str(run_dir)
        lock = lock_run_dir(run_dir, info, log, cleanup)

    if state is None and info.is_main:
        save_config(cfg, run_dir / "config.toml")
        if cfg.fidelity.enabled:
            atomic_save(raw.state_dict(), run_dir / "checkpoints" / INITIAL_WEIGHTS)

    # ---------------------------------------------------------------- parallelism and optimisation
    parallel = Parallel(cfg.run.parallel, info, device)
    student = parallel.wrap(raw, ema)  # before the optimizer: FSDP replaces the parameters
    optimizer = build_optimizer(raw, cfg.optim)
    total = cfg.run.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
    # Own random streams (saved in checkpoints): the DAMP seed stream, the same on every rank (DAMP mixes
    # the rank into each draw). The student's CPE augmentation is not here: it is drawn per sample by the
    # data pipeline (Batch.cpe_uniforms). On the CPU: one seed per micro-batch is read on the host (each
    # layer then makes its noise on the device); a CUDA draw would stall the launch queue every time.
    generators = {"damp": torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 29)}
    amp_dtype = _amp_dtype(cfg.run.amp, device)
    accum = cfg.optim.accum_steps

    guard = NonFiniteGuard(cfg.run.nonfinite, cfg.run.max_skipped, log=log if info.is_main else _quiet)

    # ---------------------------------------------------------------- restore or initialise
    start, skipped = 0, set()
    if state is not None:
        parallel.load_states(raw, ema, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        for name, slot in slots.items():
            slot.load_state(state["teachers"][name])
        rng = state["rng"]
        per_rank = rng["per_rank"] if len(rng["per_rank"]) == info.world_size else None
        if per_rank is not None:
            set_rng_state(per_rank[info.rank], generators)
        else:
            # The DAMP stream is the same on every rank: continue it from rank 0's; only the
            # per-rank global torch RNG (unused by the recipe's randomness) starts afresh.
            for k, g in generators.items():
                g.set_state(rng["per_rank"][0]["generators"][k])
            if info.is_main:
                log(
                    f"resuming with {info.world_size} ranks from a {len(rng['per_rank'])}-rank run: "
                    "global torch RNG reseeded, DAMP stream continued"
                )
        start, skipped = state["step"], set(state["data"]["skipped"])
        guard.load_state_dict(state.get("guard", {}))
        if info.is_main:
            quarantine_after(run_dir, start, log)
            truncate_metrics(run_dir / "metrics.jsonl", start, log)
            # --steps / --set given with --resume change the run: record them, so that the next
            # resume continues the same schedule.
            save_config(cfg, run_dir / "config.toml")

    stop = total if stop_after is None else min(total, stop_after)
    if cfg.run.compile:
        student = torch.compile(student)
    raw.train()
    if not cfg.student.cpe_augmentation:
        raw.cpe.eval()  # inference-time CPE: no random table crops, no position dropout
    models = StepModels(student, raw, ema, slots, linear_weight_names(raw))

    # ---------------------------------------------------------------- data
    d = cfg.data
    streams = None  # shards: the loader's per-stream positions, saved in checkpoints
    if d.shards is not None:
        resumed = state["data"].get("streams") if state is not None else None
        loader = shard_loader(
            d, cfg.run.seed, geometry, raw.patch_size, start * accum, stop * accum, info.rank, info.world_size,
            resumed, held_keys, shards,
        )  # fmt: skip
        batches, streams = iter(loader), loader.state_dict
        partitions = ("step",)  # data.partition_mode = "step" only (checked by the config)
    else:
        dataset = ViewDataset(
            train_images,
            geometry,
            raw.patch_size,
            cfg.run.seed,
            d.crop_scale,
            d.shift_std,
            d.max_shift,
            d.min_image_side,
        )
        sampler = StepSampler(
            len(train_images),
            d.batch_size,
            d.low_resolutions,
            d.high_resolutions,
            d.high_prob,
            cfg.run.seed,
            start=start * accum,
            stop=stop * accum,
            rank=info.rank,
            world_size=info.world_size,
            partition_mode=d.partition_mode,
            high_batch_size=d.high_batch_size,
            high_ranks=d.high_ranks,
        )
        batches = iter(make_loader(dataset, sampler, d.num_workers))
        partitions = sampler.partitions
    patch = raw.patch_size

    def vitdet_key(batch) -> str:  # "rank" mode: the two partitions of a micro-step draw independently
        return batch.partition if d.partition_mode == "rank" else ""

    # ---------------------------------------------------------------- the loop
    if info.is_main:
        log(f"run directory: {run_dir}  (steps {start} -> {stop} of {total}, device {device}, ranks {info.world_size})")
    bar = tqdm(total=total, initial=start, disable=not (progress and info.is_main), desc="train", unit="step")
    metrics_file = cleanup.enter_context(open(run_dir / "metrics.jsonl", "a")) if info.is_main else None
    tensorboard = None
    if cfg.run.tensorboard and info.is_main:
        tensorboard = TensorBoardLog(run_dir, start if state is not None else None)
        cleanup.callback(tensorboard.close)
    last_saved = start if state is not None else -1

    def checkpoint_at(step_number: int) -> None:  # collective: every rank calls it
        write_checkpoint(
            run_dir, step_number, cfg, raw, ema, optimizer, scheduler, slots, generators, skipped, info, guard,
            parallel, streams,
        )  # fmt: skip

    timer = StepTimer(device)  # data / teachers / student / losses + optimizer, per step
    step_time = time.perf_counter()
    for step in range(start, stop):
        sigma = damp_sigma(cfg.damp.sigma, cfg.damp.schedule, step, total)
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        for micro in range(accum):
            # This rank's sub-batches of the micro-step: one ("step" mode, or a rank group of "rank"
            # mode), or low then high ("rank" mode on one process; teacher statistics updated jointly).
            with timer("data"):
                subs = [next(batches) for _ in partitions]
            sub_plans = [plans[(b.partition, b.resolution)] for b in subs]
            with timer("teachers"):
                shared = (
                    [None]
                    if len(subs) == 1
                    else joint_teacher_targets(subs, slots, sub_plans, patch, device, micro == 0)
                )
            for k, batch in enumerate(subs):
                skipped.update(batch.skipped)
                # ViTDet-mode training: this micro-batch's window (None = global), same on every rank.
                window = vitdet_window(cfg.student.vitdet_train, cfg.run.seed, batch.micro_step, vitdet_key(batch))
                with (
                    parallel.sync(student, raw, last_micro=micro == accum - 1 and k == len(subs) - 1),
                    raw.windowed(window, cfg.student.vitdet_train.prefix_mode),
                ):
                    objective, parts = micro_step_losses(
                        batch,
                        models,
                        sub_plans[k],
                        mesa_weight=cfg.loss.mesa_weight,
                        backend=cfg.loss.backend,
                        device=device,
                        amp_dtype=amp_dtype,
                        sigma=sigma,
                        damp_generator=generators["damp"],
                        world_size=info.world_size,
                        first_micro=micro == 0,
                        rank=info.rank,
                        targets=shared[k],
                        timer=timer,
                        **partition_weighting(d.partition_mode, batch.partition, d.high_prob),
                    )
                    with timer("student"):
                        (objective / accum).backward()
                for name, v in parts.items():
                    totals[name] += v / accum
        lr = scheduler.get_last_lr()[0]
        done = step + 1
        with timer("losses_optimizer"):
            grad_norm = parallel.grad_norm(clip_gradients(raw, cfg.optim.grad_clip))

        # ------------------------------------------------------------ the guard: apply only finite steps
        try:
            applied = guard.check(done, totals, grad_norm, where=last_good_message(run_dir, last_saved))
        except NonFiniteError:
            record = log_record(
                metrics_file, done, lr, totals, grad_norm, sigma, batch, step_time, accum, d, skipped, guard
            )
            if tensorboard is not None:
                tensorboard.log(record)
            raise
        with timer("losses_optimizer"):
            if applied:
                apply_step(raw, ema, optimizer, scheduler, cfg.loss.ema_decay)
            else:
                skip_step(optimizer, scheduler)
        timer.step()

        # ------------------------------------------------------------ metrics (summed over ranks)
        if done % cfg.run.log_every == 0 or done == stop or not applied:
            times = timer.pop()
            record = log_record(
                metrics_file, done, lr, totals, grad_norm, sigma, batch, step_time, accum, d, skipped, guard, times
            )
            split = "/".join(f"{record[f'time/{k}']:.2f}" for k in ("data", "teachers", "student", "losses_optimizer"))
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", res=batch.resolution, s=split
            )
            if tensorboard is not None:
                tensorboard.log(record)
        step_time = time.perf_counter()
        bar.update(1)
        if lock is not None:
            lock.heartbeat()

        if done % cfg.run.checkpoint_every == 0 or done == stop:
            checkpoint_at(done)
            last_saved = done
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if last_saved != stop:  # every run ends with a checkpoint (also a resume with nothing left to do)
        checkpoint_at(stop)

    # ---------------------------------------------------------------- the end: plots, fidelity
    result = {"run_dir": str(run_dir), "step": stop, "fidelity": None, "skipped_images": len(skipped)}
    measure = stop == total and cfg.fidelity.enabled
    if measure:
        final, final_ema = _plain_models(parallel, raw, ema)  # a collective under FSDP
    if info.is_main:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        if skipped:
            log(f"skipped {len(skipped)} unreadable or too small image(s)")
        if measure:
            result["fidelity"] = _fidelity(cfg, run_dir, final, final_ema, slots, held_images, device, log)
        log(f"done in {time.perf_counter() - started:.1f} s: {run_dir}")
    if info.enabled and not was_initialised:
        dist.destroy_process_group()
    return result


def _plain_models(parallel: Parallel, raw, ema):
    """(student, EMA) that rank 0 can run alone: themselves, or unsharded copies under multi-rank FSDP."""
    if not (parallel.sharded and parallel.info.enabled):
        return raw, ema
    copies = []
    for module in (raw, ema):
        state = parallel.full_model_state(module)
        if state is None:
            copies.append(None)
            continue
        plain = RadioModel(raw.config, raw.adaptor_specs).to(parallel.device)
        plain.load_state_dict(state)
        copies.append(plain.train(module.training))
    return tuple(copies)


def _fidelity(cfg: TrainConfig, run_dir: Path, raw, ema, slots, held_images: ImageSource, device, log) -> dict:
    """Fidelity of the initial and the final student (and the EMA) on held-out crops -> fidelity.json."""
    if len(held_images) == 0:
        log("fidelity: data.holdout = 0, nothing held out; skipped")
        return {}
    f = cfg.fidelity
    plans: dict[str, ViewPlan] = {
        name: plan_for(slot.teacher, slot.cfg, f.resolution, raw.patch_size, high=False) for name, slot in slots.items()
    }
    batches = fidelity_batches(
        held_images,
        plans,
        f.resolution,
        raw.patch_size,
        f.crops_per_image,
        f.seed,
        cfg.data.crop_scale,
        cfg.data.min_image_side,
    )
    initial = copy.deepcopy(raw)
    initial.load_state_dict(load_checkpoint(run_dir / "checkpoints" / INITIAL_WEIGHTS, map_location=device))
    was_training = raw.training
    models = {"before": initial, "after": raw, "ema": ema}
    scores = measure_fidelity(models, slots, plans, batches, device)
    report = {
        "resolution": f.resolution,
        "held_out_images": [held_images.name(i) for i in range(len(held_images))],
        "crops": len(batches) * len(held_images),
        "teachers": {name: {label: scores[label][name] for label in ("before", "after", "ema")} for name in slots},
    }
    v = cfg.student.vitdet_train
    if v.window_sizes:  # the same crops in windowed inference (radio.train.vitdet_train)
        window = (v.window_sizes[0], v.prefix_mode)
        scores = measure_fidelity(models, slots, plans, batches, device, window=window)
        report["windowed"] = {
            "window_size": window[0],
            "prefix_mode": window[1],
            "teachers": {name: {label: scores[label][name] for label in models} for name in slots},
        }
    raw.train(was_training)
    report["improved"] = all(
        t["after"]["spatial"] > t["before"]["spatial"]
        and (t["after"]["summary"] is None or t["after"]["summary"] > t["before"]["summary"])
        for t in report["teachers"].values()
    )
    with open(run_dir / "fidelity.json", "w") as fh:
        json.dump(report, fh, indent=2)
    log("fidelity (mean cosine similarity to the PHI-S-normalised teacher on held-out crops):")
    log(f"  {'teacher':<10} {'spatial before':>15} {'after':>8} {'summary before':>15} {'after':>8}")
    for name, t in report["teachers"].items():
        b, a = t["before"], t["after"]
        sb = "-" if b["summary"] is None else f"{b['summary']:.3f}"
        sa = "-" if a["summary"] is None else f"{a['summary']:.3f}"
        log(f"  {name:<10} {b['spatial']:>15.3f} {a['spatial']:>8.3f} {sb:>15} {sa:>8}")
    log(f"  improved for every teacher: {report['improved']}")
    if "windowed" in report:
        w = report["windowed"]
        log(f"  windowed inference (window {w['window_size']}, prefix {w['prefix_mode']!r}), spatial after:")
        log("    " + "  ".join(f"{name} {t['after']['spatial']:.3f}" for name, t in w["teachers"].items()))
    return report


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved config a run wrote (for --resume and export)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no config.toml)")
    return load_config(path)
