"""End-to-end distillation step: images/s and peak memory, Triton backend vs PyTorch vs torch.compile.

One step is what ``radio.train.loop`` does per optimizer step (accum_steps = 1, DAMP off): the three
teachers and their PHI-S / dispersion updates, the student forward with all adaptor heads, the EMA
forward, every loss (shifted MSE per teacher, angular summary, MESA), backward, gradient clipping,
AdamW, the LR schedule and the EMA update. It is built from the trainer's own pieces
(``radio.train.build``, ``radio.train.teaching``, ``radio.train.step.micro_step_losses``); the loop has
no "one step for a batch" entry point, so ``StepBench.step`` repeats its eight lines of step logic.

Providers, measured side by side on the SAME models (weights, EMA, optimizer state, teachers and
batch are shared, so the persistent memory is identical and peak-memory differences are the step's):

    triton          attention and every loss through the Triton kernels
    torch           the PyTorch reference backend (SDPA attention, eager losses)
    torch+compile   the torch backend with each transformer block torch.compile'd ("blocks", the
                    PyTorch regional-compilation recipe: compile cost of one block, not of 12-27), or
                    the whole student (``--compile model``, what ``run.compile = true`` does)

Rounds are interleaved (every provider once per round) so clock or load drift hits all alike.
images/s = batch / median step time. FLOPs per step are counted once per point with
``torch.utils.flop_counter`` on the torch backend; achieved TFLOP/s is set against the measured bf16
matmul TFLOP/s of the same device (``bench._common``; fp32 on a CPU). A step is matmul-bound and moves no
well-defined number of bytes, so its copy-bandwidth fraction is not given; the measured copy
bandwidth is printed with the table as the device's reference.

    python -m bench.train_step --device cuda          # vit-b, so400m x 512, 1024 px; bf16; --budget-s 170
    python -m bench.train_step --device cpu --quick   # tiny student at 64 px, torch backend, seconds

Teachers: on a GPU "wide" random teachers with the real widths and patch/canvas geometry of
SigLIP2-g/16-384, DINOv3-7B/16 and SAM3 (1008 px, windows of 24) but only ``--teacher-depth`` layers
(default 2): the adaptor heads and loss kernels see real feature widths (1536, 4096, 1024) while the
frozen teachers, identical for every provider, do not drown the student's cost. On a CPU the tiny
teachers of ``radio.teachers.tiny_teacher``. The table names the teachers used.
"""

from __future__ import annotations

import argparse
import copy
import math
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bench import _common
from bench.summary import measure_reference
from radio.teachers import DINOv3Teacher, Sam3Teacher, SiglipTeacher
from radio.teachers.loading import _DEFAULT_NORM
from radio.train import TrainConfig
from radio.train.build import build_optimizer, build_student, lr_factor, optimizer_step
from radio.train.damp import linear_weight_names
from radio.train.data import SampleSpec, collate, cpe_uniforms, make_views
from radio.train.step import StepModels, micro_step_losses
from radio.train.teaching import TeacherSlot, build_teachers, plan_all_views

PROVIDERS = ("triton", "torch", "torch+compile")
GPU_POINTS = {("vit-b", 512): 32, ("vit-b", 1024): 8, ("so400m", 512): 16, ("so400m", 1024): 4}
GPU_QUICK_POINTS = {("vit-b", 512): 4}
CPU_POINTS = {("tiny", 64): 4, ("tiny", 128): 4}
CPU_QUICK_POINTS = {("tiny", 64): 2}
# A point starts only with at least this fraction of the costliest earlier point's time left (the
# timed rounds shorten themselves at the deadline; building, warm-up and compile cannot).
POINT_FRACTION_NEEDED = 0.8
HIGH_PARTITION_FROM = 512  # c-radiov4 puts 512..1152 px in the high partition (tiled / mosaic teachers)


