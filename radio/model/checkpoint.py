"""Loading checkpoints in the layout NVlabs/RADIO publishes into a ``RadioModel``.

A checkpoint is a dict with ``"args"`` (argparse Namespace or dict), ``"state_dict"`` and usually
``"state_dict_ema"`` (preferred: the released weights are the EMA ones). Two key layouts exist:

training layout (the released ``*.pth.tar`` files)::

    base_model.<backbone key>                       the timm ViT with CPE
    input_conditioner.norm_mean / norm_std
    _heads.<teacher index | name>.<MLP2 key>        summary head of a teacher
    _feature_projections.<teacher index | name>.*   spatial head of a teacher

wrapper layout (``RADIOModel`` / the Hugging Face port, optionally under ``radio_model.``)::

    model.<backbone key>, input_conditioner.*, summary_idxs
    adaptors.<name>.head_mlp.* / adaptors.<name>.feat_mlp.*

Key mapping (left: official backbone/head key, right: ``RadioModel.state_dict()`` key):

    ==========================================  =======================================
    patch_generator.embedder.weight             patch_embed.proj.weight
    patch_generator.pos_embed                   cpe.pos_embed              (1, R*R, D)
    patch_generator.cls_token.token             prefix_tokens              (P, D)
    blocks.<i>.<rest>                           blocks.<i>.<rest>          (timm Block names)
    blocks.<i>.ls{1,2}.grandma                  blocks.<i>.ls{1,2}.gamma   (RADIO's LayerScale name)
    norm.weight / norm.bias (only if trained)   norm.weight / norm.bias    else final_norm=False
    input_conditioner.norm_mean / norm_std      input_norm.mean / input_norm.std
    summary head <rest>                         adaptors.<name>.summary_head.<rest>
    spatial head <rest>                         adaptors.<name>.feature_head.<rest>
    ==========================================  =======================================

The architecture is read off the tensors (width, depth, MLP width, qkv bias, LayerScale, prefix size,
patch size, CPE table size, head shapes); the head count, which weights do not reveal, comes from
``args.model_kwargs["num_heads"]``, the timm model name, or the ``num_heads`` argument. From ``args``:
``teachers`` (names, ``use_summary``, ``token_slot``, ``fd_upsample_factor``) and
``cls_token_per_teacher``. A feature normaliser stored next to the model (``_feature_normalizer.mean`` /
``.tx``, or without the underscore) becomes ``RadioModel.feature_norm`` (``config.feature_normalizer``),
applied, as the official model does, to the patch tokens only: the backbone features and the adaptor
feature heads read normalised patches, the backbone summary and the adaptor summary heads the raw CLS tokens.
A per-block intermediate normaliser (``_intermediate_feature_normalizer.means`` / ``.alphas`` / ``.rotation``,
or under the module name ``inter_feature_normalizer.``) becomes ``RadioModel.intermediate_norm``
(``config.intermediate_normalizer``), applied by ``forward_intermediates`` as the official model does.

ViTDet (``window_size``): the number of global blocks is the ``vitdet_num_global`` argument, else
``args.vitdet_num_global`` (radio_v2.5-g and c-radio_v2-g use 8), else 4; ``args.vitdet_num_windowed``
(RADIOv2: 5) instead fixes the period to ``num_windowed + 1``. Weights load in ``dtype`` (else
``args.dtype`` when it is a torch dtype, else float32); the input normaliser stays float32 and the
normalised pixels are cast to the model's dtype, as the official input conditioner does.

Only load checkpoints you trust: a ``.pth`` holding a Namespace needs ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import torch

from .config import AdaptorSpec, RadioConfig

# timm ViT names -> number of heads (the weights do not say).
_TIMM_HEADS = (
    ("so400m", 16),
    ("vit_tiny", 3),
    ("vit_small", 6),
    ("vit_base", 12),
    ("vit_large", 16),
    ("vit_huge", 16),
    ("vit_giant", 16),
    ("vit_gigantic", 16),
)
_FEATURE_NORMALIZERS = ("_feature_normalizer.", "feature_normalizer.")
_INTERMEDIATE_NORMALIZERS = ("_intermediate_feature_normalizer.", "inter_feature_normalizer.")
_BACKBONE_RENAMES = {
    "patch_generator.embedder.weight": "patch_embed.proj.weight",
    "patch_generator.pos_embed": "cpe.pos_embed",
    "patch_generator.cls_token.token": "prefix_tokens",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _count_inner(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    n = 0
    while f"{prefix}blocks.{n}.0.weight" in state:
        n += 1
    return n


def _split_layout(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Drop DDP / wrapper prefixes; return ("training" | "wrapper", state)."""
    state = {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}
    # RADIO's LayerScale stores its gain as "grandma" (Hugging Face loaders rewrite "gamma" keys); ours is "gamma".
    state = {re.sub(r"\.(ls[12])\.grandma$", r".\1.gamma", k): v for k, v in state.items()}
    if any(k.startswith("radio_model.") for k in state):
        state = _strip(state, "radio_model.")
    if any(k.startswith("base_model.") for k in state):
        return "training", state
    if any(k.startswith("model.") for k in state):
        return "wrapper", state
    raise ValueError(
        "checkpoint state dict has neither 'base_model.*' (training layout) nor '[radio_model.]model.*' "
        "(wrapper layout) keys; is it a RADIO checkpoint?"
    )


