"""Training data: image sources, per-sample views with whole-patch shifts, and a step-indexed loader.

Per micro-step ``m`` and global batch position ``q`` everything is a pure function of
``(seed, m, q)``: which image (an epoch-wise permutation), the resolution (per micro-step), the
crop scale, the base crop, every view's shift and the student's CPE augmentation
(``cpe_uniforms``). So the loader is resumable by step (start at ``m``), independent of the number
of DataLoader workers, and a DDP rank r of W simply takes the positions ``q`` in
``[r*B/W, (r+1)*B/W)`` of the same global batch.

One sample at resolution R (views and their geometry come from ``radio.train.align.ViewPlan``)::

    canvas = image resized (antialiased) so its short side is S = max(R / f, need), f ~ U(crop_scale)
    base   = uniform top-left of the student's R x R crop, leaving room for every view's margin
    view v: origin_v = base - margin_v + p * clip(round(N(0, shift_std)), +-max_shift)   per axis,
            the shift of an axis set to 0 when the crop would leave the canvas;
            crop_v = canvas[origin_v : origin_v + crop_v] (both axes)

The batch carries every view (uint8) and its canvas origin, which is all the trainer needs to
align features (``radio.train.align.teacher_shift``), and per sample the five U(0, 1) draws of the
student's CPE crop and position dropout (``radio.model.cpe``), from the sample's own stream
``(seed, m, q, _TAG_CPE)``: the same on any rank or worker, and after a resume. Unreadable and tiny images are skipped
(the next image is used instead) and reported, never a crash; an empty folder is a ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..model.cpe import CPE_UNIFORMS
from .partitions import high_rank_count, rank_partitions

__all__ = [
    "BUNDLED_IMAGES",
    "IMAGE_EXTENSIONS",
    "Batch",
    "ImageSource",
    "StepSampler",
    "ViewDataset",
    "ViewGeometry",
    "collate",
    "cpe_uniforms",
    "find_images",
    "make_loader",
    "make_views",
    "split_holdout",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Colour and grey images shipped inside scikit-image (no download). Ordered so that the evenly
# spaced hold-out (``split_holdout``) picks photographs (chelsea, coffee, rocket for holdout=3).
BUNDLED_IMAGES = (
    "chelsea", "astronaut", "camera", "brick", "coins", "hubble_deep_field",
    "coffee", "immunohistochemistry", "moon", "grass", "clock", "logo",
    "rocket", "retina", "colorwheel", "gravel", "text", "page", "motorcycle",
)  # fmt: skip

# Entropy tags: independent random streams for the same (seed, step).
_TAG_PERMUTATION, _TAG_RESOLUTION, _TAG_SAMPLE, _TAG_CPE = 0x5EED01, 0x5EED02, 0x5EED03, 0x5EED04


# ----------------------------------------------------------------------------------------------
# image sources
# ----------------------------------------------------------------------------------------------


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (jpg, jpeg, png, webp; any case) under ``folder``, recursively, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"data.image_dir {str(folder)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"data.image_dir {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """Any HxW, HxWx1, HxWx3 or HxWx4 (bool/uint8/float) array -> HxWx3 uint8."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image array, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def _load_bundled(name: str) -> np.ndarray:
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return _to_rgb(image)


