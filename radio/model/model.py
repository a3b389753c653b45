"""``RadioModel``: the student ViT with CPE, ViTDet windows and per-teacher adaptor heads.

Forward pass for x (B, 3, H, W) in [0, 1], token grid h = H/p, w = W/p, P prefix tokens::

    x      = (x - mean) / std                                    (skipped after make_preprocessor_external)
    tokens = PatchEmbed(x) + CPE(h, w)                           (B, h*w, D), raster order; training: per-sample
                                                                 crops from cpe_uniforms (B, 5), see radio.model.cpe
    tokens = [prefix tokens (P, D) ; tokens]                     (B, P + h*w, D)
    tokens = blocks(tokens)                                      ViTDet schedule, see radio.model.vitdet
    tokens = LN(tokens)                                          final norm (config.final_norm), all tokens
    summary  = concat(tokens[:, i] for i in summary_idxs)        (B, len(summary_idxs) * D)
    features = FN(tokens[:, P:])                                 (B, h*w, D) | NCHW | NHWC

FN is the output feature normaliser (config.feature_normalizer, official checkpoints): it whitens the
patch tokens only, as the official model does; the summaries read the un-normalised CLS tokens. With
adaptors, teacher t's summary head reads CLS token ``spec.cls_index`` (un-normalised) and its feature
head the normalised patch tokens; the output is ``{"backbone": RadioOutput, t: RadioOutput, ...}``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adaptors import Adaptor
from .blocks import Attention, Block, init_vit_weights
from .config import ATTENTION_BACKENDS, VITDET_PREFIX_MODES, AdaptorSpec, RadioConfig
from .cpe import PositionEmbedding
from .embed import FeatureNormalizer, InputNormalizer, IntermediateNormalizer, PatchEmbed
from .vitdet import WindowedRun

FEATURE_FORMATS = ("NLC", "NCHW", "NHWC")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFERRED_RESOLUTION = 512
# The pixel-range warning looks at the first few batches only, and tolerates values this far out
# of [0, 1] (resampling overshoot); 0-255 pixels or normalised (mean 0, std 1) ones are far beyond.
PIXEL_RANGE_CHECKS = 8
PIXEL_RANGE_SLACK = 0.5


class RadioOutput(NamedTuple):
    """summary (B, S) or None for a teacher without a summary; features (B, N, C), NCHW or NHWC."""

    summary: torch.Tensor | None
    features: torch.Tensor


class Resolution(NamedTuple):
    height: int
    width: int


def format_features(tokens: torch.Tensor, h: int, w: int, fmt: str) -> torch.Tensor:
    """(B, h*w, C) raster tokens -> NLC (as is), NHWC (B, h, w, C) or NCHW (B, C, h, w)."""
    if fmt == "NLC":
        return tokens
    grid = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])
    return grid if fmt == "NHWC" else grid.permute(0, 3, 1, 2)


def _check_feature_fmt(name: str, fmt: str) -> None:
    if fmt not in FEATURE_FORMATS:
        raise ValueError(f"{name} must be one of {FEATURE_FORMATS}, got {fmt!r}")


class RadioModel(nn.Module):
    """Student backbone + optional adaptor heads. See the module docstring for the math.

    Args:
        config: architecture (``RadioConfig``).
        adaptors: teacher heads; adaptor i reads CLS token ``spec.cls_index``, or token i when that is None.
    """

    def __init__(self, config: RadioConfig, adaptors: Sequence[AdaptorSpec] | None = None) -> None:
        super().__init__()
        if not isinstance(config, RadioConfig):
            raise TypeError(f"config must be a RadioConfig, got {type(config).__name__}")
        config = config.replace()  # a private, validated copy: set_attention_backend edits it
        self.config = config
        D = config.embed_dim
        self.input_norm = InputNormalizer()
        self.patch_embed = PatchEmbed(config.patch_size, D)
        self.cpe = PositionEmbedding(D, config.cpe_max_size // config.patch_size, config.pos_dropout)
        self.prefix_tokens = nn.Parameter(torch.randn(config.num_prefix_tokens, D) * D**-0.5)
        self.blocks = nn.ModuleList(
            Block(
                D,
                config.num_heads,
                config.hidden_dim,
                config.qkv_bias,
                config.layer_scale,
                norm_eps=1e-6,
                backend=config.attention_backend,
                ffn=config.ffn,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=1e-6) if config.final_norm else nn.Identity()
        self.feature_norm = FeatureNormalizer(D) if config.feature_normalizer else nn.Identity()
        self.intermediate_norm = (
            IntermediateNormalizer(config.depth, D, per_block_rotation=config.intermediate_normalizer == "per_block")
            if config.intermediate_normalizer != "none"
            else None
        )
        self._windowed = config.windowed_blocks()
        self._window_override: tuple[int, str, list[bool]] | None = None  # see windowed()
        self._external_preprocessor = False
        self.grad_checkpointing = False

        self.adaptor_specs: list[AdaptorSpec] = []
        self.adaptors = nn.ModuleDict()
        for i, spec in enumerate(adaptors or ()):
            if not isinstance(spec, AdaptorSpec):
                raise TypeError(f"adaptors[{i}] must be an AdaptorSpec, got {type(spec).__name__}")
            if spec.name in self.adaptors:
                raise ValueError(f"adaptors: duplicate name {spec.name!r}")
            cls_index = i if spec.cls_index is None else spec.cls_index
            if cls_index >= config.num_cls_tokens:
                raise ValueError(
                    f"adaptors[{i}] ({spec.name!r}) reads CLS token {cls_index}, but the model has "
                    f"num_cls_tokens={config.num_cls_tokens}; set AdaptorSpec.cls_index"
                )
            spec = AdaptorSpec.from_dict({**spec.to_dict(), "cls_index": cls_index})
            self.adaptor_specs.append(spec)
            self.adaptors[spec.name] = Adaptor(spec, D, config.attention_backend)
        init_vit_weights(self.blocks)
        init_vit_weights(self.patch_embed)
        init_vit_weights(self.adaptors)

    # ------------------------------------------------------------------ official API properties
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def window_size(self) -> int | None:
        return self.config.window_size

    @property
    def min_resolution_step(self) -> int:
        """Input sides must be multiples of this: patch_size, times window_size in ViTDet mode."""
        return self.patch_size * (self.window_size or 1)

    @property
    def preferred_resolution(self) -> Resolution:
        return Resolution(PREFERRED_RESOLUTION, PREFERRED_RESOLUTION)

    @property
    def max_resolution(self) -> int:
        return self.config.cpe_max_size

    @property
    def num_summary_tokens(self) -> int:
        """Prefix tokens (CLS + registers) in front of the patch tokens."""
        return self.config.num_prefix_tokens

    @property
    def num_cls_tokens(self) -> int:
        return self.config.num_cls_tokens

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def summary_dim(self) -> int:
        return len(self.config.summary_idxs) * self.config.embed_dim

    def get_nearest_supported_resolution(self, height: int, width: int) -> Resolution:
        """Round each side to the nearest multiple of min_resolution_step, at least one step.

        Not clamped to ``max_resolution``: larger inputs run, the position table is resampled up (as in
        the official models)."""
        step = self.min_resolution_step
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, (int, float)) or not math.isfinite(side):
                raise ValueError(f"{name} must be a finite number of pixels, got {side!r}")

        def snap(side: int) -> int:
            return int(max(round(side / step) * step, step))

        return Resolution(snap(height), snap(width))

    def make_preprocessor_external(self) -> nn.Module:
        """Return the input normaliser and make ``forward`` expect already-normalised input."""
        self._external_preprocessor = True
        return self.input_norm

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (training only) to save memory."""
        self.grad_checkpointing = bool(enable)

    @contextmanager
    def windowed(self, window_size: int | None, prefix: str = "replicate") -> Iterator[None]:
        """Run the blocks in ViTDet mode with ``window_size`` (and ``prefix`` mode) inside the block, at any
        input size a multiple of ``patch_size``: grids that are not a multiple of the window are padded
        with zero tokens inside windowed blocks (``radio.model.vitdet``). The schedule of global blocks is
        the config's (``global_blocks`` / ``num_global``). ``window_size=None``: as configured.

        Used by ViTDet-mode training (``radio.train.vitdet_train``) and windowed fidelity; the configured
        ``window_size`` (and ``min_resolution_step``) are unchanged.
        """
        if window_size is None:
            yield
            return
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size <= 0:
            raise ValueError(f"window_size must be a positive int or None, got {window_size!r}")
        if prefix not in VITDET_PREFIX_MODES:
            raise ValueError(f"prefix must be one of {VITDET_PREFIX_MODES}, got {prefix!r}")
        previous = self._window_override
        self._window_override = (window_size, prefix, self.config.replace(window_size=window_size).windowed_blocks())
        try:
            yield
        finally:
            self._window_override = previous

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention call (backbone and attention heads) to ``backend``."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.config.attention_backend = backend
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    # ------------------------------------------------------------------ input checks
    def check_input(self, x: Any) -> tuple[int, int]:
        """Validate an image batch; return its token grid (h, w)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
        weight = self.patch_embed.proj.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}; move one to the other")
        H, W = x.shape[-2:]
        step = self.min_resolution_step
        nearest = self.get_nearest_supported_resolution(H, W)
        if H % step or W % step or H == 0 or W == 0:
            raise ValueError(
                f"x height and width must be positive multiples of min_resolution_step={step}, got {H}x{W}; "
                f"nearest supported resolution: {nearest.height}x{nearest.width}"
            )
        return H // self.patch_size, W // self.patch_size

    # ------------------------------------------------------------------ trunk
    def _check_pixel_range(self, x: torch.Tensor) -> None:
        """Warn (once per model) when x is far outside [0, 1]: 0-255 pixels, or already normalised
        ones, still run but give meaningless features. Only the first calls are looked at (each look
        waits for the device), never while compiling or exporting, nor on the meta device (dry runs)."""
        left = getattr(self, "_pixel_range_checks_left", PIXEL_RANGE_CHECKS)
        if left <= 0 or self._external_preprocessor or x.numel() == 0 or x.is_meta:
            return
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        self._pixel_range_checks_left = left - 1
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if lo < -PIXEL_RANGE_SLACK or hi > 1 + PIXEL_RANGE_SLACK:
            self._pixel_range_checks_left = 0
            warnings.warn(
                f"RadioModel expects pixels in [0, 1] (it normalises them itself), got values in [{lo:.3g}, {hi:.3g}]; "
                "divide 0-255 images by 255, and do not normalise them beforehand (see make_preprocessor_external)",
                UserWarning,
                stacklevel=5,
            )

    def _embed(
        self, x: torch.Tensor, generator: torch.Generator | None = None, cpe_uniforms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.check_input(x)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self._check_pixel_range(x)
        weight_dtype = self.patch_embed.proj.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)  # documented in forward: x follows the model's dtype (float64 pixels work)
        if not self._external_preprocessor:
            x = self.input_norm(x)
        x = x.to(self.patch_embed.proj.weight.dtype)  # a half / bf16 model takes float32 pixels
        tokens = self.cpe(self.patch_embed(x), grid, generator, cpe_uniforms)
        prefix = self.prefix_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([prefix, tokens], dim=1), grid

    def _run_block(self, block: Block, x: torch.Tensor, kwargs: dict[str, int]) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)

    def _run_blocks(
        self, x: torch.Tensor, grid: tuple[int, int], take: set[int] | None = None, stop_after: int | None = None
    ):
        """Run the blocks; return (raster tokens, {block index: raster tokens after it} for ``take``)."""
        cfg = self.config
        window, prefix, windowed, pad = cfg.window_size, cfg.vitdet_prefix, self._windowed, False
        if self._window_override is not None:
            (window, prefix, windowed), pad = self._window_override, True
        run = WindowedRun(grid, cfg.num_prefix_tokens, window if any(windowed) else None, prefix, pad=pad)
        x = run.enter(x)
        taken = {}
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        for i, block in enumerate(self.blocks[: last + 1]):
            x = run.to_windowed(x) if windowed[i] else run.to_global(x)
            x = self._run_block(block, x, run.block_kwargs())
            if take is not None and i in take:
                taken[i] = run.peek(x)
        return run.exit(x), taken

    def forward_features(
        self, x: torch.Tensor, generator: torch.Generator | None = None, cpe_uniforms: torch.Tensor | None = None
    ):
        """All output tokens after the final norm, (B, P + h*w, D) in raster order, and the grid (h, w).

        The output feature normaliser is not applied here (``patch_features`` applies it to the patch
        tokens). ``generator`` / ``cpe_uniforms``: the training-time CPE randomness, as in ``forward``.
        """
        tokens, grid = self._embed(x, generator, cpe_uniforms)
        tokens, _ = self._run_blocks(tokens, grid)
        return self.norm(tokens), grid

    def patch_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P + h*w, D) output tokens -> (B, h*w, D) patch features, through the feature normaliser."""
        return self.feature_norm(tokens[:, self.config.num_prefix_tokens :])

    # ------------------------------------------------------------------ outputs
    def _backbone_output(
        self, tokens: torch.Tensor, grid: tuple[int, int], fmt: str, features: torch.Tensor | None = None
    ) -> RadioOutput:
        summary = tokens[:, self.config.summary_idxs].flatten(1)
        if features is None:
            features = tokens[:, self.config.num_prefix_tokens :]
        return RadioOutput(summary, format_features(features, *grid, fmt))

    def _outputs(self, tokens: torch.Tensor, grid: tuple[int, int], fmt: str):
        # Only the patch tokens go through the feature normaliser; summaries read the raw CLS tokens.
        patches = self.patch_features(tokens)
        backbone = self._backbone_output(tokens, grid, fmt, patches)
        if not self.adaptor_specs:
            return backbone
        out = {"backbone": backbone}
        for spec in self.adaptor_specs:
            summary, features = self.adaptors[spec.name](tokens[:, spec.cls_index], patches, grid)
            k = spec.upsample_factor
            out[spec.name] = RadioOutput(summary, format_features(features, grid[0] * k, grid[1] * k, fmt))
        return out

    def forward(
        self,
        x: torch.Tensor,
        feature_fmt: str = "NLC",
        *,
        generator: torch.Generator | None = None,
        cpe_uniforms: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
    ):
        """x (B, 3, H, W) in [0, 1] -> RadioOutput, or {"backbone": ..., teacher: ...} with adaptors.

        x of another float dtype than the model's is cast to the model's (outside autocast); x on
        another device raises. Values far outside [0, 1] (0-255 pixels) give a one-time warning.

        Packed batch of images of different sizes (transformers' layout): x (T, 3*p*p) patches and
        ``image_grid_hw`` (S, 2) grids; summary (S, .), features (T, D); see ``radio.model.packed``.

        Training-time CPE randomness (table crop and position dropout per sample, radio.model.cpe):
        ``cpe_uniforms`` (B, 5) float U(0, 1) draws, columns (side scale, aspect, offset x, offset y,
        dropout), fix it per sample, so sample b's embedding depends on ``cpe_uniforms[b]`` alone; without
        them the draws come from ``generator`` (else the global RNG). Both are unused in eval mode.
        """
        _check_feature_fmt("feature_fmt", feature_fmt)
        if image_grid_hw is not None:
            from .packed import forward_packed

            return forward_packed(self, x, image_grid_hw, feature_fmt, generator, cpe_uniforms)
        tokens, grid = self.forward_features(x, generator, cpe_uniforms)
        return self._outputs(tokens, grid, feature_fmt)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        normalize: bool = True,
        generator: torch.Generator | None = None,
        cpe_uniforms: torch.Tensor | None = None,
    ):
        """Per-block outputs, timm style.

        ``indices``: an int n takes the last n blocks, a sequence takes those block indices (negative
        counts from the end), None takes all. Each intermediate is the block's patch tokens in raster
        order (in ``output_fmt``), or ``RadioOutput(summary, features)`` with ``return_prefix_tokens``.
        ``normalize``: apply the per-block intermediate normaliser to the patch tokens, when the model
        has one (official checkpoints; like their ``norm_alpha_scheme="post-alpha"``; False is their
        "none"). ``norm`` then applies the final LayerNorm (not the output feature normaliser, which
        only the final outputs get, as in the official models). ``stop_early`` skips the blocks after
        the last one taken. Returns ``intermediates`` when ``intermediates_only``, else
        ``(final, intermediates)``, where ``final`` is built like ``forward(x, output_fmt)``'s output from
        the tokens after the last block run (the last one taken with ``stop_early``), through the final
        LayerNorm only when ``norm`` (as in the official models). ``generator`` / ``cpe_uniforms``: the
        training-time CPE randomness, as in ``forward``.
        """
        _check_feature_fmt("output_fmt", output_fmt)
        depth = len(self.blocks)
        if isinstance(indices, bool) or (
            indices is not None
            and not isinstance(indices, int)
            and not (
                isinstance(indices, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            )
        ):
            raise TypeError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices as an int must be in [1, {depth}], got {indices}")
            take = list(range(depth - indices, depth))
        else:
            take = sorted({i + depth if i < 0 else i for i in indices})
            if not take or take[0] < 0 or take[-1] >= depth:
                raise ValueError(f"indices must name blocks in [-{depth}, {depth}), got {list(indices)}")
        tokens, grid = self._embed(x, generator, cpe_uniforms)
        stop = take[-1] if stop_early else None
        tokens, taken = self._run_blocks(tokens, grid, set(take), stop_after=stop)
        intermediates = []
        p = self.config.num_prefix_tokens
        for i in take:
            t = taken[i]
            if normalize and self.intermediate_norm is not None:
                t = torch.cat([t[:, :p], self.intermediate_norm(t[:, p:], i)], dim=1)
            t = self.norm(t) if norm else t
            out = self._backbone_output(t, grid, output_fmt)
            intermediates.append(out if return_prefix_tokens else out.features)
        if intermediates_only:
            return intermediates
        return self._outputs(self.norm(tokens) if norm else tokens, grid, output_fmt), intermediates

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, format: str = "radio") -> None:
        """Write ``config.json`` (config + adaptor specs) and ``model.safetensors`` into ``directory``
        (refused, ``radio.finite.NonFiniteError``, when a weight holds NaN / Inf).

        ``format="transformers"``: a folder ``transformers.RadioModel.from_pretrained`` loads, plus a side
        file with what it has no place for (``radio.model.hf_transformers``).
        """
        from safetensors.torch import save_file

        from radio.finite import check_finite

        if format not in ("radio", "transformers"):
            raise ValueError(f"format must be 'radio' or 'transformers', got {format!r}")
        check_finite(self, f"a model to {str(directory)!r}")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"directory {os.fspath(directory)!r} is an existing file; save_pretrained writes a folder")
        if format == "transformers":
            from .hf_transformers import save_transformers_folder

            return save_transformers_folder(self, directory)
        os.makedirs(directory, exist_ok=True)
        meta = {
            "format": "radio-model",
            "version": 1,
            "config": self.config.to_dict(),
            "adaptors": [spec.to_dict() for spec in self.adaptor_specs],
        }
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> RadioModel:
        """Rebuild a model written by ``save_pretrained`` (exact weights, config and adaptor specs).

        Also reads a ``transformers.RadioModel`` folder (config.json with ``model_type = "radio"``).
        """
        from safetensors.torch import load_file

        from .hf_transformers import is_transformers_folder, load_transformers_folder

        if is_transformers_folder(directory):
            return load_transformers_folder(cls, directory, map_location)
        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ValueError(f"directory {str(directory)!r} has no {CONFIG_FILE}; was it written by save_pretrained?")
        with open(config_path) as f:
            meta = json.load(f)
        if meta.get("format") != "radio-model":
            raise ValueError(f"{config_path} is not a RadioModel config (format={meta.get('format')!r})")
        model = cls(RadioConfig.from_dict(meta["config"]), [AdaptorSpec.from_dict(a) for a in meta["adaptors"]])
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=str(map_location)))
        return model.to(map_location)

    @classmethod
    def from_radio_checkpoint(cls, checkpoint: str | os.PathLike | dict, **kwargs) -> RadioModel:
        """Load a checkpoint in the NVlabs/RADIO layout; see ``radio.model.checkpoint``."""
        from .checkpoint import load_radio_checkpoint

        return load_radio_checkpoint(cls, checkpoint, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        win = f", window={c.window_size}, prefix={c.vitdet_prefix!r}" if c.window_size else ""
        return f"D={c.embed_dim}, depth={c.depth}, heads={c.num_heads}, patch={c.patch_size}{win}"
