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
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "VitdetTrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "to_toml",
    "valid_keys",
]

TEACHER_KINDS = ("siglip2", "dinov3", "sam3")
HIGH_RES_MODES = ("auto", "plain", "tile", "mosaic", "resize")
DTYPES = ("float32", "bfloat16", "float16")
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
    """The student: ``RadioConfig.preset(preset)`` updated with ``model`` (RadioConfig fields)."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    # The student's own training-time CPE randomness (random position-table crops, position
    # dropout). Off = the student runs its CPE as at inference (an ablation). Either way DDP matches
    # one process: each sample's crop comes from its own seed (Batch.cpe_uniforms).
    cpe_augmentation: bool = True
    # Recompute each block's activations in backward (memory for compute); works with DAMP, whose
    # noise is replayed exactly in the recomputation.
    grad_checkpointing: bool = False
    vitdet_train: VitdetTrainConfig = field(default_factory=VitdetTrainConfig)


@dataclass
class DataConfig:
    """Images, crops, shifts and resolutions (METHOD.md §4)."""

    image_dir: str | None = None  # None: the images bundled with scikit-image
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
        if self.run.threads < 0:
            raise ValueError(f"run.threads must be >= 0, got {self.run.threads}")
        d = self.data
        _check_positive(d, "data", ("batch_size", "min_image_side"))
        if d.num_workers < 0 or d.holdout < 0 or d.max_shift < 0 or d.shift_std < 0:
            raise ValueError("data.num_workers, data.holdout, data.max_shift and data.shift_std must be >= 0")
        if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
        if not 0 <= d.high_prob <= 1:
            raise ValueError(f"data.high_prob must be in [0, 1], got {d.high_prob}")
        if not d.low_resolutions and not d.high_resolutions:
            raise ValueError("data.low_resolutions and data.high_resolutions are both empty")
        if (d.high_prob > 0 and not d.high_resolutions) or (d.high_prob < 1 and not d.low_resolutions):
            raise ValueError("data.high_prob gives weight to an empty resolution partition")
        _check_choice("data.partition_mode", d.partition_mode, ("step", "rank"))
        if d.partition_mode == "rank":
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
        _check_choice("damp.schedule", self.damp.schedule, ("cosine", "linear", "constant"))
        if self.damp.sigma < 0:
            raise ValueError(f"damp.sigma must be >= 0, got {self.damp.sigma}")
        _check_positive(self.fidelity, "fidelity", ("resolution", "crops_per_image"))
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
            if t.spatial_weight < 0 or t.summary_weight < 0:
                raise ValueError(f"teachers.{name}: loss weights must be >= 0")


def _check_positive(obj, prefix: str, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{prefix}.{name} must be a positive int, got {value!r}")


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


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
        "siglip2": TeacherConfig(
            kind="siglip2", name_or_path="google/siglip2-giant-opt-patch16-384", dtype="bfloat16", head="attn"
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
        elif len(parts) == 3 and parts[:2] == ["student", "vitdet_train"]:
            hints = _section_types(VitdetTrainConfig)
            if parts[2] not in hints:
                raise _bad_key(key, cfg)
            setattr(cfg.student.vitdet_train, parts[2], _coerce(key, value, hints[parts[2]]))
        elif len(parts) == 2 and parts[0] in {f.name for f in dataclasses.fields(TrainConfig)} - {"teachers"}:
            section = getattr(cfg, parts[0])
            hints = _section_types(type(section))
            if parts[1] not in hints or parts[1] in ("model", "vitdet_train"):
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
        raise ValueError(f"config file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    return config_from_dict(data, base)