# ------------------------------------------------------------------------------------------------ teachers
def wide_teacher(kind: str, depth: int, dtype: torch.dtype, device: torch.device):
    """A random teacher with a real family's width and geometry but ``depth`` layers (see module doc)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.sam3.configuration_sam3 import Sam3ViTConfig
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

    if depth < 1:
        raise ValueError(f"teacher depth must be >= 1, got {depth}")
    mean, std = _DEFAULT_NORM[kind]
    common = dict(num_hidden_layers=depth)
    with torch.device(device):  # initialise on the device: a 4096-wide layer is slow to init on a CPU
        if kind == "siglip2":  # SigLIP2-g/16 at 384 px
            cfg = SiglipVisionConfig(
                hidden_size=1536,
                intermediate_size=6144,
                num_attention_heads=16,
                patch_size=16,
                image_size=384,
                **common,
            )
            teacher = SiglipTeacher(SiglipVisionModel(cfg), name="wide-siglip2", mean=mean, std=std, dtype=dtype)
        elif kind == "dinov3":  # DINOv3 ViT-7B/16
            cfg = DINOv3ViTConfig(
                hidden_size=4096,
                intermediate_size=8192,
                num_attention_heads=32,
                patch_size=16,
                num_register_tokens=4,
                use_gated_mlp=True,
                **common,
            )
            teacher = DINOv3Teacher(DINOv3ViTModel(cfg), name="wide-dinov3", mean=mean, std=std, dtype=dtype)
        elif kind == "sam3":  # SAM3 trunk: 1008 px canvas, 24 x 24 windows, last layer global
            cfg = Sam3ViTConfig(window_size=24, global_attn_indexes=[depth - 1], **common)
            teacher = Sam3Teacher(Sam3ViTModel(cfg), name="wide-sam3", mean=mean, std=std, dtype=dtype)
        else:
            raise ValueError(f"kind must be one of siglip2, dinov3, sam3, got {kind!r}")
    return teacher.to(device=device, dtype=dtype)


def build_slots(
    cfg: TrainConfig, teachers: str, depth: int, device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, TeacherSlot]:
    """The enabled teachers; wide ones in ``dtype`` (default: bf16 on a GPU, fp32 on a CPU)."""
    if teachers == "tiny":
        return build_teachers(cfg, device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        name: TeacherSlot(name, tcfg, wide_teacher(tcfg.kind, depth, dtype, device), cfg).to(device)
        for name, tcfg in cfg.enabled_teachers().items()
    }


# ------------------------------------------------------------------------------------------------ one step
def synthetic_batch(geometry, resolution: int, partition: str, patch: int, batch_size: int, device, seed: int = 0):
    """A ``radio.train.data.Batch`` cut by the trainer's own ``make_views`` from random-noise images,
    moved to ``device`` once (so the timed step copies nothing from the host)."""
    rng = np.random.default_rng(seed)
    samples = []
    for q in range(batch_size):
        image = rng.integers(0, 256, (resolution * 2, resolution * 2, 3), dtype=np.uint8)
        crops, origins = make_views(image, geometry, patch, rng)
        views = {k: torch.from_numpy(np.array(v, copy=True)).permute(2, 0, 1) for k, v in crops.items()}
        samples.append((SampleSpec(q, resolution, partition, 0, q), q, views, origins, [], cpe_uniforms(seed, 0, q)))
    batch = collate(samples)
    batch.views = {k: v.to(device) for k, v in batch.views.items()}
    batch.cpe_uniforms = batch.cpe_uniforms.to(device)
    return batch


@dataclass
class StepBench:
    """Models, optimizer and one fixed batch for (student preset, resolution); ``step(provider)`` runs one step."""

    cfg: TrainConfig
    models: StepModels
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plans: dict
    batch: object
    device: torch.device
    amp_dtype: torch.dtype | None
    compile_mode: str
    generators: dict[str, torch.Generator]
    _eager_blocks: nn.ModuleList | None = None
    _compiled: dict[str, nn.Module] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        preset,
        resolution,
        batch_size,
        device,
        teachers="tiny",
        teacher_depth=2,
        compile_mode="blocks",
        amp_dtype: torch.dtype | str | None = "auto",
    ):
        """``amp_dtype``: the step's autocast dtype (and the wide teachers' dtype); "auto" = bf16 on a
        GPU, none (fp32) on a CPU. Passing bf16 on a CPU runs the GPU's dtype path there (tests)."""
        device = torch.device(device)
        if amp_dtype == "auto":
            amp_dtype = torch.bfloat16 if device.type == "cuda" else None
        cfg = TrainConfig()
        cfg.student.preset = preset
        partition = "high" if resolution >= HIGH_PARTITION_FROM else "low"
        high = partition == "high"
        cfg.data.low_resolutions, cfg.data.high_resolutions = ([], [resolution]) if high else ([resolution], [])
        cfg.data.high_prob = 1.0 if high else 0.0
        torch.manual_seed(0)
        slots = build_slots(cfg, teachers, teacher_depth, device, amp_dtype)
        raw = build_student(cfg, slots).to(device)
        ema = copy.deepcopy(raw).eval().requires_grad_(False)
        plans, geometry = plan_all_views(cfg, slots, raw.patch_size, raw.min_resolution_step)
        key = (partition, resolution)
        optimizer = build_optimizer(raw, cfg.optim)
        total = 1_000_000
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
        raw.train()
        generators = {"damp": torch.Generator().manual_seed(29)}  # on the CPU: DAMP reads its draw on the host
        batch = synthetic_batch(geometry[key], resolution, partition, raw.patch_size, batch_size, device)
        models = StepModels(raw, raw, ema, slots, linear_weight_names(raw))
        return cls(cfg, models, optimizer, scheduler, plans[key], batch, device, amp_dtype, compile_mode, generators)

    def _student_for(self, provider: str) -> nn.Module:
        """The module the step calls: the raw student, or its compiled form (built on first use)."""
        raw = self.models.raw
        if provider != "torch+compile":
            return raw
        if self.compile_mode == "model":
            if "model" not in self._compiled:
                self._compiled["model"] = torch.compile(raw, dynamic=False)
            return self._compiled["model"]
        # Regional compilation: swap in compiled wrappers of the same Block modules (shared weights).
        if "blocks" not in self._compiled:
            self._eager_blocks = raw.blocks
            self._compiled["blocks"] = nn.ModuleList(torch.compile(b, dynamic=False) for b in raw.blocks)
        raw.blocks = self._compiled["blocks"]
        return raw

    def step(self, provider: str) -> torch.Tensor:
        """One optimizer step (the body of radio.train.loop's step loop with accum_steps = 1)."""
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        backend = "triton" if provider == "triton" else "torch"
        m, cfg = self.models, self.cfg
        m.raw.set_attention_backend(backend)
        m.ema.set_attention_backend(backend)
        m.student = self._student_for(provider)
        try:
            objective, _ = micro_step_losses(
                self.batch,
                m,
                self.plans,
                mesa_weight=cfg.loss.mesa_weight,
                backend=backend,
                device=self.device,
                amp_dtype=self.amp_dtype,
                sigma=0.0,
                damp_generator=self.generators["damp"],
            )
            objective.backward()
        finally:
            if self._eager_blocks is not None:
                m.raw.blocks = self._eager_blocks
        optimizer_step(m.raw, m.ema, self.optimizer, self.scheduler, cfg.optim.grad_clip, cfg.loss.ema_decay)
        return objective.detach()

    def count_flops(self) -> float:
        """FLOPs of one step on the eager torch backend (matmuls, convolutions, SDPA; fwd + bwd)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.step("torch")
        return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ measuring
def _timed_step(bench: StepBench, provider: str) -> tuple[float, float]:
    """(seconds, peak GiB allocated during the step; NaN on a CPU) for one step."""
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
    start = time.perf_counter()
    loss = bench.step(provider)
    if cuda:
        torch.cuda.synchronize(bench.device)
    seconds = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"{provider}: non-finite loss {float(loss)}")
    peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else float("nan")
    return seconds, peak


def measure_point(bench: StepBench, providers, warmup: int, repeats: int, deadline: float) -> dict[str, dict]:
    """Per provider: step times, peak memory, first-step seconds (compilation) or the failure reason.

    Warm-up steps run per provider (the first pays compilation and autotuning); then rounds of one
    timed step per provider, at least one round, more while ``repeats`` and the deadline allow.
    """
    out = {p: {"times": [], "peaks": [], "first_s": float("nan"), "status": "ok"} for p in providers}
    live = []
    for p in providers:
        try:
            for k in range(warmup):
                seconds, _ = _timed_step(bench, p)
                if k == 0:
                    out[p]["first_s"] = seconds
            live.append(p)
        except Exception as err:  # noqa: BLE001 - OOM, a compile error, a kernel refusing a shape: report, go on
            out[p]["status"] = f"failed: {_reason(err)}"
            print(f"    {p}: {out[p]['status']}", file=sys.stderr)
            bench.optimizer.zero_grad(set_to_none=True)  # no half-finished gradients for the next provider
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    for r in range(repeats):
        if r and time.perf_counter() > deadline:
            break
        for p in live:
            seconds, peak = _timed_step(bench, p)
            out[p]["times"].append(seconds)
            out[p]["peaks"].append(peak)
    return out


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:120]}"


NUMBERS = (
    "step_ms_median",
    "step_ms_min",
    "images_per_s",
    "peak_mem_gib",
    "first_step_s",
    "step_tflop",
    "achieved_tflops",
    "frac_of_matmul",
    "ref_matmul_tflops",
    "ref_copy_gbps",
    "repeats",
    "speedup_vs_torch",
    "mem_vs_torch",
)


def _row(base: dict, provider: str, status: str, reference: dict, **numbers) -> dict:
    """A CSV row with every column present (NaN where nothing was measured)."""
    row = {**base, "provider": provider, "status": status} | dict.fromkeys(NUMBERS, math.nan)
    row |= {"ref_matmul_tflops": reference["matmul_tflops"], "ref_copy_gbps": reference["copy_gbps"], "repeats": 0}
    return row | numbers


def run(
    device,
    points,
    providers,
    *,
    teachers,
    teacher_depth,
    compile_mode,
    warmup,
    repeats,
    budget_s,
    reference,
    on_point=None,
):
    """One row per (point, provider). Points that cannot finish in the time budget (less than
    POINT_FRACTION_NEEDED of the costliest earlier point's time left) are reported as skipped rather
    than silently dropped; timed rounds stop at the deadline (at least one round each).
    ``on_point(rows)`` is called after each point (to write results as they come: a run stopped
    from outside keeps its finished points)."""
    deadline = time.perf_counter() + budget_s
    dev = torch.device(device)
    _common.allow_recompiles()  # one compiled block graph per point and dtype: more than dynamo's 8
    rows = []
    longest = 0.0  # seconds the costliest point so far took: a point needs about that much again
    for (preset, res), batch_size in points.items():
        base = dict(preset=preset, resolution=res, batch=batch_size, device=reference["device"], teachers=teachers)
        left = deadline - time.perf_counter()
        if left <= 0 or left < POINT_FRACTION_NEEDED * longest:
            rows += [_row(base, p, "skipped: time budget", reference) for p in providers]
            continue
        point_started = time.perf_counter()
        print(f"  {preset} {res}px batch {batch_size}", file=sys.stderr)
        bench = results = None
        try:
            bench = StepBench.build(preset, res, batch_size, dev, teachers, teacher_depth, compile_mode)
            results = measure_point(bench, providers, warmup, repeats, deadline)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory while building: this point only
            rows += [_row(base, p, f"failed: {_reason(err)}", reference) for p in providers]
            results = None
        flops = math.nan
        if results is not None:
            try:
                flops = bench.count_flops()
            except Exception as err:  # noqa: BLE001 - the timings stand without a FLOP count
                print(f"    FLOP count failed: {_reason(err)}", file=sys.stderr)
        for p in providers if results is not None else ():
            r, times = results[p], results[p]["times"]
            numbers = {"first_step_s": r["first_s"], "step_tflop": flops / 1e12}
            if times:
                median = statistics.median(times)
                tflops = flops / median / 1e12
                numbers |= {
                    "step_ms_median": median * 1e3,
                    "step_ms_min": min(times) * 1e3,
                    "images_per_s": batch_size / median,
                    "peak_mem_gib": max(r["peaks"]),
                    "achieved_tflops": tflops,
                    "frac_of_matmul": tflops / reference["matmul_tflops"],
                    "repeats": len(times),
                }
            rows.append(_row(base, p, r["status"], reference, **numbers))
            print(f"    {p:14s} {rows[-1]['images_per_s']:9.2f} img/s  {r['status']}", file=sys.stderr)
        bench = results = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        longest = max(longest, time.perf_counter() - point_started)
        _add_ratios(rows)
        if on_point is not None:
            on_point(rows)
    return rows


def _warm(item: tuple) -> None:
    """Prewarm worker (own process): build one point and run one step of each compiled provider, so
    that Triton's and inductor's on-disk caches hold its kernels when the timed process gets there."""
    preset, res, batch_size, teachers, depth, compile_mode, providers, device = item
    _common.allow_recompiles()
    bench = StepBench.build(preset, res, batch_size, device, teachers, depth, compile_mode)
    for provider in providers:
        try:
            bench.step(provider)
        except Exception as err:  # noqa: BLE001 - the timed run reports it properly
            print(f"prewarm {preset} {res}px {provider}: {_reason(err)}", flush=True)
    _common.synchronize(device)


def prewarm_points(
    points: dict, providers, teachers, depth, compile_mode, timeout_s: float, device="cuda", max_parallel: int = 4
) -> str:
    """Compile every point's Triton kernels and compiled blocks in parallel processes (see _warm)."""
    compiled = [p for p in providers if p in ("triton", "torch+compile")]
    items = [(pr, r, b, teachers, depth, compile_mode, compiled, device) for (pr, r), b in points.items()]
    # Four points of at most ~30 GB each (so400m 1024 px batch 4 is the largest) fit on an H100/H200.
    return _common.prewarm(_warm, items if compiled else [], timeout_s=timeout_s, max_parallel=max_parallel)


def _add_ratios(rows: list[dict]) -> None:
    """speedup = images/s over the torch provider's; mem_ratio = peak memory over torch's (same point)."""
    torch_rows = {(r["preset"], r["resolution"]): r for r in rows if r["provider"] == "torch"}
    for r in rows:
        ref = torch_rows.get((r["preset"], r["resolution"]), {})
        ips, ref_ips = r.get("images_per_s", math.nan), ref.get("images_per_s", math.nan)
        mem, ref_mem = r.get("peak_mem_gib", math.nan), ref.get("peak_mem_gib", math.nan)
        r["speedup_vs_torch"] = ips / ref_ips if ref_ips and ref_ips == ref_ips else math.nan
        r["mem_vs_torch"] = mem / ref_mem if ref_mem and ref_mem == ref_mem else math.nan


# ------------------------------------------------------------------------------------------------ output
def markdown_table(rows: list[dict], title: str, notes: list[str]) -> str:
    header = [
        "student",
        "px",
        "batch",
        "provider",
        "images/s",
        "vs torch",
        "peak GiB",
        "vs torch",
        "step ms",
        "TFLOP/s",
        "of matmul",
        "1st step s",
    ]
    lines = [f"### {title}", "", *(f"- {n}" for n in notes), "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for r in rows:
        if r["status"] != "ok":
            cells = [r["preset"], str(r["resolution"]), str(r["batch"]), r["provider"], r["status"]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [
                r["preset"],
                str(r["resolution"]),
                str(r["batch"]),
                r["provider"],
                _common.fmt(r["images_per_s"], ".2f"),
                _common.fmt(r["speedup_vs_torch"], ".2f", "x"),
                _common.fmt(r["peak_mem_gib"], ".2f"),
                _common.fmt(r["mem_vs_torch"], ".2f", "x"),
                _common.fmt(r["step_ms_median"], ".1f"),
                _common.fmt(r["achieved_tflops"], ".3g"),
                _common.fmt(100 * r["frac_of_matmul"], ".1f", "%"),
                _common.fmt(r["first_step_s"], ".1f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smallest point only: a smoke run")
    p.add_argument("--presets", nargs="+", help="student presets (default: cuda vit-b so400m, cpu tiny)")
    p.add_argument("--resolutions", type=int, nargs="+", help="square sides (default: cuda 512 1024, cpu 64 128)")
    p.add_argument("--batch-size", type=int, help="one batch size for every point (default: per point)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: cuda all three, cpu torch")
    p.add_argument("--teachers", choices=["tiny", "wide"], help="default: cuda wide, cpu tiny")
    p.add_argument("--teacher-depth", type=int, default=2, help="layers of each wide teacher")
    p.add_argument("--compile", dest="compile_mode", choices=["blocks", "model"], default="blocks")
    p.add_argument("--warmup", type=int, help="untimed steps per provider (default: cuda 2, cpu 1)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: cuda 8, cpu 3)")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default: cuda 170, cpu 300)")
    p.add_argument("--no-prewarm", action="store_true", help="GPU: no parallel compile before the timed run")
    p.add_argument(
        "--prewarm-only",
        action="store_true",
        help="only compile every point (2 at a time) within --budget-s, then exit",
    )
    p.add_argument("--out", default=_common.RESULTS_DIR)
    a = p.parse_args(argv)

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    points = dict(
        (GPU_QUICK_POINTS if a.quick else GPU_POINTS) if cuda else (CPU_QUICK_POINTS if a.quick else CPU_POINTS)
    )
    if a.presets or a.resolutions or a.batch_size:
        presets = a.presets or list(dict.fromkeys(k[0] for k in points))
        resolutions = a.resolutions or list(dict.fromkeys(k[1] for k in points))
        points = {(pr, r): a.batch_size or points.get((pr, r), 4) for pr in presets for r in resolutions}
    notes = []
    providers = a.providers or (list(PROVIDERS) if cuda else ["torch"])
    if not cuda and "triton" in providers:
        notes.append("triton on a CPU runs under the Triton interpreter: minutes per step, not a speed")
    if not cuda and not a.providers:
        notes.append(
            "CPU: torch backend only (Triton runs only under its interpreter here; torch.compile left out "
            "for time, run with --providers torch torch+compile)"
        )
    teachers = a.teachers or ("wide" if cuda else "tiny")
    warmup = a.warmup if a.warmup is not None else (2 if cuda else 1)
    repeats = a.repeats if a.repeats is not None else (8 if cuda else 3)
    budget = a.budget_s if a.budget_s is not None else (170.0 if cuda else 300.0)
    if warmup < 1 or repeats < 1:
        p.error("--warmup and --repeats must be >= 1")

    dev = torch.device(a.device)
    started = time.perf_counter()
    if a.prewarm_only:  # gpu.sh runs this in the background while the kernel tests run
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: kill the workers, then exit
        report = prewarm_points(points, providers, teachers, a.teacher_depth, a.compile_mode, budget, a.device, 2)
        print(report, flush=True)
        sys.exit(0 if report.startswith(f"prewarm: {len(points)}/{len(points)} ") else 1)
    if cuda and not a.no_prewarm:
        notes.append(prewarm_points(points, providers, teachers, a.teacher_depth, a.compile_mode, min(120, budget / 2)))
        print(notes[-1], file=sys.stderr, flush=True)
    elif cuda:
        notes.append("compile caches warmed beforehand (gpu.sh): '1st step s' is not a cold-compile time")
    reference = measure_reference(dev, quick=a.quick)
    dtype = "bf16 autocast" if cuda else "fp32"
    teacher_text = (
        f"wide random teachers (SigLIP2-g 1536 / DINOv3-7B 4096 / SAM3 1024 wide, {a.teacher_depth} layers each)"
        if teachers == "wide"
        else "tiny random teachers (32 wide, 2 layers)"
    )
    notes = [
        f"device {reference['device']}; {dtype}; {teacher_text}; compile mode '{a.compile_mode}'",
        f"reference measured in this run: {reference['matmul_dtype']} matmul {reference['matmul_tflops']:.3g} TFLOP/s, "
        f"copy {reference['copy_gbps']:.4g} GB/s; 'of matmul' = achieved step TFLOP/s / matmul TFLOP/s",
        "copy-bandwidth fraction: not defined for a whole step (matmul-bound, no byte count)",
        f"images/s = batch / median of up to {repeats} interleaved steps; peak GiB = "
        "torch.cuda.max_memory_allocated during the step (weights, EMA, optimizer state, teachers included)",
        *notes,
    ]
    title = f"Distillation step (3 teachers, EMA, all losses, AdamW), {reference['device']}"
    stem = _common.result_stem(a.out, "train_step", dev, quick=a.quick)

    def write(rows: list[dict]) -> str:
        _common.write_csv(stem + ".csv", rows)
        table = markdown_table(rows, title, notes)
        with open(stem + ".md", "w") as f:
            f.write(table)
        return table

    rows = run(
        a.device,
        points,
        providers,
        teachers=teachers,
        teacher_depth=a.teacher_depth,
        compile_mode=a.compile_mode,
        warmup=warmup,
        repeats=repeats,
        budget_s=budget - (time.perf_counter() - started),
        reference=reference,
        on_point=write,
    )
    table = write(rows)
    print(table)
    print(f"wrote {stem}.csv, {stem}.md")
    return rows


if __name__ == "__main__":
    main()
