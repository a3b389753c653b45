"""Build teachers: ``load_teacher`` from checkpoints, ``tiny_teacher`` from random tiny configs."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, DINOv3ViTConfig, DINOv3ViTModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.sam3.configuration_sam3 import Sam3ViTConfig
from transformers.models.sam3.modeling_sam3 import Sam3ViTModel
from transformers.models.siglip2.configuration_siglip2 import Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel
from transformers.utils import cached_file

from .base import PREPROCESSOR_FILE, Teacher
from .dinov3 import IMAGENET_MEAN, IMAGENET_STD, DINOv3Teacher
from .sam3 import SAM3_MEAN, SAM3_STD, Sam3Teacher
from .siglip2 import SIGLIP_MEAN, SIGLIP_STD, Siglip2NaFlexTeacher, SiglipTeacher

__all__ = ["TEACHER_KINDS", "load_teacher", "tiny_teacher"]

TEACHER_KINDS = ("siglip2", "dinov3", "sam3")

# model_type of a checkpoint's config.json -> family, for each kind.
_SIGLIP_FIXED = {"siglip", "siglip_vision_model"}
_SIGLIP_NAFLEX = {"siglip2", "siglip2_vision_model"}
_DINOV3 = {"dinov3_vit"}
# A SAM3 trunk can sit inside several wrappers; we descend these config keys to reach it.
_SAM3_VIT = "sam3_vit_model"
_SAM3_NESTING = ("detector_config", "vision_config", "backbone_config")
# Checkpoint key prefixes of the trunk inside full SAM3 models (Sam3Model, Sam3VisionModel, video).
_SAM3_KEY_MAPPING = {r"^(?:detector_model\.)?(?:vision_encoder\.)?backbone\.": ""}

_DEFAULT_NORM = {
    "siglip2": (SIGLIP_MEAN, SIGLIP_STD),
    "dinov3": (IMAGENET_MEAN, IMAGENET_STD),
    "sam3": (SAM3_MEAN, SAM3_STD),
}


def _check_kind(kind: str) -> None:
    if kind not in TEACHER_KINDS:
        raise ValueError(f"kind must be one of {TEACHER_KINDS}, got {kind!r}")


def _check_name_or_path(name_or_path) -> None:
    """A local path must exist; anything else must look like a hub id ("name" or "org/name")."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_teacher: name_or_path must be a str or path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        return
    if os.path.exists(text):
        raise ValueError(f"load_teacher: {text!r} is a file; give the checkpoint's folder (with config.json)")
    looks_local = text.startswith((".", "~", os.sep)) or text.count("/") > 1 or "\\" in text
    if looks_local or not text.strip():
        raise ValueError(
            f"load_teacher: checkpoint folder {text!r} does not exist (give an existing folder or a hub id 'org/name')"
        )


def _normalisation(kind: str, name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std from the checkpoint's image-processor config when it has one, else the family's values."""
    mean, std = _DEFAULT_NORM[kind]
    path = cached_file(
        name_or_path,
        PREPROCESSOR_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is not None:
        with open(path) as f:
            cfg = json.load(f)
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return mean, std


def _sam3_vit_config(config) -> Sam3ViTConfig:
    """Walk Sam3Config / Sam3VisionConfig / video wrappers down to the trunk's Sam3ViTConfig."""
    seen = [config.model_type]
    while config.model_type != _SAM3_VIT:
        child = next((getattr(config, k) for k in _SAM3_NESTING if getattr(config, k, None) is not None), None)
        if child is None:
            raise ValueError(f"load_teacher('sam3'): no SAM3 ViT trunk in config chain {seen}")
        config = child
        seen.append(config.model_type)
    return config


def _from_pretrained(model_cls, name_or_path: str, **kwargs):
    """``from_pretrained`` that refuses to hand back a partly random model (e.g. a key-prefix mismatch)."""
    model, info = model_cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"load_teacher: {name_or_path!r} lacks weights for {missing[:5]} ({len(missing)} missing)")
    return model


