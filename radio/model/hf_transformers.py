"""Folders of ``transformers.RadioModel`` (``model_type = "radio"``): read them, and write ours as one.

transformers (5.x) ships its own RADIO port. A folder it writes holds ``config.json`` (a
``transformers.RadioConfig``) and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Its weights come in one of two key layouts, and both are read:

    hub layout (what ``save_pretrained`` writes)       module layout (``RadioModel.state_dict()``)
    radio_model.input_conditioner.norm_mean / _std     input_conditioner.norm_mean / _std
    radio_model.model.patch_generator.embedder.weight  embeddings.patch_projection.weight
    radio_model.model.patch_generator.pos_embed        embeddings.position_embedding
    radio_model.model.patch_generator.cls_token.token  embeddings.cls_register_token
    radio_model.model.blocks.<i>.attn.qkv.*            encoder.layer.<i>.attention.{q,k,v}_proj.*
    radio_model.model.blocks.<i>.attn.proj.*           encoder.layer.<i>.attention.o_proj.*
    radio_model.model.blocks.<i>.<rest>                encoder.layer.<i>.<rest>
    radio_model.summary_idxs                           summary_idxs

``<rest>``: norm1, norm2, layer_scale1.lambda1, layer_scale2.lambda1, and mlp.fc1 / mlp.fc2 or (SwiGLU)
mlp.gate_proj / mlp.up_proj / mlp.down_proj. Mapping onto ``RadioModel`` (this project):

    input_conditioner.*          input_norm.mean / input_norm.std
    patch_generator.embedder     patch_embed.proj      (both flatten a patch as (channel, row, col))
    patch_generator.pos_embed    cpe.pos_embed         (1, R*R, D), R = max_img_size / patch_size
    patch_generator.cls_token    prefix_tokens         (num_cls_tokens + num_registers, D)
    blocks.<i>.layer_scale<j>    blocks.<i>.ls<j>.gamma   (all ones and layerscale_value 1: no LayerScale)

transformers' model has no final norm, no ViTDet windows and no teacher heads: a loaded folder gets
``final_norm=False``; its eval-mode CPE (table resized to max(h, w) squared, top-left corner) is ours.

Export (``RadioModel.save_pretrained(OUT, format="transformers")``) writes the hub layout above, which
``transformers.RadioModel.from_pretrained(OUT)`` loads, plus the side file ``radio_extras.safetensors``
for what transformers has no place for:

    metadata "format"      "radio-transformers-extras"
    metadata "version"     "1"
    metadata "config"      JSON of this project's full ``RadioConfig`` (training-only fields included)
    metadata "adaptors"    JSON list of ``AdaptorSpec`` dicts
    tensors                ``RadioModel.state_dict()`` entries outside the backbone: ``adaptors.<name>.*``
                           (teacher heads), ``norm.*`` (final LayerNorm), ``feature_norm.*``,
                           ``intermediate_norm.*``

Reading the folder back with ``RadioModel.from_pretrained`` restores the exact model. The teachers'
PHI-S transforms, which ``radio export`` writes, sit next to it in ``teacher_normalizers.safetensors``
(``radio.normalize.load_normalizers``), as in the native format. A backbone with a final LayerNorm or
feature normaliser exports with a warning: transformers' model skips them (they are in the side file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch

from .config import AdaptorSpec, RadioConfig

__all__ = [
    "EXTRAS_FILE",
    "is_transformers_folder",
    "load_transformers_folder",
    "read_transformers_state",
    "save_transformers_folder",
    "transformers_config_dict",
]

HF_MODEL_TYPE = "radio"
EXTRAS_FILE = "radio_extras.safetensors"
EXTRAS_FORMAT = "radio-transformers-extras"
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_EPS = 1e-6  # LayerNorm eps of our backbone blocks

# module layout -> hub layout, applied in order to a key (after the q/k/v merge).
_MODULE_TO_HUB = (
    ("embeddings.video_patch_projection.", "model.patch_generator.video_embedder."),
    ("embeddings.patch_projection.", "model.patch_generator.embedder."),
    ("embeddings.position_embedding", "model.patch_generator.pos_embed"),
    ("embeddings.cls_register_token", "model.patch_generator.cls_token.token"),
    ("encoder.layer.", "model.blocks."),
    (".attention.o_proj.", ".attn.proj."),
)
# hub layout (without "radio_model.") -> our state-dict key, for the non-block tensors.
_HUB_TO_OURS = {
    "input_conditioner.norm_mean": "input_norm.mean",
    "input_conditioner.norm_std": "input_norm.std",
    "model.patch_generator.embedder.weight": "patch_embed.proj.weight",
    "model.patch_generator.pos_embed": "cpe.pos_embed",
    "model.patch_generator.cls_token.token": "prefix_tokens",
}
# our block key suffix -> hub block key suffix
_BLOCK_TO_HUB = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
_VIDEO_KEY = "model.patch_generator.video_embedder.weight"


# ------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def is_transformers_folder(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` is a transformers RADIO config (``model_type == "radio"``)."""
    path = Path(directory) / _CONFIG
    if not path.is_file():
        return False
    try:
        return _read_json(path).get("model_type") == HF_MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def read_transformers_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors weights (one file, or the shards of the index)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / _INDEX).is_file():
        weight_map = _read_json(directory / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{directory / _INDEX} has no 'weight_map'")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / shard)))
        missing = set(weight_map) - set(state)
        if missing:
            raise ValueError(f"shards of {directory} lack tensors listed in {_INDEX}: {sorted(missing)[:5]}")
        return state
    if (directory / _WEIGHTS).is_file():
        return load_file(str(directory / _WEIGHTS))
    raise ValueError(
        f"transformers RADIO folder {str(directory)!r} has neither {_WEIGHTS} nor {_INDEX} "
        "(only safetensors weights are read)"
    )


def to_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either key layout -> the hub layout without its ``radio_model.`` prefix (q/k/v merged into qkv)."""
    if any(k.startswith("radio_model.") for k in state):
        return {k[len("radio_model.") :]: v for k, v in state.items() if k.startswith("radio_model.")}
    # Module layout, possibly under a wrapper's "model." (RadioPreTrainedModel.base_model_prefix).
    if any(k.startswith("model.embeddings.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(encoder\.layer\.\d+\.attention\.)([qkv])_proj\.(weight|bias)", key)
        if match:
            if match.group(2) != "q":
                continue  # merged with q below
            prefix, kind = match.group(1), match.group(3)
            parts = [state.get(f"{prefix}{p}_proj.{kind}") for p in "qkv"]
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint has {key} but not all of q/k/v_proj.{kind} of that layer")
            key, value = f"{prefix}qkv.{kind}", torch.cat(parts, dim=0)
            key = key.replace(".attention.qkv.", ".attn.qkv.")
        for old, new in _MODULE_TO_HUB:
            key = key.replace(old, new)
        out[key] = value
    return out


def _mlp_width(cfg: dict) -> int:
    """Hidden width of transformers' MLP (``int(D * mlp_ratio)``) or SwiGLU (two thirds, rounded up to 8)."""
    width = int(cfg["hidden_size"] * cfg["mlp_ratio"])
    if cfg.get("use_swiglu_ffn", False):
        width = (int(width * 2 / 3) + 7) // 8 * 8
    return width


def config_from_transformers(cfg: dict, layer_scale: float | None) -> RadioConfig:
    """Our ``RadioConfig`` for a transformers RADIO config dict (``layer_scale`` read off the weights)."""
    defaults = {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "mlp_ratio": 4.0,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "num_channels": 3,
        "patch_size": 16,
        "max_img_size": 2048,
        "num_cls_tokens": 3,
        "num_registers": 7,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
    }
    cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg["num_channels"] != 3:
        raise ValueError(f"transformers RADIO config: num_channels must be 3, got {cfg['num_channels']}")
    if cfg["hidden_act"] != "gelu" and not cfg["use_swiglu_ffn"]:
        raise ValueError(f"transformers RADIO config: hidden_act must be 'gelu', got {cfg['hidden_act']!r}")
    if not math.isclose(cfg["layer_norm_eps"], _EPS, rel_tol=1e-6):
        raise ValueError(f"transformers RADIO config: layer_norm_eps must be {_EPS}, got {cfg['layer_norm_eps']}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError("transformers RADIO config: head_dim * num_attention_heads must equal hidden_size")
    summary_idxs = cfg.get("summary_idxs") or [0, 1]
    return RadioConfig(
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_dim=_mlp_width(cfg),
        patch_size=cfg["patch_size"],
        qkv_bias=bool(cfg["qkv_bias"]),
        layer_scale=layer_scale,
        num_cls_tokens=cfg["num_cls_tokens"],
        num_registers=cfg["num_registers"],
        summary_idxs=[int(i) for i in summary_idxs],
        cpe_max_size=cfg["max_img_size"],
        final_norm=False,
        ffn="swiglu" if cfg["use_swiglu_ffn"] else "mlp",
    )


def _layer_scale(hub: dict[str, torch.Tensor], cfg: dict) -> float | None:
    """None (no LayerScale) when every lambda is 1 (or absent with layerscale_value 1), else its init value."""
    value = float(cfg.get("layerscale_value", 1.0))
    lambdas = [v for k, v in hub.items() if re.search(r"\.layer_scale[12]\.lambda1$", k)]
    if value == 1.0 and all(bool((v == 1).all()) for v in lambdas):
        return None
    return value


def _backbone_state(hub: dict, config: RadioConfig, layer_scale_value: float) -> dict[str, torch.Tensor]:
    """Our backbone state dict from hub-layout tensors; ValueError on missing or unexpected tensors."""
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in hub.items():
        if key in _HUB_TO_OURS:
            ours[_HUB_TO_OURS[key]] = value
        elif key in ("summary_idxs", _VIDEO_KEY):
            continue
        elif match := re.fullmatch(r"model\.blocks\.(\d+)\.(.+)", key):
            index, rest = match.groups()
            rest = {v: k for k, v in _BLOCK_TO_HUB.items()}.get(rest, rest)
            if rest.startswith("ls") and config.layer_scale is None:
                continue  # all ones: the identity we build without LayerScale
            ours[f"blocks.{index}.{rest}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"transformers RADIO weights have tensors RadioModel does not know: {sorted(unexpected)[:8]}")
    if config.layer_scale is not None:  # transformers fills absent lambdas with layerscale_value
        for i in range(config.depth):
            for j in (1, 2):
                ours.setdefault(f"blocks.{i}.ls{j}.gamma", torch.full((config.embed_dim,), layer_scale_value))
    for key in ("input_norm.mean", "input_norm.std"):
        if key in ours:
            ours[key] = ours[key].reshape(3, 1, 1)
    return ours


def _read_extras(directory: Path) -> tuple[dict, list[dict], dict[str, torch.Tensor]] | None:
    from safetensors import safe_open

    path = directory / EXTRAS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != EXTRAS_FORMAT:
        raise ValueError(f"{path} is not a {EXTRAS_FORMAT} file (format={meta.get('format')!r})")
    return json.loads(meta["config"]), json.loads(meta["adaptors"]), tensors


# Fields that fix the backbone's tensors: the side file's config must agree with config.json on them.
_ARCH_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "hidden_dim",
    "patch_size",
    "qkv_bias",
    "num_cls_tokens",
    "num_registers",
    "summary_idxs",
    "cpe_max_size",
    "ffn",
)


def load_transformers_folder(model_cls, directory: str | os.PathLike, map_location="cpu"):
    """Build ``model_cls`` (a ``RadioModel``) from a transformers RADIO folder; eval mode.

    With a ``radio_extras.safetensors`` side file (written by our export) the model comes back exactly:
    full config, final norm / feature normalisers and adaptor heads.
    """
    directory = Path(directory)
    hf_cfg = _read_json(directory / _CONFIG)
    hub = to_hub_layout(read_transformers_state(directory))
    if _VIDEO_KEY in hub:
        warnings.warn(
            f"{directory}: the video patch projection (video_temporal_patch_size) is not used by RadioModel; "
            "only the image path is loaded",
            stacklevel=3,
        )
    layer_scale = _layer_scale(hub, hf_cfg)
    config = config_from_transformers(hf_cfg, layer_scale)
    if "summary_idxs" in hub and hub["summary_idxs"].tolist() != config.summary_idxs:
        raise ValueError(
            f"{directory}: summary_idxs tensor {hub['summary_idxs'].tolist()} disagrees with config.json's "
            f"{config.summary_idxs}"
        )
    adaptors: list[AdaptorSpec] = []
    extra_tensors: dict[str, torch.Tensor] = {}
    extras = _read_extras(directory)
    if extras is not None:
        saved_cfg, saved_adaptors, extra_tensors = extras
        saved = RadioConfig.from_dict(saved_cfg)
        diff = [f for f in _ARCH_FIELDS if getattr(saved, f) != getattr(config, f)]
        if diff or (saved.layer_scale is None) != (config.layer_scale is None):
            raise ValueError(
                f"{directory / EXTRAS_FILE} does not belong to this config.json: they differ in "
                f"{diff or ['layer_scale']}"
            )
        config = saved
        adaptors = [AdaptorSpec.from_dict(a) for a in saved_adaptors]
    model = model_cls(config, adaptors)
    state = _backbone_state(hub, config, float(hf_cfg.get("layerscale_value", 1.0)))
    # A folder without conditioner buffers keeps transformers' defaults, the CLIP statistics we start from.
    state.setdefault("input_norm.mean", model.input_norm.mean)
    state.setdefault("input_norm.std", model.input_norm.std)
    state.update(extra_tensors)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{directory}: weights do not match the config: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model.to(map_location).eval()


# ------------------------------------------------------------------------------------ writing
def _ratio_for(width: int, dim: int, swiglu: bool) -> float:
    """An mlp_ratio for which transformers' width formula gives ``width`` (ValueError if none exists)."""
    candidates = [width]
    if swiglu:
        if width % 8:
            raise ValueError(f"a SwiGLU width must be a multiple of 8 for transformers' RADIO, got {width}")
        candidates = [m for m in range(math.ceil((width - 8) * 1.5), math.ceil(width * 1.5) + 3)]
    for m in candidates:
        cfg = {"hidden_size": dim, "use_swiglu_ffn": swiglu}
        ratio = m / dim
        for _ in range(4):  # float rounding: nudge up until int(dim * ratio) == m
            if int(dim * ratio) == m and _mlp_width({**cfg, "mlp_ratio": ratio}) == width:
                return ratio
            ratio = math.nextafter(ratio, math.inf)
    raise ValueError(f"no mlp_ratio gives transformers' RADIO an MLP width of {width} for hidden size {dim}")


def transformers_config_dict(model) -> dict:
    """The ``config.json`` of ``model`` (a ``RadioModel``) as a transformers RADIO config."""
    c: RadioConfig = model.config
    if any(c.windowed_blocks()):
        raise ValueError(
            "transformers' RadioModel has no ViTDet windows: export a model whose blocks all attend globally "
            f"(window_size=None), got window_size={c.window_size}"
        )
    swiglu = c.ffn == "swiglu"
    dtype = str(model.patch_embed.proj.weight.dtype).replace("torch.", "")
    return {
        "architectures": ["RadioModel"],
        "model_type": HF_MODEL_TYPE,
        "dtype": dtype,
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "mlp_ratio": _ratio_for(c.hidden_dim, c.embed_dim, swiglu),
        "hidden_act": "gelu",
        "layer_norm_eps": _EPS,
        "attention_probs_dropout_prob": 0.0,
        "hidden_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": swiglu,
        "qkv_bias": c.qkv_bias,
        "layerscale_value": 1.0 if c.layer_scale is None else float(c.layer_scale),
        "num_channels": 3,
        "patch_size": c.patch_size,
        "image_size": 512,  # informational: the model takes any supported size
        "max_img_size": c.cpe_max_size,
        "num_cls_tokens": c.num_cls_tokens,
        "num_registers": c.num_registers,
        "video_temporal_patch_size": None,
        "patch_dim": 3 * c.patch_size**2,
        "video_patch_dim": None,
        "summary_idxs": list(c.summary_idxs),
        "norm_mean": [float(x) for x in model.input_norm.mean.flatten().tolist()],
        "norm_std": [float(x) for x in model.input_norm.std.flatten().tolist()],
        "initializer_range": 0.02,
    }


def _hub_state(model) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(hub-layout tensors with the ``radio_model.`` prefix, our keys they cover)."""
    ours = model.state_dict()
    ours_of_hub = {v: k for k, v in _HUB_TO_OURS.items()}
    hub: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for key, value in ours.items():
        if key in ours_of_hub:
            hub[ours_of_hub[key]] = value
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            index, rest = match.groups()
            hub[f"model.blocks.{index}.{_BLOCK_TO_HUB.get(rest, rest)}"] = value
        else:
            continue
        covered.add(key)
    if model.config.layer_scale is None:  # transformers always has LayerScale: write the identity
        D = model.config.embed_dim
        for i in range(model.config.depth):
            for j in (1, 2):
                hub[f"model.blocks.{i}.layer_scale{j}.lambda1"] = torch.ones(D, dtype=model.prefix_tokens.dtype)
    hub["summary_idxs"] = torch.tensor(model.config.summary_idxs, dtype=torch.long)
    hub = {f"radio_model.{k}": v.detach().contiguous().cpu() for k, v in hub.items()}
    return hub, covered


def save_transformers_folder(model, directory: str | os.PathLike) -> None:
    """Write ``model`` as a transformers RADIO folder plus the ``radio_extras.safetensors`` side file."""
    from safetensors.torch import save_file

    config = transformers_config_dict(model)
    c: RadioConfig = model.config
    parts = (("final LayerNorm", c.final_norm), ("feature normaliser", c.feature_normalizer))
    skipped = [name for name, on in parts if on]
    if skipped:
        warnings.warn(
            f"transformers' RadioModel has no {' or '.join(skipped)}: its outputs will be this model's "
            f"before them. They are stored in {EXTRAS_FILE}, which RadioModel.from_pretrained applies.",
            stacklevel=3,
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hub, covered = _hub_state(model)
    for stale in (_INDEX,):  # a previous sharded export would shadow the single file
        (directory / stale).unlink(missing_ok=True)
    with open(directory / _CONFIG, "w") as f:
        json.dump(config, f, indent=2)
    save_file(hub, str(directory / _WEIGHTS), metadata={"format": "pt"})
    extras = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in covered}
    meta = {
        "format": EXTRAS_FORMAT,
        "version": "1",
        "config": json.dumps(dataclasses.asdict(c)),
        "adaptors": json.dumps([spec.to_dict() for spec in model.adaptor_specs]),
    }
    save_file(extras, str(directory / EXTRAS_FILE), metadata=meta)
