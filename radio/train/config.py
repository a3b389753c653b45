"""Trainer configuration: a tree of dataclasses, TOML in and out, and ``--set key=value`` overrides.

``TrainConfig()`` is the embedded default (the tiny demo: tiny student, three tiny teachers, the
images bundled with scikit-image, tiny-scale resolutions). ``TrainConfig.preset("c-radiov4")`` is
the real-scale recipe of METHOD.md §4 (real teacher checkpoints, resolutions 128..1152).

Keys are dotted paths: ``optim.lr``, ``data.low_resolutions``, ``teachers.dinov3.name_or_path``,
``student.model.window_size`` (any ``RadioConfig`` field). ``--set`` values are parsed as TOML
values (``1e-3``, ``[64, 96]``, ``true``, ``"text"``); a bare word that is not TOML is taken as a
string, and ``none`` clears an optional field. An unknown key raises a ``ValueError`` that lists
every valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import tomllib

__all__ = [
    "DampConfig",
    "DataConfig",
    "FidelityConfig",
    "LoraConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "VitdetTrainConfig",
    "apply_overrides",
    "check_resume_compatible",
    "check_runtime",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "to_toml",
    "valid_keys",
]

TEACHER_KINDS = ("siglip2", "dinov3", "sam3", "hf", "timm")
TEACHER_SUMMARIES = ("auto", "cls", "pooler", "none")
HIGH_RES_MODES = ("auto", "plain", "tile", "mosaic", "resize", "featsharp")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
LOSS_BACKENDS = ("auto", "triton", "torch")
# Seeds feed numpy's SeedSequence (non-negative only) and torch generators (64-bit, and the DAMP
# stream's seed is run.seed * 1_000_003 + 29): 32-bit seeds fit every use.
MAX_SEED = 2**32 - 1
FREEZE_MODES = ("none", "backbone")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
DAMP_SIGMA = 0.1  # the c-radiov4 preset's damp.sigma (see _c_radiov4)


@dataclass
class TeacherConfig:
    """One teacher. ``name_or_path=None`` builds ``radio.teachers.tiny_teacher(kind, seed)``.

    ``high_res_mode`` says how the teacher meets the student on the high partition:
    "auto" = "tile" for SigLIP2 (FeatSharp tiles), "mosaic" for fixed-size teachers (SAM3),
    "plain" otherwise. Low-partition views always run plain (or mosaic when the teacher only
    takes one size). "resize" is the fallback for fixed-size teachers whose canvas is smaller
    than the view: the student's crop is resized to the canvas, the student features are
    resampled bilinearly onto the teacher grid and that teacher sees no relative shift.
    "featsharp": the high-partition target is the output of the trained FeatSharp upsampler in the
    folder ``featsharp`` (``radio featsharp train --out DIR``; radio.train.featsharp_view).
    """

    kind: str = ""
    name_or_path: str | None = None
    enabled: bool = True
    spatial_weight: float = 1.0
    summary_weight: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    head: str = "mlp"
    high_res_mode: str = "auto"
    # How a loaded teacher runs: transformers' attention implementation, and torch.compile (teachers
    # are frozen and run every step at a few fixed shapes, so compiling pays off on long runs).
    attn_implementation: str = "sdpa"
    compile: bool = False
    # With student.init_from: the source model's adaptor head to start this teacher's head from.
    # None: the head named like this teacher, when the source has one; "": always a new head.
    init_head: str | None = None
    # Kinds "hf" / "timm" only (radio.teachers.generic; name_or_path required): the hidden layer to
    # read (hf; None = the final output), the leading tokens to drop (None = all but the patch grid
    # for hf, the model's num_prefix_tokens for timm), the summary ("auto": "cls" for hf, "pooler" for timm).
    layer: int | None = None
    prefix_tokens: int | None = None
    summary: str = "auto"
    featsharp: str | None = None  # folder (or .pt file) of a FeatSharp upsampler, for high_res_mode="featsharp"


@dataclass
class LoraConfig:
    """LoRA on the backbone's linear layers (radio.model.lora): W x + (alpha / rank) B A x, B = 0 at start."""

    rank: int = 0  # 0 = off
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # Linear names inside the blocks


