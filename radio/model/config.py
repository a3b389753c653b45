"""Configuration of the student ViT: ``RadioConfig`` (backbone) and ``AdaptorSpec`` (teacher heads).

Both are plain dataclasses that validate themselves on construction and round-trip through JSON
(``to_dict`` / ``from_dict``), which is what ``RadioModel.save_pretrained`` stores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

VITDET_PREFIX_MODES = ("skip", "global", "replicate")
ATTENTION_BACKENDS = ("auto", "triton", "torch")
INTERMEDIATE_NORMALIZERS = ("none", "shared", "per_block")
ADAPTOR_HEADS = ("mlp", "attn")
FFN_KINDS = ("mlp", "swiglu")

# C-RADIOv4 prefix layout: one CLS token per teacher (SigLIP2, DINOv3, SAM3) plus registers up to a
# multiple of 10; the backbone summary concatenates the CLS tokens of the teachers that have a summary.
_V4_PREFIX = dict(num_cls_tokens=3, num_registers=7, summary_idxs=[0, 1])

_PRESETS: dict[str, dict[str, Any]] = {
    # A few milliseconds per image on a CPU: for tests, demos and smoke runs. num_global=2 makes
    # blocks 1 and 3 global, 0 and 2 windowed, so the ViTDet path is exercised with only 4 blocks.
    "tiny": dict(embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.0, layer_scale=0.1, cpe_max_size=1024, num_global=2),
    "vit-b": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit-l": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_dim=4304),
    "h": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}


@dataclass
class RadioConfig:
    """Hyper-parameters of the student backbone.

    The MLP hidden width is ``mlp_dim`` when given, else ``round(embed_dim * mlp_ratio)`` (C-RADIOv4-SO400M's
    4304 is not an integer multiple of 1152, hence the explicit field). Prefix tokens are
    ``num_cls_tokens`` CLS tokens followed by ``num_registers`` registers; ``summary_idxs`` picks the CLS
    tokens whose concatenation is the backbone summary.

    ViTDet: with ``window_size`` set, blocks not in ``global_blocks`` attend inside non-overlapping
    ``window_size x window_size`` token windows. ``global_blocks=None`` means the default schedule with
    ``num_global`` global blocks: ``period = depth // num_global``, block ``i`` is global when
    ``i % period == period - 1``, and the last block is always global (ViT-B: 2, 5, 8, 11; H: 7, 15, 23, 31).
    ``vitdet_prefix`` says what windowed blocks do with prefix tokens (see ``radio.model.vitdet``).

    ``final_norm``: a LayerNorm (eps 1e-6) applied to all output tokens. Official RADIO checkpoints are
    trained without one (their timm ``norm`` is replaced by an identity), so loading them sets it False.

    ``feature_normalizer``: a fixed affine whitening ``y = (x - mean) @ tx^T`` of the output patch tokens
    after the final norm, before the features and the adaptor feature heads; the backbone summary and the
    adaptor summary heads read the un-normalised CLS tokens (as in the official models). Official
    checkpoints that store a ``_feature_normalizer`` carry it, and loading them turns it on with their
    ``mean`` / ``tx``.

    ``intermediate_normalizer``: "none", or a fixed per-block whitening of the patch tokens that
    ``forward_intermediates`` returns (``radio.model.embed.IntermediateNormalizer``) with one rotation
    shared by all blocks ("shared") or one per block ("per_block"); official checkpoints that store an
    ``inter_feature_normalizer`` carry it.

    ``ffn``: the blocks' feed-forward, "mlp" (Linear, GELU, Linear) or "swiglu"
    (``down(silu(gate(x)) * up(x))``, hidden width ``hidden_dim``), which transformers' RADIO port offers.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    patch_size: int = 16
    qkv_bias: bool = True
    layer_scale: float | None = None
    num_cls_tokens: int = 3
    num_registers: int = 7
    summary_idxs: list[int] = field(default_factory=lambda: [0, 1])
    cpe_max_size: int = 2048
    pos_dropout: float = 0.1
    window_size: int | None = None
    global_blocks: list[int] | None = None
    num_global: int = 4
    vitdet_prefix: str = "skip"
    attention_backend: str = "auto"
    final_norm: bool = True
    feature_normalizer: bool = False
    intermediate_normalizer: str = "none"
    ffn: str = "mlp"

    def __post_init__(self) -> None:
        for name in ("summary_idxs", "global_blocks"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise TypeError(f"RadioConfig.{name} must be a list of ints, got {value!r}")
        self.summary_idxs = list(self.summary_idxs)
        if self.global_blocks is not None:
            self.global_blocks = sorted(set(self.global_blocks))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("qkv_bias", "final_norm", "feature_normalizer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RadioConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("num_cls_tokens", "num_registers", "mlp_dim", "window_size"):
            if isinstance(getattr(self, name), bool):  # an int subclass: True would mean 1
                raise ValueError(f"RadioConfig.{name} must be an int, got {getattr(self, name)!r}")
        for name in ("summary_idxs", "global_blocks"):
            if any(isinstance(i, bool) for i in getattr(self, name) or ()):
                raise ValueError(f"RadioConfig.{name} must hold ints, got {getattr(self, name)!r}")
        for name in ("mlp_ratio", "layer_scale", "pos_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"RadioConfig.{name} must be a finite number, got {value!r}")

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RadioConfig.{name} must be a positive int, got {value!r}")

        for name in ("embed_dim", "depth", "num_heads", "patch_size", "cpe_max_size", "num_global"):
            positive_int(name)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"RadioConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.mlp_dim is not None:
            positive_int("mlp_dim")
        elif not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"RadioConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float)) and self.layer_scale > 0):
            raise ValueError(f"RadioConfig.layer_scale must be None or a positive float, got {self.layer_scale!r}")
        if not isinstance(self.num_cls_tokens, int) or self.num_cls_tokens < 1:
            raise ValueError(f"RadioConfig.num_cls_tokens must be an int >= 1, got {self.num_cls_tokens!r}")
        if not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ValueError(f"RadioConfig.num_registers must be an int >= 0, got {self.num_registers!r}")
        if not self.summary_idxs or any(
            not isinstance(i, int) or not 0 <= i < self.num_cls_tokens for i in self.summary_idxs
        ):
            raise ValueError(
                f"RadioConfig.summary_idxs must be a non-empty list of CLS indices in [0, {self.num_cls_tokens}), "
                f"got {self.summary_idxs!r}"
            )
        if len(set(self.summary_idxs)) != len(self.summary_idxs):
            raise ValueError(f"RadioConfig.summary_idxs must not repeat an index, got {self.summary_idxs!r}")
        if self.cpe_max_size % self.patch_size:
            raise ValueError(
                f"RadioConfig.cpe_max_size ({self.cpe_max_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if not (isinstance(self.pos_dropout, (int, float)) and 0.0 <= self.pos_dropout < 1.0):
            raise ValueError(f"RadioConfig.pos_dropout must be in [0, 1), got {self.pos_dropout!r}")
        if self.window_size is not None:
            positive_int("window_size")
            if self.patch_size * self.window_size > self.cpe_max_size:
                raise ValueError(
                    f"RadioConfig.window_size ({self.window_size}) times patch_size exceeds cpe_max_size "
                    f"({self.cpe_max_size})"
                )
        if self.global_blocks is not None and any(
            not isinstance(i, int) or not 0 <= i < self.depth for i in self.global_blocks
        ):
            raise ValueError(
                f"RadioConfig.global_blocks must hold block indices in [0, {self.depth}), got {self.global_blocks!r}"
            )
        if self.vitdet_prefix not in VITDET_PREFIX_MODES:
            raise ValueError(
                f"RadioConfig.vitdet_prefix must be one of {VITDET_PREFIX_MODES}, got {self.vitdet_prefix!r}"
            )
        if self.intermediate_normalizer not in INTERMEDIATE_NORMALIZERS:
            raise ValueError(
                f"RadioConfig.intermediate_normalizer must be one of {INTERMEDIATE_NORMALIZERS}, "
                f"got {self.intermediate_normalizer!r}"
            )
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"RadioConfig.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"RadioConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def hidden_dim(self) -> int:
        """Width of the blocks' MLP."""
        return self.mlp_dim if self.mlp_dim is not None else int(round(self.embed_dim * self.mlp_ratio))

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def global_block_indices(self) -> list[int]:
        """Indices of the blocks that attend globally (every block when ``window_size`` is None)."""
        if self.window_size is None:
            return list(range(self.depth))
        if self.global_blocks is not None:
            return sorted(set(self.global_blocks) | {self.depth - 1})
        period = max(self.depth // self.num_global, 1)
        chosen = {i for i in range(self.depth) if i % period == period - 1}
        return sorted(chosen | {self.depth - 1})

    def windowed_blocks(self) -> list[bool]:
        """Per block: True when it attends inside windows."""
        global_ = set(self.global_block_indices())
        return [i not in global_ for i in range(self.depth)]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RadioConfig:
        """A named architecture: "tiny", "vit-b", "vit-l", "so400m" or "h" (C-RADIOv4 prefix layout)."""
        if name not in _PRESETS:
            raise ValueError(f"preset name must be one of {sorted(_PRESETS)}, got {name!r}")
        return cls(**{**_V4_PREFIX, **_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return list(_PRESETS)

    def replace(self, **changes: Any) -> RadioConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RadioConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"RadioConfig got unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class AdaptorSpec:
    """One teacher's adaptor heads on top of the student.

    - ``name``: the teacher's name; the key of its output in ``RadioModel.forward``'s dict.
    - ``summary_dim``: width of the teacher's summary vector, or None for a teacher without one
      (SAM3); then no summary head is built and the output's ``summary`` is None.
    - ``feature_dim``: channels of the teacher's spatial features.
    - ``head``: spatial head type, "mlp" (MLP2) or "attn" (2 transformer blocks + MLP2, C-RADIOv4).
    - ``upsample_factor`` k: the spatial head emits k*k*feature_dim per token, pixel-shuffled to a
      (k*h, k*w) grid.
    - ``hidden_dim`` / ``feature_hidden_dim``: MLP2 widths of the summary / spatial heads
      (None: the student's embed_dim / the summary head's hidden_dim).
    - ``num_inner`` / ``feature_num_inner``: residual blocks in the summary / spatial MLP2
      (``feature_num_inner=None``: ``num_inner`` for "mlp", 0 for "attn", as in C-RADIOv4).
    - ``pre_norm``: start both MLP2s with LayerNorm + GELU.
    - ``cls_index``: which CLS token feeds the summary head; None means the adaptor's position in the
      list given to ``RadioModel`` (adaptor i reads CLS token i).
    """

    name: str
    summary_dim: int | None
    feature_dim: int
    head: str = "mlp"
    upsample_factor: int = 1
    hidden_dim: int | None = None
    feature_hidden_dim: int | None = None
    num_inner: int = 1
    feature_num_inner: int | None = None
    pre_norm: bool = False
    cls_index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name or self.name == "backbone":
            raise ValueError(
                f"AdaptorSpec.name must be a non-empty string without '.' and not 'backbone', got {self.name!r}"
            )
        for name in ("feature_dim", "upsample_factor", "summary_dim", "hidden_dim", "feature_hidden_dim", "cls_index"):
            if isinstance(getattr(self, name), bool):  # an int subclass: True would mean 1
                raise ValueError(f"AdaptorSpec.{name} must be an int, got {getattr(self, name)!r}")
        for name in ("feature_dim", "upsample_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdaptorSpec.{name} must be a positive int, got {value!r}")
        for name in ("summary_dim", "hidden_dim", "feature_hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"AdaptorSpec.{name} must be None or a positive int, got {value!r}")
        for name in ("num_inner", "feature_num_inner", "cls_index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"AdaptorSpec.{name} must be a non-negative int, got {value!r}")
        if self.head not in ADAPTOR_HEADS:
            raise ValueError(f"AdaptorSpec.head must be one of {ADAPTOR_HEADS}, got {self.head!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptorSpec:
        return cls(**data)