def load_teacher(
    kind: str,
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> Teacher:
    """Load a pretrained teacher with ``from_pretrained`` (hub name online, local folder offline).

    kind: "siglip2" (fixed-resolution ``siglip`` or NaFlex ``siglip2`` checkpoints, full
    image-text or vision-only), "dinov3" (``DINOv3ViTModel``) or "sam3" (the ``Sam3ViTModel``
    trunk, alone or inside a full SAM3 checkpoint).

    The weights load straight onto ``device`` in ``dtype`` (``device_map``: no full float32 copy in
    CPU memory first, which for DINOv3-7B would be ~28 GB per rank), with attention through
    ``attn_implementation`` ("sdpa" by default; None: the checkpoint's own choice).
    """
    _check_kind(kind)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_teacher: dtype must be a torch.dtype, got {dtype!r}")
    _check_name_or_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:  # not a folder with a config.json, not on the hub / in the cache
        raise ValueError(f"load_teacher: cannot load a {kind} config from {name_or_path!r}: {e}") from e
    mtype = config.model_type
    mean, std = _normalisation(kind, name_or_path)
    common = {"name": str(name_or_path), "mean": mean, "std": std, "dtype": dtype}
    load = {"dtype": dtype, "device_map": str(torch.device(device))}
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    if kind == "siglip2" and mtype in _SIGLIP_FIXED:
        teacher = SiglipTeacher(_from_pretrained(SiglipVisionModel, name_or_path, **load), **common)
    elif kind == "siglip2" and mtype in _SIGLIP_NAFLEX:
        teacher = Siglip2NaFlexTeacher(_from_pretrained(Siglip2VisionModel, name_or_path, **load), **common)
    elif kind == "dinov3" and mtype in _DINOV3:
        teacher = DINOv3Teacher(_from_pretrained(DINOv3ViTModel, name_or_path, **load), **common)
    elif kind == "sam3" and mtype.startswith("sam3"):
        model = _from_pretrained(
            Sam3ViTModel, name_or_path, config=_sam3_vit_config(config), key_mapping=_SAM3_KEY_MAPPING, **load
        )
        teacher = Sam3Teacher(model, **common)
    else:
        raise ValueError(f"load_teacher: checkpoint {name_or_path!r} has model_type {mtype!r}, not a {kind} model")
    return teacher.to(device)


def _tiny_config(kind: str, naflex: bool):
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    if kind == "siglip2" and naflex:
        # native 64 px = 4 x 4 position table.
        return Siglip2VisionConfig(**tiny, patch_size=16, num_patches=16)
    if kind == "siglip2":
        return SiglipVisionConfig(**tiny, patch_size=16, image_size=64)
    if kind == "dinov3":
        return DINOv3ViTConfig(**tiny, patch_size=16, image_size=64, num_register_tokens=2)
    # 112 px / patch 14 = 8 x 8 tokens: two 4 x 4 attention windows per side, last layer global.
    return Sam3ViTConfig(
        **tiny, patch_size=14, image_size=112, pretrain_image_size=56, window_size=4, global_attn_indexes=[1]
    )


def tiny_teacher(kind: str, seed: int = 0, *, naflex: bool = False, dtype: torch.dtype = torch.float32) -> Teacher:
    """Randomly initialised tiny teacher of the same architecture (32 wide, 2 layers), for tests and demos.

    Deterministic for a seed (the global RNG is left untouched). ``naflex=True`` picks the SigLIP2
    NaFlex family instead of the fixed-resolution one (siglip2 only).
    """
    _check_kind(kind)
    if naflex and kind != "siglip2":
        raise ValueError(f"tiny_teacher: naflex=True only applies to kind='siglip2', got kind={kind!r}")
    config = _tiny_config(kind, naflex)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "siglip2":
            model_cls, teacher_cls = (
                (Siglip2VisionModel, Siglip2NaFlexTeacher) if naflex else (SiglipVisionModel, SiglipTeacher)
            )
        elif kind == "dinov3":
            model_cls, teacher_cls = DINOv3ViTModel, DINOv3Teacher
        else:
            model_cls, teacher_cls = Sam3ViTModel, Sam3Teacher
        model = model_cls(config)
    mean, std = _DEFAULT_NORM[kind]
    name = f"tiny-{kind}" + ("-naflex" if naflex else "")
    return teacher_cls(model, name=name, mean=mean, std=std, dtype=dtype)