@dataclass
class VitdetTrainConfig:
    """ViTDet-mode training (radio.train.vitdet_train): a fraction ``prob`` of the micro-batches run the
    student with windowed attention, window size drawn from ``window_sizes``, prefix tokens handled as
    ``prefix_mode`` ("replicate": the report's training convention; "global", "skip"). Non-empty
    ``window_sizes`` also adds windowed inference (``window_sizes[0]``, ``prefix_mode``) to the fidelity.
    Meant for a global student (no ``student.model.window_size``, so any multiple of the patch trains);
    with a configured window the other micro-batches run that window."""

    prob: float = 0.0
    window_sizes: list[int] = field(default_factory=list)
    prefix_mode: str = "replicate"


@dataclass
class StudentConfig:
    """The student: ``RadioConfig.preset(preset)`` updated with ``model`` (RadioConfig fields), or the
    model in ``init_from`` (radio.train.init_from), then ``freeze`` / ``lora`` (radio.train.adapt)."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    # The student's own training-time CPE randomness (random position-table crops, position
    # dropout). Off = the student runs its CPE as at inference (an ablation). Either way DDP matches
    # one process: each sample's crop comes from its own seed (Batch.cpe_uniforms).
    cpe_augmentation: bool = True
    # Recompute each block's activations in backward (memory for compute); works with DAMP, whose
    # noise is replayed exactly in the recomputation.
    grad_checkpointing: bool = False
    # An NVlabs/RADIO checkpoint file or a RadioModel.from_pretrained folder: start from its weights.
    init_from: str | None = None
    freeze: str = "none"  # "none" | "backbone" (only the adaptor heads, and LoRA factors, train)
    lora: LoraConfig = field(default_factory=LoraConfig)
    vitdet_train: VitdetTrainConfig = field(default_factory=VitdetTrainConfig)


@dataclass
class DataConfig:
    """Images, crops, shifts and resolutions (METHOD.md §4)."""

    image_dir: str | None = None  # None: the images bundled with scikit-image
    # Webdataset tar shards instead of image_dir: a folder of .tar, one .tar or "prefix-{000000..000999}.tar"
    # (radio.data.loader: streaming, per-rank shards, exact resume; `radio data pack` writes them).
    shards: str | None = None
    shuffle_buffer: int = 256  # shards: samples shuffled together, per stream (held in memory, encoded)
    shard_streams: int = 0  # shards: independent sample streams; 0 = batch_size. Ranks must divide it.
    holdout: int = 3  # images held out for the fidelity measurement
    batch_size: int = 8  # global batch per micro-step (split across DDP ranks)
    num_workers: int = 1
    min_image_side: int = 32  # smaller images are skipped (and counted)
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # base crop / short side
    shift_std: float = 0.5  # per-axis shift = patch * round(N(0, shift_std))
    max_shift: int = 2  # cap on |shift| in patches
    low_resolutions: list[int] = field(default_factory=lambda: [64, 80, 96])
    high_resolutions: list[int] = field(default_factory=lambda: [112, 128])
    high_prob: float = 0.25  # probability that a micro-step samples the high partition ("rank": its weight)
    # "step": each micro-step trains one partition (high with probability high_prob). "rank": every
    # micro-step trains both, batch_size low and high_batch_size high images, the objective weighted
    # (1 - high_prob, high_prob); rank groups with several processes, in turn on one (radio.train.partitions).
    partition_mode: str = "step"
    high_batch_size: int = 2  # "rank" mode: global batch of the high partition per micro-step
    high_ranks: int = 0  # "rank" mode: ranks training the high partition; 0 = round(world * high_prob)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 20
    grad_clip: float = 1.0  # 0 = off
    accum_steps: int = 1


@dataclass
class LossConfig:
    mesa_weight: float = 1.0
    ema_decay: float = 0.99  # the real recipe uses 0.9996 (preset "c-radiov4")
    # PHI-S refits change the target basis, so statistics are frozen early. The real recipe
    # (preset "c-radiov4") refreshes every 100 steps and freezes after 3000 of 600k; the tiny demo
    # scales that down to its 400 steps.
    phis_refresh_every: int = 20
    phis_freeze_after: int = 100
    # Summary dispersion: the first samples only fit the mean direction (a fit to few samples lies
    # close to each of them and underestimates Disp); until then Disp = 1.
    dispersion_warmup_samples: int = 32
    backend: str = "auto"  # radio_kernels backend for every loss


@dataclass
class DampConfig:
    """DAMP: multiplicative weight noise W * (1 + sigma * eps) on the student's Linear weights."""

    sigma: float = 0.0  # 0 = off
    schedule: str = "cosine"  # sigma annealed to 0: "cosine" | "linear" | "constant"


