"""PCA-to-RGB pictures of feature maps (the paper's Figure 2 style), and the panels of ``radio viz``.

``pca_rgb(maps)`` projects the tokens of one or more feature maps (h, w, C) onto their top three
principal components and maps each component to a colour channel::

    X = all tokens of all maps given (N, C), centred: Xc = X - mean(X)
    Xc = U S V^T (SVD);  P = Xc V[:, :3]                       3 principal components
    sign of component k: chosen so that sum(P_k^3) >= 0       (deterministic; X and -X look the same)
    rgb_k = clip((P_k - q01_k) / (q99_k - q01_k), 0, 1)       robust 1%..99% quantile scaling

The fit is **joint over the maps passed in one call** (same colours = same features across them);
pass one map per call for one fit per map. ``radio viz`` fits each map on its own, because the
student backbone, every adaptor and every teacher live in different feature spaces.

Constant or low-rank features: a component whose singular value is below ``rtol`` times the norm
of the (uncentred) tokens carries only round-off and is shown as mid-grey 0.5, so a constant map
is uniformly grey (no amplified noise) and a rank-1 map varies in the red channel only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["feature_panels", "fit_size", "load_image", "pca_rgb", "save_panels"]


def _as_maps(maps) -> list[torch.Tensor]:
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        maps = [maps]
    if not isinstance(maps, Sequence) or len(maps) == 0:
        raise TypeError("maps must be a feature map (h, w, C) or a non-empty list of them")
    out = []
    for i, m in enumerate(maps):
        if isinstance(m, np.ndarray):
            m = torch.from_numpy(m)
        if not isinstance(m, torch.Tensor) or m.is_complex() or m.dtype == torch.bool:
            raise TypeError(f"maps[{i}] must be a real-valued tensor or array, got {getattr(m, 'dtype', type(m))}")
        if m.ndim != 3 or m.shape[0] == 0 or m.shape[1] == 0 or m.shape[2] == 0:
            raise ValueError(f"maps[{i}] must have shape (h, w, C) with h, w, C >= 1, got {tuple(m.shape)}")
        if out and m.shape[-1] != out[0].shape[-1]:
            raise ValueError(
                f"maps[{i}] has {m.shape[-1]} channels but maps[0] has {out[0].shape[-1]}: a joint fit needs one space"
            )
        m = m.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"maps[{i}] holds NaN or inf values")
        out.append(m)
    return out


def pca_rgb(maps, *, quantile: float = 0.01, rtol: float = 1e-5) -> list[np.ndarray]:
    """RGB images (h, w, 3) float32 in [0, 1], one per map; one PCA fitted jointly over all ``maps``.

    maps: a tensor/array (h, w, C) or a list of them with equal C (sizes may differ).
    quantile: the colour range of each component is its [quantile, 1 - quantile] interval.
    rtol: components with singular value <= rtol * ||X|| count as absent (mid-grey).
    """
    if not 0 <= quantile < 0.5:
        raise ValueError(f"quantile must be in [0, 0.5), got {quantile}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    maps = _as_maps(maps)
    tokens = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
    centred = tokens - tokens.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(3, vh.shape[0])
    keep = s[:k] > rtol * float(tokens.norm())
    proj = centred @ vh[:k].T  # (N, k)
    proj = proj * torch.where(proj.pow(3).sum(0) >= 0, 1.0, -1.0)
    rgb = torch.full((tokens.shape[0], 3), 0.5, dtype=torch.float64)
    for c in range(k):
        if not keep[c]:
            continue
        lo, hi = torch.quantile(proj[:, c], torch.tensor([quantile, 1 - quantile], dtype=torch.float64))
        span = float(hi - lo)
        if span > 0:
            rgb[:, c] = ((proj[:, c] - lo) / span).clamp(0, 1)
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        out.append(rgb[start : start + n].reshape(m.shape[0], m.shape[1], 3).float().numpy())
        start += n
    return out


# ----------------------------------------------------------------------------------------------
# panels: image -> student backbone / adaptors / teachers
# ----------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as (3, H, W) float32 RGB in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        if os.path.exists(path):
            raise ValueError(f"image {str(path)!r} is not a file")
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError as e:
        raise ValueError(f"image {str(path)!r} is not a readable image file") from e
    except Image.DecompressionBombError as e:  # far more pixels than any network here could take
        raise ValueError(f"image {str(path)!r} is too large to load: {e}") from e
    except (OSError, SyntaxError) as e:  # a truncated or corrupt file decodes partway, then fails
        raise ValueError(f"image {str(path)!r} could not be decoded (truncated or corrupt?): {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_size(height: int, width: int, long_side: int, step: int) -> tuple[int, int]:
    """(H, W) with the aspect ratio of height x width, the long side ~ ``long_side``, both multiples of ``step``."""
    if min(height, width, long_side, step) <= 0:
        raise ValueError(f"fit_size: sizes must be positive, got {height}x{width}, long_side={long_side}, step={step}")
    scale = long_side / max(height, width)
    snap = lambda side: max(step, round(side * scale / step) * step)
    return snap(height), snap(width)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@torch.no_grad()
def feature_panels(
    image: torch.Tensor, model=None, teachers: Mapping[str, object] | None = None, long_side: int = 256
) -> list[tuple[str, np.ndarray]]:
    """(title, RGB) panels: the input, then the student backbone and each adaptor, then each teacher.

    image: (3, H, W) in [0, 1]. model: a ``RadioModel`` (or None). teachers: {label: Teacher}.
    Each network sees the image resized to about ``long_side`` on its long side, sides snapped to its
    own step (the student's ``min_resolution_step``, a teacher's patch); a fixed-size teacher (SAM3)
    sees it stretched to its one accepted square. One PCA per feature map.
    """
    teachers = dict(teachers or {})
    if model is None and not teachers:
        raise ValueError("nothing to show: give a model, teachers, or both")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image).__name__)}")
    h, w = image.shape[-2:]
    panels = [("input", image.permute(1, 2, 0).clamp(0, 1).numpy())]
    if model is not None:
        model.eval()
        x = _resize(image, fit_size(h, w, long_side, model.min_resolution_step))
        out = model(x, feature_fmt="NHWC")
        outputs = out.items() if isinstance(out, dict) else [("backbone", out)]
        for name, o in outputs:
            title = "student backbone" if name == "backbone" else f"student -> {name}"
            panels.append((title, pca_rgb(o.features[0])[0]))
    for label, teacher in teachers.items():
        if teacher.fixed_size is not None:
            size = (teacher.fixed_size, teacher.fixed_size)
        else:
            size = fit_size(h, w, long_side, teacher.patch_size)
        feats = teacher(_resize(image, size)).features[0]
        panels.append((f"teacher {label}", pca_rgb(feats.float())[0]))
    return panels


def save_panels(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, columns: int = 4) -> None:
    """One row-major grid of panels (nearest-neighbour upsampling: one block per token) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("save_panels: no panels")
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, rgb) in zip(axes.flat, panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
