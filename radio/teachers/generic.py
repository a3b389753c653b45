"""Your own teachers: any ``transformers`` vision model (kind "hf") or any ``timm`` model (kind "timm").

kind "hf": ``AutoModel.from_pretrained(name_or_path)`` (a hub name, or a folder written by
``save_pretrained``); a dual image-text model is reduced to its ``vision_model``. Features are the
tokens of hidden layer ``layer`` (None: ``last_hidden_state``; an int indexes ``hidden_states``, so -1
is the last block before any final norm) with the first ``prefix_tokens`` dropped (None: everything but
the (H/p) x (W/p) patch tokens, i.e. CLS + registers); summary = "cls" (token 0 of that layer),
"pooler" (``pooler_output``) or "none". Off-native sizes use ``interpolate_pos_encoding=True`` when the
model takes it. Normalisation: the folder's / hub's ``preprocessor_config.json``, else ImageNet's.

kind "timm": ``timm.create_model(name, pretrained=True)``, or ``local-dir:<folder>`` for a folder
(timm's own format: ``config.json`` + weights, ``timm.models.save_for_hf``). Features =
``forward_features`` (ViT tokens with ``prefix_tokens`` dropped, default ``model.num_prefix_tokens``, or a
CNN's (B, C, h, w) map); summary = "cls" (token 0, ViTs), "pooler" (``forward_head(pre_logits=True)``)
or "none". ViTs are built with ``dynamic_img_size=True`` so that any multiple of the patch runs.
Normalisation and native size come from the model's ``pretrained_cfg``.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from torch import nn

from .base import PREPROCESSOR_FILE, Teacher, TeacherOutput
from .dinov3 import IMAGENET_MEAN, IMAGENET_STD
from .siglip2 import _side

__all__ = ["GENERIC_KINDS", "SUMMARY_MODES", "HFTeacher", "TimmTeacher", "load_generic_teacher"]

GENERIC_KINDS = ("hf", "timm")
SUMMARY_MODES = ("cls", "pooler", "none")


def _check_options(layer, prefix_tokens, summary) -> None:
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise TypeError(f"layer must be an int or None, got {layer!r}")
    if prefix_tokens is not None and (not isinstance(prefix_tokens, int) or prefix_tokens < 0):
        raise ValueError(f"prefix_tokens must be an int >= 0 or None, got {prefix_tokens!r}")
    if summary not in SUMMARY_MODES:
        raise ValueError(f"summary must be one of {SUMMARY_MODES}, got {summary!r}")


def _patch_tokens(tokens: torch.Tensor, prefix: int | None, gh: int, gw: int, who: str) -> torch.Tensor:
    """(B, N, C) -> (B, gh, gw, C) after dropping ``prefix`` leading tokens (None: N - gh*gw)."""
    b, n, c = tokens.shape
    prefix = n - gh * gw if prefix is None else prefix
    if prefix < 0 or n - prefix != gh * gw:
        raise ValueError(
            f"{who}: {n} tokens minus {prefix} prefix tokens is not the {gh}x{gw} patch grid; "
            "set the teacher's prefix_tokens"
        )
    return tokens[:, prefix:].reshape(b, gh, gw, c)


class HFTeacher(Teacher):
    """A ``transformers`` vision model as a teacher (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        mean,
        std,
        layer: int | None = None,
        prefix_tokens: int | None = None,
        summary: str = "cls",
        dtype: torch.dtype = torch.float32,
    ):
        _check_options(layer, prefix_tokens, summary)
        cfg = model.config
        if getattr(cfg, "patch_size", None) is None or getattr(cfg, "hidden_size", None) is None:
            raise ValueError(
                f"{name}: kind 'hf' takes ViT-style models (config.patch_size and hidden_size, token outputs); "
                f"{type(model).__name__} is not one; load CNNs with kind 'timm'"
            )
        super().__init__(
            name=name,
            patch_size=_side(cfg.patch_size),
            feature_dim=cfg.hidden_size,
            summary_dim=None if summary == "none" else cfg.hidden_size,
            mean=mean,
            std=std,
            fixed_size=None,
            native_size=_side(getattr(cfg, "image_size", 224)),
            dtype=dtype,
        )
        self.layer, self.prefix_tokens, self.summary = layer, prefix_tokens, summary
        params = inspect.signature(model.forward).parameters
        self._kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
        if layer is not None:
            self._kwargs["output_hidden_states"] = True
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        out = self.model(pixel_values=pixels, **self._kwargs)
        tokens = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        if tokens.ndim != 3:
            raise ValueError(f"{self.name}: expected (B, N, C) tokens, got shape {tuple(tokens.shape)}")
        features = _patch_tokens(tokens, self.prefix_tokens, *self.grid(*pixels.shape[-2:]), self.name)
        if self.summary == "cls":
            summary = tokens[:, 0]
        elif self.summary == "pooler":
            summary = getattr(out, "pooler_output", None)
            if summary is None or summary.shape[-1] != self.summary_dim:
                got = "none" if summary is None else f"{summary.shape[-1]} channels"
                raise ValueError(
                    f"{self.name}: summary='pooler' needs a pooler_output of hidden_size={self.summary_dim} "
                    f"channels, got {got}; use summary 'cls' or 'none'"
                )
        else:
            summary = None
        return TeacherOutput(summary, features)


