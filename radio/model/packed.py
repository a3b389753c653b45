"""Packed variable-size batches: images of different sizes in one forward pass, without padding.

The input layout is transformers' ``RadioModel`` one (``image_grid_hw``)::

    patches        (T, 3 * p * p)   every image's p x p patches in raster order, each flattened as
                                    (channel, row, col), images concatenated; pixel values in [0, 1]
    image_grid_hw  (S, 2)           each image's patch grid (h_s, w_s); T = sum_s h_s * w_s

Image s becomes the sequence [prefix tokens; h_s * w_s patch tokens + CPE(h_s, w_s)] and the S
sequences are concatenated into one (1, L, D) token row, L = sum_s (P + h_s w_s). Every block runs
on that row with block-diagonal attention over ``cu_seqlens`` = (0, L_0, L_0 + L_1, ...)
(``radio_kernels.attention``: one program per tile of one image, nothing spent on padding), so each
image's tokens are exactly what a forward pass on that image alone gives. Outputs, as transformers'::

    summary   (S, len(summary_idxs) * D)      per image
    features  (T, D)                          all images' patch tokens, concatenated (NLC only)

With adaptors the result is ``{"backbone": ..., teacher: RadioOutput}``; teacher features are
concatenated per image too (k*k*h_s*w_s rows each for upsample factor k). ``pack_images`` builds the
input from a list of (3, H, W) images and ``unpack_features`` splits features back per image.
ViTDet-windowed models are not supported here (their windows depend on each image's own grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .model import RadioOutput, format_features

__all__ = ["forward_packed", "pack_images", "unpack_features"]


def pack_images(images: Sequence[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H_s, W_s) images -> (patches (T, 3 p p), image_grid_hw (S, 2) int64), transformers' layout."""
    if isinstance(images, torch.Tensor) or not len(images):
        raise TypeError("images must be a non-empty sequence of (3, H, W) tensors")
    patches, grids = [], []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a (3, H, W) tensor, got {getattr(img, 'shape', type(img))}")
        H, W = img.shape[-2:]
        if H % patch_size or W % patch_size or H == 0 or W == 0:
            raise ValueError(f"images[{i}] sides must be positive multiples of patch_size={patch_size}, got {H}x{W}")
        patches.append(F.unfold(img[None], kernel_size=patch_size, stride=patch_size)[0].T)
        grids.append((H // patch_size, W // patch_size))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def unpack_features(features: torch.Tensor, image_grid_hw: torch.Tensor, fmt: str = "NHWC", upsample: int = 1):
    """Packed features (sum_s k^2 h_s w_s, C) -> a list of per-image (k h_s, k w_s, C) ("NHWC"),
    (C, k h_s, k w_s) ("NCHW") or (k^2 h_s w_s, C) ("NLC") tensors."""
    grids = [(int(h) * upsample, int(w) * upsample) for h, w in image_grid_hw.tolist()]
    parts = features.split([h * w for h, w in grids])
    return [format_features(p[None], h, w, fmt)[0] for p, (h, w) in zip(parts, grids)]


def check_packed_input(model, patches, image_grid_hw) -> list[tuple[int, int]]:
    """Validate a packed batch for ``model``; return the grids as a list of (h, w)."""
    p = model.patch_size
    if not isinstance(patches, torch.Tensor) or not patches.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of packed patches (T, 3*p*p), got {type(patches).__name__}")
    if patches.ndim != 2 or patches.shape[1] != 3 * p * p:
        raise ValueError(
            f"with image_grid_hw, x must have shape (T, 3*p*p) = (T, {3 * p * p}), got {tuple(patches.shape)}"
        )
    if not isinstance(image_grid_hw, torch.Tensor) or image_grid_hw.is_floating_point():
        raise TypeError("image_grid_hw must be an integer torch.Tensor of shape (S, 2)")
    if image_grid_hw.ndim != 2 or image_grid_hw.shape[1] != 2 or image_grid_hw.shape[0] == 0:
        raise ValueError(f"image_grid_hw must have shape (S, 2) with S >= 1, got {tuple(image_grid_hw.shape)}")
    grids = [(int(h), int(w)) for h, w in image_grid_hw.tolist()]
    top = model.max_resolution // p
    for s, (h, w) in enumerate(grids):
        if not (0 < h <= top and 0 < w <= top):
            raise ValueError(f"image_grid_hw[{s}] = ({h}, {w}) must be in [1, {top}] (max_resolution / patch_size)")
    total = sum(h * w for h, w in grids)
    if total != patches.shape[0]:
        raise ValueError(f"image_grid_hw covers {total} patches but x has {patches.shape[0]} rows")
    if any(model._windowed):
        raise ValueError(
            "packed batches (image_grid_hw) need global attention in every block; this model has ViTDet windows"
        )
    return grids


def forward_packed(model, patches, image_grid_hw, feature_fmt="NLC", generator=None, cpe_uniforms=None):
    """``RadioModel.forward(patches, image_grid_hw=...)``; see the module docstring."""
    if feature_fmt != "NLC":
        raise ValueError(f"feature_fmt must be 'NLC' with image_grid_hw (images differ in size), got {feature_fmt!r}")
    grids = check_packed_input(model, patches, image_grid_hw)
    if cpe_uniforms is not None and (
        not isinstance(cpe_uniforms, torch.Tensor) or cpe_uniforms.shape[:1] != (len(grids),)
    ):
        raise ValueError(f"cpe_uniforms must have shape (S, 5) = ({len(grids)}, 5) with image_grid_hw")
    cfg, p = model.config, model.patch_size
    x = patches.reshape(-1, 3, p, p)
    if not model._external_preprocessor:
        x = model.input_norm(x)
    tokens = model.patch_embed.proj(x.flatten(1))  # each row is already a (channel, row, col) patch
    rows, lengths = [], []
    for s, ((h, w), part) in enumerate(zip(grids, tokens.split([h * w for h, w in grids]))):
        uniforms = cpe_uniforms[s : s + 1] if cpe_uniforms is not None else None
        rows += [model.prefix_tokens.to(part.dtype), model.cpe(part[None], (h, w), generator, uniforms)[0]]
        lengths.append(cfg.num_prefix_tokens + h * w)
    x = torch.cat(rows)[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for block in model.blocks:
        x = model._run_block(block, x, {"cu_seqlens": cu})
    x = model._final_norm(x)[0]
    P = cfg.num_prefix_tokens
    seqs = x.split(lengths)
    summary = torch.stack([seq[cfg.summary_idxs].flatten() for seq in seqs])
    patch_tokens = [seq[P:] for seq in seqs]
    backbone = RadioOutput(summary, torch.cat(patch_tokens))
    if not model.adaptor_specs:
        return backbone
    out = {"backbone": backbone}
    for spec in model.adaptor_specs:
        heads = [
            model.adaptors[spec.name](seq[None, spec.cls_index], pt[None], g)
            for seq, pt, g in zip(seqs, patch_tokens, grids)
        ]
        summaries = [h[0] for h in heads]
        head_summary = torch.cat(summaries) if summaries[0] is not None else None
        out[spec.name] = RadioOutput(head_summary, torch.cat([h[1][0] for h in heads]))
    return out