def _num_heads(args: Any, embed_dim: int, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    kwargs = _arg(args, "model_kwargs", None) or {}
    if "num_heads" in kwargs:
        return int(kwargs["num_heads"])
    name = str(_arg(args, "model", "")).lower()
    for key, heads in _TIMM_HEADS:
        if key in name:
            return heads
    if embed_dim % 64 == 0:
        return embed_dim // 64
    raise ValueError(f"cannot tell the number of heads of model {name!r} (embed_dim {embed_dim}); pass num_heads=")


def _summary_idxs(args: Any, state: dict[str, torch.Tensor], num_cls: int) -> list[int]:
    if "summary_idxs" in state:
        return [int(i) for i in state["summary_idxs"].tolist()]
    if not _arg(args, "cls_token_per_teacher", True):
        return [0]
    first_index: dict[str, int] = {}
    for i, teacher in enumerate(_arg(args, "teachers", []) or []):
        if teacher.get("use_summary", True):
            first_index.setdefault(teacher["name"], i)
    return sorted(first_index.values()) or list(range(num_cls))


def _feature_normalizer(state: dict) -> dict[str, torch.Tensor]:
    """{"mean": (D,), "tx": (D, D)} of the checkpoint's feature normaliser, or {} when it has none."""
    for prefix in _FEATURE_NORMALIZERS:
        found = _strip(state, prefix)
        if found:
            if set(found) != {"mean", "tx"}:
                raise ValueError(f"{prefix}* must hold 'mean' and 'tx', got {sorted(found)}")
            return {"mean": found["mean"].reshape(-1), "tx": found["tx"]}
    return {}


def _intermediate_normalizer(state: dict, depth: int, dim: int) -> tuple[str, dict[str, torch.Tensor]]:
    """("shared" | "per_block", {"means", "alphas", "rotation"}) of the checkpoint's per-block
    intermediate normaliser, or ("none", {}) when it has none."""
    for prefix in _INTERMEDIATE_NORMALIZERS:
        found = _strip(state, prefix)
        if not found:
            continue
        if set(found) != {"means", "alphas", "rotation"}:
            raise ValueError(f"{prefix}* must hold 'means', 'alphas' and 'rotation', got {sorted(found)}")
        means, alphas, rotation = found["means"], found["alphas"].reshape(-1), found["rotation"]
        shapes = {"means": (depth, dim), "alphas": (depth,)}
        kind = "per_block" if rotation.ndim == 3 else "shared"
        shapes["rotation"] = (depth, dim, dim) if kind == "per_block" else (dim, dim)
        for name, tensor in (("means", means), ("alphas", alphas), ("rotation", rotation)):
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"{prefix}{name} must have shape {shapes[name]} for {depth} blocks of width {dim}, "
                    f"got {tuple(tensor.shape)}"
                )
        return kind, {"means": means, "alphas": alphas, "rotation": rotation}
    return "none", {}


def _vitdet_schedule(args: Any, depth: int, window_size: int | None, num_global: int | None) -> dict[str, Any]:
    """RadioConfig fields of the ViTDet global-block schedule (official: num_global, else num_windowed)."""
    if window_size is None:
        return {}
    if num_global is None:
        num_windowed = _arg(args, "vitdet_num_windowed", None)
        if num_windowed is not None:
            period = int(num_windowed) + 1
            return {"global_blocks": [i for i in range(depth) if i % period == period - 1]}
        num_global = _arg(args, "vitdet_num_global", None) or 4
    if not isinstance(num_global, int) or isinstance(num_global, bool) or num_global <= 0:
        raise ValueError(f"vitdet_num_global must be a positive int, got {num_global!r}")
    return {"num_global": num_global}