@dataclass
class FidelityConfig:
    enabled: bool = True
    resolution: int = 96
    crops_per_image: int = 4
    seed: int = 1234


@dataclass
class RunConfig:
    steps: int = 400
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    out: str = "runs/demo"
    log_every: int = 1
    checkpoint_every: int = 100
    keep_last: int = 3
    compile: bool = False
    amp: str = "auto"  # "auto" (bf16 on CUDA) | "bf16" | "off"
    # torch intra-op CPU threads; 0 = torch's default. The tiny demo runs fastest single-threaded
    # (its ops are too small to split, and the data worker gets the other core).
    threads: int = 1
    # A step whose loss or gradient norm is NaN / Inf is never applied. "stop": end the run (non-zero
    # exit, naming the step and the term; the last good checkpoint stays). "skip": drop the step, count
    # it in metrics.jsonl, and stop after max_skipped consecutive skips.
    nonfinite: str = "stop"
    max_skipped: int = 10
    # "ddp": replicated student, one checkpoint file. "fsdp": FSDP2-sharded student, EMA and AdamW
    # moments, sharded checkpoints (torch.distributed.checkpoint) resumable at another world size.
    parallel: str = "ddp"
    tensorboard: bool = False  # also log metrics to <run>/tensorboard (pip install 'radio-train[tensorboard]')