class ImageSource:
    """A list of images: files of an image folder, or the scikit-image bundled images.

    ``load(i)`` returns an HxWx3 uint8 array or raises (any exception = unreadable).
    """

    def __init__(self, items: Sequence[str | os.PathLike], bundled: bool):
        self.items = [str(i) for i in items]
        self.bundled = bundled
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, image_dir: str | None, min_image_side: int = 1) -> ImageSource:
        """The bundled images (``image_dir=None``) or the images under ``image_dir``, checked to hold
        at least one usable image (``check_usable``: decodes, short side >= ``data.min_image_side``),
        so a bad folder fails before a run starts."""
        if image_dir is None:
            source = cls(BUNDLED_IMAGES, bundled=True)
            if min_image_side > 1:  # the bundled images all decode; only their size can be too small
                source.check_usable(min_image_side, what="the bundled images (data.image_dir = none)")
            return source
        source = cls(find_images(image_dir), bundled=False)
        source.check_usable(min_image_side, what=f"data.image_dir {str(image_dir)!r}")
        return source

    def check_usable(self, min_image_side: int = 1, what: str = "the image source") -> int:
        """Index of the first image that decodes with a short side >= ``min_image_side``; a ValueError
        saying how many files were unreadable / too small when there is none. Stops at the first usable
        image, so a healthy folder costs one decode."""
        unreadable = small = 0
        for i in range(len(self)):
            try:
                image = self.load(i)
            except Exception:  # any decoding error: the trainer would skip this file
                unreadable += 1
                continue
            if min(image.shape[:2]) >= min_image_side:
                return i
            small += 1
        raise ValueError(
            f"{what}: none of its {len(self)} image files is usable ({unreadable} unreadable, "
            f"{small} with a side below data.min_image_side={min_image_side})"
        )

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.items[i]

    def load(self, i: int) -> np.ndarray:
        if self.bundled:
            # Bundled images are few and small: decode once per process.
            if i not in self._cache:
                self._cache[i] = _load_bundled(self.items[i])
            return self._cache[i]
        with Image.open(self.items[i]) as im:
            return np.asarray(im.convert("RGB"))

    def subset(self, indices: Sequence[int]) -> ImageSource:
        return ImageSource([self.items[i] for i in indices], self.bundled)


def split_holdout(source: ImageSource, holdout: int) -> tuple[ImageSource, ImageSource]:
    """(train, held-out): ``holdout`` evenly spaced images are held out (deterministic)."""
    n = len(source)
    if holdout < 0 or holdout >= n:
        raise ValueError(f"data.holdout must be in [0, {n - 1}] for {n} images, got {holdout}")
    stride = n // holdout if holdout else n
    held = list(range(0, stride * holdout, stride))
    train = [i for i in range(n) if i not in set(held)]
    train_source = source.subset(train)
    if not source.bundled and holdout:  # the usable images might all be held out
        train_source.check_usable(what=f"the {len(train)} training images (data.holdout={holdout} held out)")
    return train_source, source.subset(held)


# ----------------------------------------------------------------------------------------------
# one sample: canvas, base crop, shifted views
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewGeometry:
    """A view's crop side and margin in canvas pixels (see ``radio.train.align.ViewPlan``)."""

    crop: int
    margin: int = 0
    follows_student: bool = False


STUDENT = "student"