class TimmTeacher(Teacher):
    """A ``timm`` model as a teacher (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        prefix_tokens: int | None = None,
        summary: str = "pooler",
        dtype: torch.dtype = torch.float32,
    ):
        _check_options(None, prefix_tokens, summary)
        pretrained = getattr(model, "pretrained_cfg", {}) or {}
        reduction = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else None
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None) or reduction
        if patch is None:
            raise ValueError(f"{name}: cannot tell the feature stride of {type(model).__name__}")
        self.is_vit = getattr(model, "patch_embed", None) is not None
        if summary == "cls" and not self.is_vit:
            raise ValueError(f"summary='cls' needs a ViT-like timm model; {name} has no tokens (use 'pooler')")
        dynamic = getattr(model, "dynamic_img_size", True)
        native = _side(pretrained.get("input_size", (3, 224, 224))[-1])
        super().__init__(
            name=name,
            patch_size=_side(patch),
            feature_dim=model.num_features,
            summary_dim=None if summary == "none" else model.num_features,
            mean=tuple(pretrained.get("mean", IMAGENET_MEAN)),
            std=tuple(pretrained.get("std", IMAGENET_STD)),
            fixed_size=None if (dynamic or not self.is_vit) else native,
            native_size=native,
            dtype=dtype,
        )
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0) if prefix_tokens is None else prefix_tokens
        self.summary = summary
        self.model = model.to(dtype).eval()

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        x = self.model.forward_features(pixels)
        gh, gw = self.grid(*pixels.shape[-2:])
        if x.ndim == 4:  # a CNN's (B, C, h, w) map
            features = x.permute(0, 2, 3, 1)
            if tuple(features.shape[1:3]) != (gh, gw):
                raise ValueError(f"{self.name}: feature map {tuple(features.shape[1:3])} is not the {gh}x{gw} grid")
        else:
            features = _patch_tokens(x, self.prefix_tokens, gh, gw, self.name)
        if self.summary == "cls":
            summary = x[:, 0]
        elif self.summary == "pooler":
            summary = self.model.forward_head(x, pre_logits=True)
        else:
            summary = None
        return TeacherOutput(summary, features)


def _hf_normalisation(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from transformers.utils import cached_file

    path = cached_file(
        name_or_path,
        PREPROCESSOR_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if path is not None:
        with open(path) as f:
            cfg = json.load(f)
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return mean, std


def _create_timm(name_or_path: str):
    import timm

    source = f"local-dir:{name_or_path}" if os.path.isdir(name_or_path) else name_or_path
    try:  # ViTs: accept any multiple of the patch
        return timm.create_model(source, pretrained=True, dynamic_img_size=True)
    except TypeError:  # models without that option (CNNs)
        return timm.create_model(source, pretrained=True)


def load_generic_teacher(
    kind: str,
    name_or_path: str,
    *,
    layer: int | None = None,
    prefix_tokens: int | None = None,
    summary: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Teacher:
    """Load a teacher of kind "hf" or "timm" (module docstring); ``summary`` None: "cls" for hf, "pooler" for timm."""
    if kind not in GENERIC_KINDS:
        raise ValueError(f"kind must be one of {GENERIC_KINDS}, got {kind!r}")
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"kind {kind!r} needs name_or_path (a model name or folder), got {name_or_path!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    name_or_path = os.fspath(name_or_path)
    if kind == "hf":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
        model = getattr(model, "vision_model", model)  # dual encoders: the image tower
        mean, std = _hf_normalisation(name_or_path)
        return HFTeacher(
            model,
            name=name_or_path,
            mean=mean,
            std=std,
            layer=layer,
            prefix_tokens=prefix_tokens,
            summary=summary or "cls",
            dtype=dtype,
        )
    if layer is not None:
        raise ValueError("layer applies to kind 'hf' only (timm teachers read forward_features)")
    return TimmTeacher(
        _create_timm(name_or_path),
        name=name_or_path,
        prefix_tokens=prefix_tokens,
        summary=summary or "pooler",
        dtype=dtype,
    )