def _default_teachers() -> dict[str, TeacherConfig]:
    return {
        "siglip2": TeacherConfig(kind="siglip2"),
        "dinov3": TeacherConfig(kind="dinov3"),
        "sam3": TeacherConfig(kind="sam3", summary_weight=0.0),
    }


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=_default_teachers)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    damp: DampConfig = field(default_factory=DampConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    @staticmethod
    def preset(name: str) -> TrainConfig:
        """The preset "tiny" (the demo default) or "c-radiov4" (the real-scale recipe of METHOD.md)."""
        if name == "tiny":
            return TrainConfig()
        if name == "c-radiov4":
            return _c_radiov4()
        raise ValueError(f"preset must be one of ['tiny', 'c-radiov4'], got {name!r}")

    def enabled_teachers(self) -> dict[str, TeacherConfig]:
        return {name: t for name, t in self.teachers.items() if t.enabled}

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_positive(self.run, "run", ("steps", "log_every", "checkpoint_every", "keep_last"))
        _check_choice("run.device", self.run.device, ("auto", "cpu", "cuda"))
        _check_choice("run.amp", self.run.amp, ("auto", "bf16", "off"))
        _check_choice("run.nonfinite", self.run.nonfinite, ("stop", "skip"))
        _check_choice("run.parallel", self.run.parallel, ("ddp", "fsdp"))
        _check_positive(self.run, "run", ("max_skipped",))
        if self.run.tensorboard:
            _check_tensorboard()
        if self.run.threads < 0:
            raise ValueError(f"run.threads must be >= 0, got {self.run.threads}")
        _check_seed("run.seed", self.run.seed)
        _check_seed("fidelity.seed", self.fidelity.seed)
        d = self.data
        _check_positive(d, "data", ("batch_size", "min_image_side"))
        if d.num_workers < 0 or d.holdout < 0 or d.max_shift < 0 or d.shift_std < 0:
            raise ValueError("data.num_workers, data.holdout, data.max_shift and data.shift_std must be >= 0")
        if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
        if d.shards is not None and d.image_dir is not None:
            raise ValueError(
                "data.shards and data.image_dir are both set; give one source of images "
                "(e.g. --set data.image_dir=none to train from shards)"
            )
        _check_positive(d, "data", ("shuffle_buffer",))
        if (
            not isinstance(d.shard_streams, int)
            or d.shard_streams < 0
            or (d.shard_streams and d.batch_size % d.shard_streams)
        ):
            raise ValueError(f"data.shard_streams must be 0 or divide data.batch_size, got {d.shard_streams!r}")
        if not 0 <= d.high_prob <= 1:
            raise ValueError(f"data.high_prob must be in [0, 1], got {d.high_prob}")
        if not d.low_resolutions and not d.high_resolutions:
            raise ValueError("data.low_resolutions and data.high_resolutions are both empty")
        if (d.high_prob > 0 and not d.high_resolutions) or (d.high_prob < 1 and not d.low_resolutions):
            raise ValueError("data.high_prob gives weight to an empty resolution partition")
        _check_choice("data.partition_mode", d.partition_mode, ("step", "rank"))
        if d.partition_mode == "rank":
            if d.shards is not None:
                raise ValueError(
                    "data.partition_mode='rank' is not available with data.shards yet (the shard streams serve one "
                    "partition per micro-step); use --set data.partition_mode=step"
                )
            _check_positive(d, "data", ("high_batch_size",))
            if not 0 < d.high_prob < 1:
                raise ValueError(
                    f"data.partition_mode='rank' trains both partitions: data.high_prob must be in (0, 1), "
                    f"got {d.high_prob}"
                )
        if d.high_ranks < 0:
            raise ValueError(f"data.high_ranks must be >= 0, got {d.high_ranks}")
        for r in [*d.low_resolutions, *d.high_resolutions]:
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"data resolutions must be positive ints, got {r!r}")
        o = self.optim
        if not (o.lr > 0 and 0 <= o.min_lr_ratio <= 1 and o.weight_decay >= 0 and o.grad_clip >= 0):
            raise ValueError(f"optim: need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, grad_clip >= 0: {o}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        _check_positive(o, "optim", ("accum_steps",))
        if o.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if not 0 <= self.loss.ema_decay < 1:
            raise ValueError(f"loss.ema_decay must be in [0, 1), got {self.loss.ema_decay}")
        _check_positive(self.loss, "loss", ("phis_refresh_every", "phis_freeze_after", "dispersion_warmup_samples"))
        _check_choice("loss.backend", self.loss.backend, LOSS_BACKENDS)
        if self.loss.mesa_weight < 0:
            raise ValueError(f"loss.mesa_weight must be >= 0, got {self.loss.mesa_weight}")
        _check_choice("damp.schedule", self.damp.schedule, ("cosine", "linear", "constant"))
        if self.damp.sigma < 0:
            raise ValueError(f"damp.sigma must be >= 0, got {self.damp.sigma}")
        _check_positive(self.fidelity, "fidelity", ("resolution", "crops_per_image"))
        _check_choice("student.freeze", self.student.freeze, FREEZE_MODES)
        lora = self.student.lora
        if not isinstance(lora.rank, int) or lora.rank < 0:
            raise ValueError(f"student.lora.rank must be an int >= 0 (0 = off), got {lora.rank!r}")
        if not lora.alpha > 0:
            raise ValueError(f"student.lora.alpha must be > 0, got {lora.alpha!r}")
        if not lora.targets or any(t not in LORA_TARGETS for t in lora.targets):
            raise ValueError(
                f"student.lora.targets must be a non-empty subset of {list(LORA_TARGETS)}, got {lora.targets}"
            )
        v = self.student.vitdet_train
        if not 0 <= v.prob <= 1:
            raise ValueError(f"student.vitdet_train.prob must be in [0, 1], got {v.prob}")
        _check_choice("student.vitdet_train.prefix_mode", v.prefix_mode, ("replicate", "global", "skip"))
        if any(not isinstance(w, int) or isinstance(w, bool) or w <= 0 for w in v.window_sizes):
            raise ValueError(f"student.vitdet_train.window_sizes must be positive ints, got {v.window_sizes}")
        if v.prob > 0 and not v.window_sizes:
            raise ValueError("student.vitdet_train.prob > 0 needs student.vitdet_train.window_sizes")
        if not self.enabled_teachers():
            raise ValueError("teachers: at least one teacher must be enabled")
        for name, t in self.teachers.items():
            if not name or "." in name or name == "backbone":
                raise ValueError(f"teachers: bad teacher name {name!r} (non-empty, no '.', not 'backbone')")
            _check_choice(f"teachers.{name}.kind", t.kind, TEACHER_KINDS)
            _check_choice(f"teachers.{name}.dtype", t.dtype, DTYPES)
            _check_choice(f"teachers.{name}.head", t.head, ("mlp", "attn"))
            _check_choice(f"teachers.{name}.high_res_mode", t.high_res_mode, HIGH_RES_MODES)
            _check_choice(f"teachers.{name}.attn_implementation", t.attn_implementation, ATTN_IMPLEMENTATIONS)
            _check_choice(f"teachers.{name}.summary", t.summary, TEACHER_SUMMARIES)
            if t.kind in ("hf", "timm") and t.enabled and not t.name_or_path:
                raise ValueError(f"teachers.{name}: kind {t.kind!r} needs name_or_path (a model name or folder)")
            if t.high_res_mode == "featsharp" and (t.featsharp is None or t.kind == "sam3"):
                raise ValueError(
                    f"teachers.{name}.high_res_mode='featsharp' needs teachers.{name}.featsharp = DIR "
                    "(from `radio featsharp train`) and a teacher of any input size (not sam3)"
                )
            if t.spatial_weight < 0 or t.summary_weight < 0:
                raise ValueError(f"teachers.{name}: loss weights must be >= 0")
            _check_seed(f"teachers.{name}.seed", t.seed)
            if t.name_or_path is not None and not t.name_or_path.strip():
                raise ValueError(f"teachers.{name}.name_or_path must be none or a non-empty path / hub id")
        _check_student(self.student)


def _check_positive(obj, prefix: str, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{prefix}.{name} must be a positive int, got {value!r}")


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ValueError(
            "run.tensorboard = true needs the tensorboard package: pip install 'radio-train[tensorboard]' "
            "(or pip install tensorboard), or set run.tensorboard = false"
        ) from None


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_seed(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{key} must be an int in [0, 2**32 - 1], got {value!r}")


def _check_student(student: StudentConfig) -> None:
    """The student's architecture, checked now (not when the trainer builds it, after the run
    directory exists): ``RadioConfig.preset(student.preset, **student.model)`` must be valid."""
    try:
        from radio.model.config import RadioConfig
    except ImportError:  # the model package is optional for reading configs
        return
    if student.preset not in RadioConfig.preset_names():
        raise ValueError(f"student.preset must be one of {RadioConfig.preset_names()}, got {student.preset!r}")
    # The trainer picks summary_idxs from the teachers (radio.train.build) unless the config sets them.
    model = {"summary_idxs": [0], **student.model}
    try:
        RadioConfig.preset(student.preset, **model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"student.model: {e}") from e


def check_runtime(cfg: TrainConfig) -> None:
    """What ``validate`` cannot see in a config file: is ``run.device`` there, and can ``loss.backend``
    run on it? Called before anything is written (``radio train`` calls it before ``train``).

    ``loss.backend="triton"`` needs CUDA, or the Triton interpreter (``TRITON_INTERPRET=1``) switched
    on before ``radio_kernels`` was imported; "auto" always has a backend.
    """
    import torch

    from radio_kernels._backend import triton_unavailable_reason

    device = cfg.run.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA device is available; use run.device='cpu' or 'auto'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.loss.backend == "triton" and (reason := triton_unavailable_reason(torch.device(device))):
        raise ValueError(f"loss.backend='triton' cannot run on run.device={device!r}: {reason}")


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Raise ValueError when ``cfg`` cannot continue a run whose checkpoint holds ``saved`` (the
    checkpoint's ``config`` dict): the checkpoint carries one adaptor head, PHI-S and dispersion
    state per enabled teacher, and the student's architecture, so these must be unchanged."""
    if not isinstance(saved, dict):
        raise TypeError(f"saved must be the checkpoint's config dict, got {type(saved).__name__}")
    was = {n for n, t in saved.get("teachers", {}).items() if t.get("enabled", True)}
    now = set(cfg.enabled_teachers())
    for name in sorted(was - now):
        reason = "disabled" if name in cfg.teachers else "removed"
        raise ValueError(
            f"cannot resume: teacher {name!r} was trained in this run but is now {reason} "
            f"(teachers.{name}.enabled); the checkpoint holds its adaptor head and statistics"
        )
    for name in sorted(now - was):
        raise ValueError(
            f"cannot resume: teacher {name!r} is enabled but was not part of this run "
            f"(set teachers.{name}.enabled=false, or start a new run)"
        )
    for name in sorted(now):
        old, new = saved["teachers"][name], cfg.teachers[name]
        for key in ("kind", "name_or_path", "head"):
            if key in old and old[key] != getattr(new, key):
                raise ValueError(
                    f"cannot resume: teachers.{name}.{key} changed from {old[key]!r} to {getattr(new, key)!r}"
                )
    student = saved.get("student", {})
    for key, value in (("preset", cfg.student.preset), ("model", cfg.student.model)):
        if key in student and student[key] != value:
            raise ValueError(f"cannot resume: student.{key} changed from {student[key]!r} to {value!r}")


# Where the c-radiov4 preset looks for SigLIP2's FeatSharp upsampler (teachers.siglip2.featsharp).
FEATSHARP_SIGLIP2 = "featsharp/siglip2-g-384-3x"


def _c_radiov4() -> TrainConfig:
    """Real-scale recipe (METHOD.md §4): SO400M student, real teachers, 128..1152 px.

    README "The recipe" lists every value with its source (report, official code, or project choice).
    """
    cfg = TrainConfig()
    # No final LayerNorm: the released C-RADIO models have none (their timm norm is an identity).
    # ViTDet-mode training as an augmentation, prefix tokens replicated per window (report); windows of
    # 8 (the report's timing) and 16 (RADIOv2.5's ViTDet evaluation); the fraction is ours.
    cfg.student = StudentConfig(
        preset="so400m",
        model={"final_norm": False},
        vitdet_train=VitdetTrainConfig(prob=0.25, window_sizes=[8, 16], prefix_mode="replicate"),
    )
    cfg.teachers = {
        # head="attn": the v4 spatial head (2 transformer blocks, then MLP2; METHOD.md §2).
        # High partition: FeatSharp 3x (384 -> 1152 px). Expects FEATSHARP_SIGLIP2/featsharp.pt, made by
        # radio featsharp train --teacher siglip2 --name-or-path google/siglip2-giant-opt-patch16-384 \
        #     --dtype bfloat16 --factor 3 --image-dir /path/to/images --out featsharp/siglip2-g-384-3x
        # (training refuses to start, naming this key and that command, while the file is missing).
        "siglip2": TeacherConfig(
            kind="siglip2",
            name_or_path="google/siglip2-giant-opt-patch16-384",
            dtype="bfloat16",
            head="attn",
            high_res_mode="featsharp",
            featsharp=FEATSHARP_SIGLIP2,
        ),
        "dinov3": TeacherConfig(
            kind="dinov3", name_or_path="facebook/dinov3-vit7b16-pretrain-lvd1689m", dtype="bfloat16", head="attn"
        ),
        "sam3": TeacherConfig(
            kind="sam3", name_or_path="facebook/sam3", dtype="bfloat16", summary_weight=0.0, head="attn"
        ),
    }
    cfg.data = DataConfig(
        image_dir="/path/to/images",
        holdout=16,
        batch_size=1024,
        num_workers=8,
        min_image_side=128,
        low_resolutions=[128, 192, 224, 256, 384, 432],
        high_resolutions=[512, 768, 1024, 1152],
        high_prob=0.25,
        # Both partitions in every step, on rank groups (RADIOv2.5 onward). 32 high-resolution images
        # against 1024 low ones give the two groups about the same tokens per rank (ours).
        partition_mode="rank",
        high_batch_size=32,
    )
    cfg.optim = OptimConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=5000, grad_clip=1.0)
    cfg.loss = LossConfig(ema_decay=0.9996, phis_refresh_every=100, phis_freeze_after=3000)
    # No public value of sigma (the official code's DAMP hook is an identity placeholder): ours, from
    # bench/experiments/damp_robustness.py (README "Experiments").
    cfg.damp = DampConfig(sigma=DAMP_SIGMA, schedule="cosine")
    cfg.fidelity = FidelityConfig(resolution=432)
    cfg.run = RunConfig(
        steps=600_000, out="runs/c-radiov4", log_every=10, checkpoint_every=2000, keep_last=3, threads=0
    )
    return cfg


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass tree
# ----------------------------------------------------------------------------------------------


def config_to_dict(cfg) -> dict[str, Any]:
    """Plain nested dict (None values kept)."""
    return dataclasses.asdict(cfg)


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    """(inner type, allows None) for ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _coerce(key: str, value, tp):
    """Check/convert ``value`` to the annotated type ``tp`` (TypeError naming ``key`` otherwise)."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise TypeError(f"{key} cannot be none (expected {_type_name(inner)})")
    origin = typing.get_origin(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(inner)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(f"{key}: unsupported field type {inner}")
    raise TypeError(f"{key} must be {_type_name(inner)}, got {value!r}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def _fill(obj, data: dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from ``data`` (unknown keys: ValueError listing valid ones)."""
    hints = _section_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise _bad_key(path)
        if dataclasses.is_dataclass(getattr(obj, key)) and not isinstance(getattr(obj, key), type):
            if not isinstance(value, dict):
                raise TypeError(f"{path} must be a table, got {value!r}")
            _fill(getattr(obj, key), value, f"{path}.")
        elif path == "teachers":
            if not isinstance(value, dict):
                raise TypeError(f"teachers must be a table of teacher tables, got {value!r}")
            teachers = {}
            for name, tdata in value.items():
                if not isinstance(tdata, dict):
                    raise TypeError(f"teachers.{name} must be a table, got {tdata!r}")
                t = TeacherConfig()
                _fill(t, tdata, f"teachers.{name}.")
                teachers[name] = t
            obj.teachers = teachers
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (missing keys keep ``base``'s / the defaults)."""
    cfg = copy.deepcopy(base) if base is not None else TrainConfig()
    _fill(cfg, data, "")
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------
# valid keys and --set overrides
# ----------------------------------------------------------------------------------------------


def _radio_config_fields() -> list[str]:
    try:
        from radio.model.config import RadioConfig
    except ImportError:  # the model package is optional for reading configs
        return []
    return [f.name for f in dataclasses.fields(RadioConfig)]


def valid_keys(cfg: TrainConfig | None = None) -> list[str]:
    """Every dotted key ``--set`` accepts (teacher keys for the teachers ``cfg`` defines)."""
    cfg = cfg if cfg is not None else TrainConfig()
    keys = []
    for section in dataclasses.fields(TrainConfig):
        if section.name == "teachers":
            for name in cfg.teachers:
                keys += [f"teachers.{name}.{f.name}" for f in dataclasses.fields(TeacherConfig)]
        elif section.name == "student":
            keys += ["student.preset", "student.cpe_augmentation", "student.grad_checkpointing"]
            keys += ["student.init_from", "student.freeze"]
            keys += [f"student.lora.{f.name}" for f in dataclasses.fields(LoraConfig)]
            keys += [f"student.vitdet_train.{f.name}" for f in dataclasses.fields(VitdetTrainConfig)]
            keys += [f"student.model.{f}" for f in _radio_config_fields()]
        else:
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, section.name))]
    return keys


def _bad_key(key: str, cfg: TrainConfig | None = None) -> ValueError:
    listing = "\n  ".join(valid_keys(cfg))
    return ValueError(f"unknown config key {key!r}; valid keys are:\n  {listing}")


def parse_value(text: str):
    """A ``--set`` value: TOML syntax when it parses (numbers, lists, booleans, quoted strings),
    ``none``/``null`` for None, and the raw text as a string otherwise."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings to a copy of ``cfg``; validate; return it."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        value = parse_value(text)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "teachers":
            _, name, fname = parts
            if fname not in {f.name for f in dataclasses.fields(TeacherConfig)}:
                raise _bad_key(key, cfg)
            # A new name adds a teacher (its kind must then be set too).
            teacher = cfg.teachers.setdefault(name, TeacherConfig())
            setattr(teacher, fname, _coerce(key, value, _section_types(TeacherConfig)[fname]))
        elif len(parts) == 3 and parts[:2] == ["student", "model"]:
            if parts[2] not in _radio_config_fields():
                raise _bad_key(key, cfg)
            cfg.student.model[parts[2]] = value
        elif len(parts) == 3 and parts[:2] == ["student", "lora"]:
            hints = _section_types(LoraConfig)
            if parts[2] not in hints:
                raise _bad_key(key, cfg)
            setattr(cfg.student.lora, parts[2], _coerce(key, value, hints[parts[2]]))
        elif len(parts) == 3 and parts[:2] == ["student", "vitdet_train"]:
            hints = _section_types(VitdetTrainConfig)
            if parts[2] not in hints:
                raise _bad_key(key, cfg)
            setattr(cfg.student.vitdet_train, parts[2], _coerce(key, value, hints[parts[2]]))
        elif len(parts) == 2 and parts[0] in {f.name for f in dataclasses.fields(TrainConfig)} - {"teachers"}:
            section = getattr(cfg, parts[0])
            hints = _section_types(type(section))
            if parts[1] not in hints or parts[1] in ("model", "lora", "vitdet_train"):
                raise _bad_key(key, cfg)
            setattr(section, parts[1], _coerce(key, value, hints[parts[1]]))
        else:
            raise _bad_key(key, cfg)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------
# TOML files
# ----------------------------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_table(lines: list[str], header: str, table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if header:
        lines.append(f"\n[{header}]")
    for key, value in scalars.items():
        # TOML has no null: an unset optional field is written as a comment and read back as the
        # default, which is None for every optional field of this tree.
        lines.append(f"# {key} = none" if value is None else f"{key} = {_toml_value(value)}")
    for key, sub in tables.items():
        _toml_table(lines, f"{header}.{key}" if header else key, sub)


def to_toml(cfg: TrainConfig) -> str:
    lines: list[str] = ["# radio train configuration (radio/train/config.py documents every key)"]
    _toml_table(lines, "", config_to_dict(cfg))
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        f.write(to_toml(cfg))


def load_config(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML file over ``base`` (default: the embedded defaults)."""
    if not os.path.isfile(path):
        problem = "is not a file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"config file {str(path)!r} {problem}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    return config_from_dict(data, base)