def make_views(
    image: np.ndarray,
    geometry: dict[str, ViewGeometry],
    patch: int,
    rng: np.random.Generator,
    crop_scale: Sequence[float] = (0.35, 1.0),
    shift_std: float = 0.5,
    max_shift: int = 2,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Crop every view of ``geometry`` (which must contain ``"student"``) from one image.

    Returns ({view: HxWx3 uint8 crop}, {view: (y, x) canvas origin}); module docstring for the math.
    """
    res = geometry[STUDENT].crop
    # The canvas must hold the base crop plus every view's reach above/left and below/right of it.
    before = max(g.margin for g in geometry.values())
    after = max(g.crop - g.margin - res for g in geometry.values())
    need = before + res + max(after, 0)
    frac = rng.uniform(crop_scale[0], crop_scale[1])
    short = max(need, round(res / frac))
    h, w = image.shape[:2]
    scale = short / min(h, w)
    size = (max(short, round(h * scale)), max(short, round(w * scale)))  # (H, W) of the canvas
    canvas = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    base = [int(rng.integers(before, size[a] - res - max(after, 0) + 1)) for a in (0, 1)]

    crops, origins = {}, {}
    for name, g in geometry.items():
        origin = []
        for axis in (0, 1):
            shift = patch * int(np.clip(np.round(rng.normal(0.0, shift_std)), -max_shift, max_shift))
            o = base[axis] - g.margin + shift
            if o < 0 or o + g.crop > size[axis]:  # the shifted crop would leave the image: no shift
                o = base[axis] - g.margin
            origin.append(o)
        origins[name] = tuple(origin)
    for name, g in geometry.items():
        if g.follows_student:
            origins[name] = origins[STUDENT]
        y, x = origins[name]
        crops[name] = canvas[y : y + g.crop, x : x + g.crop]
    return crops, origins


# ----------------------------------------------------------------------------------------------
# step-indexed sampling
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """What the dataset builds: image ``index``, at ``resolution`` in ``partition``, for (step, position)."""

    index: int
    resolution: int
    partition: str
    micro_step: int
    position: int


class StepSampler(Sampler):
    """Yields one list of ``SampleSpec`` per micro-step in ``[start, stop)``: this rank's share.

    Image order: the concatenation of per-epoch permutations of the image list (seeded by epoch);
    global position g = m * batch_size + q. Resolution: per micro-step, the high partition with
    probability ``high_prob``, then a uniform choice within the partition.

    ``partition_mode="rank"`` (radio.train.partitions): micro-step m holds ``batch_size`` low-partition
    samples (positions q in [0, batch_size)) and ``high_batch_size`` high ones (the next positions),
    g = m * (batch_size + high_batch_size) + q, one resolution per partition and micro-step. A rank
    yields its group's share; one process yields the low then the high sub-batch of each micro-step.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        low: Sequence[int],
        high: Sequence[int],
        high_prob: float,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
        partition_mode: str = "step",
        high_batch_size: int = 0,
        high_ranks: int = 0,
    ):
        self.partitions = rank_partitions(partition_mode, world_size, rank, high_prob, high_ranks)
        self.rank_mode = partition_mode == "rank"
        self.high_batch_size = high_batch_size if self.rank_mode else 0
        self.per_micro = batch_size + self.high_batch_size  # images of one micro-step, all ranks
        # (first global position, size, ranks sharing it, this rank's index among them) per sub-batch
        if not self.rank_mode:
            groups = {None: (0, batch_size, world_size, rank)}
        elif world_size == 1:
            groups = {"low": (0, batch_size, 1, 0), "high": (batch_size, high_batch_size, 1, 0)}
        else:
            h = high_rank_count(world_size, high_prob, high_ranks)
            low_ranks = world_size - h  # ranks [0, low_ranks) train low, the rest high
            groups = {
                "low": (0, batch_size, low_ranks, rank),
                "high": (batch_size, high_batch_size, h, rank - low_ranks),
            }
        for part, (_, size, ranks, _) in groups.items():
            if part in self.partitions and size % ranks:
                key = "data.high_batch_size" if part == "high" else "data.batch_size"
                raise ValueError(f"{key}={size} must be divisible by the {ranks} rank(s) that train it")
        self._groups = groups
        self.num_images, self.batch_size = num_images, batch_size
        self.low, self.high, self.high_prob = list(low), list(high), high_prob
        self.seed, self.start, self.stop = seed, start, stop
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * len(self.partitions)

    def resolution(self, micro_step: int, partition: str | None = None) -> tuple[int, str]:
        """(resolution, partition) of a micro-step ("step" mode) or of one of its partitions ("rank")."""
        if partition is not None:
            rng = np.random.default_rng([self.seed, micro_step, _TAG_RESOLUTION, 1 if partition == "high" else 2])
            choices = self.high if partition == "high" else self.low
            return int(choices[rng.integers(len(choices))]), partition
        rng = np.random.default_rng([self.seed, micro_step, _TAG_RESOLUTION])
        high = rng.random() < self.high_prob
        choices = self.high if high else self.low
        return int(choices[rng.integers(len(choices))]), "high" if high else "low"

    def image_index(self, position: int) -> int:
        epoch, i = divmod(position, self.num_images)
        if epoch not in self._perms:
            self._perms = {
                epoch: np.random.default_rng([self.seed, epoch, _TAG_PERMUTATION]).permutation(self.num_images)
            }
        return int(self._perms[epoch][i])

    def specs(self, micro_step: int, partition: str | None = None) -> list[SampleSpec]:
        """This rank's samples of ``micro_step`` (of its sub-batch ``partition`` in "rank" mode)."""
        res, part = self.resolution(micro_step, partition)
        first, size, ranks, index = self._groups[partition]
        local = size // ranks
        positions = range(first + index * local, first + (index + 1) * local)
        return [
            SampleSpec(self.image_index(micro_step * self.per_micro + q), res, part, micro_step, q) for q in positions
        ]

    def __iter__(self):
        for m in range(self.start, self.stop):
            for partition in self.partitions:
                yield self.specs(m, partition)


# ----------------------------------------------------------------------------------------------
# dataset, batch, loader
# ----------------------------------------------------------------------------------------------