def _backbone_config(args, backbone, state, num_heads, window_size, vitdet_prefix, num_global) -> RadioConfig:
    for key in ("patch_generator.embedder.weight", "patch_generator.pos_embed", "patch_generator.cls_token.token"):
        if key not in backbone:
            raise ValueError(f"checkpoint backbone lacks {key!r}: only CPE ViTs (RADIOv2.5 / C-RADIO) are supported")
    embed = backbone["patch_generator.embedder.weight"]
    embed_dim, in_features = embed.shape
    patch = math.isqrt(in_features // 3)
    if 3 * patch * patch != in_features:
        raise ValueError(f"patch embedder has {in_features} inputs, not 3 * p * p")
    table = backbone["patch_generator.pos_embed"].shape[1]
    side = math.isqrt(table)
    if side * side != table:
        raise ValueError(f"position table has {table} entries, not a square")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in backbone:
        depth += 1
    teachers = _arg(args, "teachers", []) or []
    num_prefix = backbone["patch_generator.cls_token.token"].shape[0]
    if _arg(args, "cls_token_per_teacher", True) and teachers:
        num_cls = len({t["name"] for t in teachers})
    else:
        num_cls = 1
    num_cls = min(num_cls, num_prefix)
    layer_scale = 1e-5 if "blocks.0.ls1.gamma" in backbone else None
    return RadioConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=_num_heads(args, embed_dim, num_heads),
        mlp_dim=backbone["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in backbone,
        layer_scale=layer_scale,
        num_cls_tokens=num_cls,
        num_registers=num_prefix - num_cls,
        summary_idxs=_summary_idxs(args, state, num_cls),
        cpe_max_size=side * patch,
        window_size=window_size,
        vitdet_prefix=vitdet_prefix,
        final_norm="norm.weight" in backbone,
        **_vitdet_schedule(args, depth, window_size, num_global),
    )


def _head_states(layout, state, args, names) -> dict[str, tuple[dict, dict, int, dict]]:
    """name -> (summary head state, spatial head state, teacher index, teacher config)."""
    teachers = _arg(args, "teachers", []) or []
    out = {}
    for tidx, teacher in enumerate(teachers):
        name = teacher["name"]
        if name in out or (names is not None and name not in names):
            continue
        if layout == "training":
            summ = _strip(state, f"_heads.{tidx}.") or _strip(state, f"_heads.{name}.")
            feat = _strip(state, f"_feature_projections.{tidx}.") or _strip(state, f"_feature_projections.{name}.")
        else:
            summ = _strip(state, f"adaptors.{name}.head_mlp.")
            feat = _strip(state, f"adaptors.{name}.feat_mlp.")
        if feat:
            out[name] = (summ, feat, tidx, teacher)
    if names is not None:
        missing = [n for n in names if n not in out]
        if missing:
            known = [t["name"] for t in teachers]
            raise ValueError(f"adaptor_names {missing} have no heads in the checkpoint; teachers: {known}")
    return out


def _adaptor_spec(name, summ, feat, tidx, teacher, args) -> AdaptorSpec:
    if any("parametrizations" in k for k in {**summ, **feat}):
        raise ValueError(f"adaptor {name!r} has spectral-reparametrised weights; load the EMA state dict")
    if summ and "final.2.weight" not in summ:
        raise ValueError(f"adaptor {name!r}: only MLP2 ('v2') summary heads are supported")
    attn = "mlp.fc1.weight" in feat
    f = "mlp." if attn else ""
    if f"{f}final.2.weight" not in feat:
        raise ValueError(f"adaptor {name!r}: only MLP2 ('v2') and attention ('attn') spatial heads are supported")
    k = int(teacher.get("fd_upsample_factor") or 1)
    out_dim = feat[f"{f}final.2.weight"].shape[0]
    if out_dim % (k * k):
        raise ValueError(f"adaptor {name!r}: spatial head width {out_dim} is not a multiple of {k}^2")
    pre_norm = f"{f}pre_norm.0.weight" in feat
    if summ and ("pre_norm.0.weight" in summ) != pre_norm:
        raise ValueError(f"adaptor {name!r}: summary and spatial heads disagree on pre_norm")
    cls_index = int(teacher.get("token_slot", tidx)) if _arg(args, "cls_token_per_teacher", True) else 0
    return AdaptorSpec(
        name=name,
        summary_dim=summ["final.2.weight"].shape[0] if summ else None,
        feature_dim=out_dim // (k * k),
        head="attn" if attn else "mlp",
        upsample_factor=k,
        hidden_dim=summ["fc1.weight"].shape[0] if summ else feat[f"{f}fc1.weight"].shape[0],
        feature_hidden_dim=feat[f"{f}fc1.weight"].shape[0],
        num_inner=_count_inner(summ),
        feature_num_inner=_count_inner(feat, f),
        pre_norm=pre_norm,
        cls_index=cls_index,
    )


def load_radio_checkpoint(
    model_cls,
    checkpoint: str | os.PathLike | dict,
    *,
    adaptor_names: list[str] | None = None,
    use_ema: bool = True,
    num_heads: int | None = None,
    window_size: int | None = None,
    vitdet_prefix: str = "skip",
    vitdet_num_global: int | None = None,
    dtype: torch.dtype | None = None,
):
    """Build ``model_cls`` (a ``RadioModel``) from an official RADIO checkpoint, in eval mode.

    Args:
        checkpoint: path of a ``.pth`` / ``.pth.tar`` file, or the loaded dict.
        adaptor_names: teachers whose heads to load; None loads every teacher with heads, [] none.
        use_ema: prefer ``state_dict_ema`` when present.
        num_heads: head count when neither ``args`` nor the timm model name gives it.
        window_size, vitdet_prefix: run the loaded model in ViTDet mode (official: window 8/16, "skip").
        vitdet_num_global: global blocks in ViTDet mode (None: ``args.vitdet_num_global``, else 4).
        dtype: parameter dtype (None: ``args.dtype`` when it is a torch dtype, else float32).
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "args" not in checkpoint or not any(k in checkpoint for k in ("state_dict", "state_dict_ema")):
        raise ValueError("checkpoint must be a dict with 'args' and 'state_dict' / 'state_dict_ema'")
    args = checkpoint["args"]
    key = "state_dict_ema" if use_ema and "state_dict_ema" in checkpoint else "state_dict"
    layout, state = _split_layout(checkpoint[key])
    backbone = _strip(state, "base_model." if layout == "training" else "model.")
    if any("parametrizations" in k for k in backbone):
        raise ValueError("backbone has spectral-reparametrised weights; load the EMA state dict (use_ema=True)")

    config = _backbone_config(args, backbone, state, num_heads, window_size, vitdet_prefix, vitdet_num_global)
    feature_norm = _feature_normalizer(state)
    if feature_norm:
        config = dataclasses.replace(config, feature_normalizer=True)
    inter_kind, inter_norm = _intermediate_normalizer(state, config.depth, config.embed_dim)
    config = dataclasses.replace(config, intermediate_normalizer=inter_kind)
    heads = _head_states(layout, state, args, adaptor_names)
    specs = [_adaptor_spec(name, *parts, args) for name, parts in heads.items()]
    model = model_cls(config, specs)

    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in backbone.items():
        if k in _BACKBONE_RENAMES:
            mapped[_BACKBONE_RENAMES[k]] = v
        elif k.startswith("blocks."):
            mapped[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"checkpoint backbone has keys RadioModel does not support: {sorted(unknown)[:8]}")
    conditioner = _strip(state, "input_conditioner.")
    mapped["input_norm.mean"] = conditioner.get("norm_mean", model.input_norm.mean).reshape(3, 1, 1)
    mapped["input_norm.std"] = conditioner.get("norm_std", model.input_norm.std).reshape(3, 1, 1)
    for name, (summ, feat, _, _) in heads.items():
        mapped.update({f"adaptors.{name}.summary_head.{k}": v for k, v in summ.items()})
        mapped.update({f"adaptors.{name}.feature_head.{k}": v for k, v in feat.items()})

    mapped.update({f"feature_norm.{k}": v for k, v in feature_norm.items()})
    mapped.update({f"intermediate_norm.{k}": v for k, v in inter_norm.items()})
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the inferred architecture: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    if dtype is None:
        dtype = _arg(args, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    model.to(dtype)
    model.input_norm.float()  # pixels are normalised in float32, then cast (RadioModel._embed)
    return model.eval()