def cpe_uniforms(seed: int, micro_step: int, position: int) -> np.ndarray:
    """The (5,) float32 U(0, 1) draws of one sample's student CPE (``RadioModel.forward(cpe_uniforms=)``).

    Their own stream, keyed by (seed, micro-step, global position) like every per-sample draw here, so
    adding or changing them never moves the view geometry.
    """
    rng = np.random.default_rng([seed, micro_step, position, _TAG_CPE])
    return rng.random(CPE_UNIFORMS).astype(np.float32)


class ViewDataset(Dataset):
    """Maps a ``SampleSpec`` to (spec, image index, views, origins, skipped image indices, CPE uniforms).

    geometry[(partition, resolution)] = {view name: ViewGeometry} (student first).
    """

    def __init__(
        self,
        source: ImageSource,
        geometry: dict[tuple[str, int], dict[str, ViewGeometry]],
        patch: int,
        seed: int,
        crop_scale: Sequence[float],
        shift_std: float,
        max_shift: int,
        min_image_side: int,
    ):
        if len(source) == 0:
            raise ValueError("the image source is empty")
        self.source, self.geometry, self.patch, self.seed = source, geometry, patch, seed
        self.crop_scale, self.shift_std, self.max_shift = tuple(crop_scale), shift_std, max_shift
        self.min_image_side = min_image_side

    def __len__(self) -> int:
        return len(self.source)

    def _load_checked(self, index: int) -> np.ndarray:
        image = self.source.load(index)
        if min(image.shape[:2]) < self.min_image_side:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, below min_image_side={self.min_image_side}")
        return image

    def __getitem__(self, spec: SampleSpec):
        rng = np.random.default_rng([self.seed, spec.micro_step, spec.position, _TAG_SAMPLE])
        skipped = []
        index = spec.index
        for _ in range(len(self.source)):
            try:
                image = self._load_checked(index)
                break
            except Exception:  # any decoding error: skip the file, count it, use the next one
                skipped.append(index)
                index = (index + 1) % len(self.source)
        else:
            raise RuntimeError(f"none of the {len(self.source)} images could be read (or all are too small)")
        geometry = self.geometry[(spec.partition, spec.resolution)]
        crops, origins = make_views(image, geometry, self.patch, rng, self.crop_scale, self.shift_std, self.max_shift)
        views = {k: torch.from_numpy(np.array(v, copy=True)).permute(2, 0, 1) for k, v in crops.items()}
        return spec, index, views, origins, skipped, cpe_uniforms(self.seed, spec.micro_step, spec.position)


@dataclass
class Batch:
    """A micro-batch: uint8 views (B, 3, s, s) per view name, their canvas origins (B, 2) (y, x), and
    ``cpe_uniforms`` (B, 5) float32: the student's per-sample CPE randomness (``cpe_uniforms()``)."""

    micro_step: int
    resolution: int
    partition: str
    views: dict[str, torch.Tensor]
    origins: dict[str, torch.Tensor]
    indices: torch.Tensor
    cpe_uniforms: torch.Tensor
    skipped: list[int] = field(default_factory=list)

    def images(self, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """View ``name`` as floats in [0, 1] on ``device``."""
        return self.views[name].to(device, non_blocking=True).to(dtype) / 255.0

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def collate(samples) -> Batch:
    """``ViewDataset`` items (tuples) of one micro-step -> a ``Batch``."""
    specs = [s[0] for s in samples]
    names = list(samples[0][2])
    return Batch(
        micro_step=specs[0].micro_step,
        resolution=specs[0].resolution,
        partition=specs[0].partition,
        views={k: torch.stack([s[2][k] for s in samples]) for k in names},
        origins={k: torch.tensor([s[3][k] for s in samples], dtype=torch.long) for k in names},
        indices=torch.tensor([s[1] for s in samples], dtype=torch.long),
        cpe_uniforms=torch.from_numpy(np.stack([s[5] for s in samples])),
        skipped=sorted({i for s in samples for i in s[4]}),
    )


def make_loader(dataset: ViewDataset, sampler: StepSampler, num_workers: int) -> DataLoader:
    """A DataLoader over micro-steps; its own generator keeps the global torch RNG untouched
    (so creating it at resume does not shift the model's random stream)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator(),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
