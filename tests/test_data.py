"""Training data: image sources, views with whole-patch shifts, step-indexed sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from radio.train.data import (
    BUNDLED_IMAGES,
    ImageSource,
    StepSampler,
    ViewDataset,
    ViewGeometry,
    collate,
    cpe_uniforms,
    find_images,
    make_loader,
    make_views,
    split_holdout,
)

GEOMETRY = {
    "student": ViewGeometry(64),
    "ema": ViewGeometry(64),
    "big": ViewGeometry(96, margin=16),  # a tiled teacher reaching one patch beyond each side
    "follower": ViewGeometry(64, follows_student=True),
}


def _write_images(folder, n=3, size=(80, 100)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ext = ("png", "jpg", "webp")[i % 3]
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.{ext}")


def test_find_images_recursive_and_errors(tmp_path):
    _write_images(tmp_path / "a" / "b", n=3)
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["im0.png", "im1.jpg", "im2.webp"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        find_images(empty)
    with pytest.raises(ValueError, match="is not a directory"):
        find_images(tmp_path / "missing")


def test_bundled_images_load_offline_as_rgb():
    source = ImageSource.from_config(None)
    assert len(source) == len(BUNDLED_IMAGES) >= 12
    for i in (0, BUNDLED_IMAGES.index("camera"), BUNDLED_IMAGES.index("logo"), BUNDLED_IMAGES.index("motorcycle")):
        image = source.load(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_split_holdout_is_deterministic_and_disjoint():
    source = ImageSource.from_config(None)
    train, held = split_holdout(source, 3)
    assert held.items == ["chelsea", "coffee", "rocket"]
    assert len(train) + len(held) == len(source) and not set(train.items) & set(held.items)
    with pytest.raises(ValueError, match="holdout"):
        split_holdout(source, len(source))


def test_make_views_geometry_and_shift_law():
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    shifts = []
    for _ in range(300):
        crops, origins = make_views(image, GEOMETRY, 16, rng, (0.3, 1.0), 0.5, 2)
        for name, g in GEOMETRY.items():
            assert crops[name].shape == (g.crop, g.crop, 3)
        assert origins["follower"] == origins["student"]
        base = None
        for name in ("student", "ema", "big"):
            oy, ox = origins[name]
            rel = np.array([oy, ox]) + GEOMETRY[name].margin
            base = rel if base is None else base
            shifts.append(rel)
        # every view's offset from every other is a whole number of patches
        for name in ("ema", "big"):
            d = np.array(origins["student"]) - np.array(origins[name]) - GEOMETRY[name].margin
            assert (d % 16 == 0).all()
    # shifts relative to the student's: P(0) ~ 0.68^2 per view pair axis-wise, |shift| <= 2 patches each
    s = np.array(shifts).reshape(-1, 3, 2)
    rel = (s[:, 1:] - s[:, :1]) // 16
    assert np.abs(rel).max() <= 4
    zero_frac = (rel == 0).mean()
    assert 0.4 < zero_frac < 0.75


def test_views_stay_inside_the_image():
    """A crop that would leave the canvas gets no shift on that axis (it never wraps or pads)."""
    rng = np.random.default_rng(3)
    image = np.full((64, 64, 3), 7, np.uint8)  # canvas barely larger than the 64-px view
    for _ in range(50):
        crops, origins = make_views(
            image, {"student": ViewGeometry(64), "t": ViewGeometry(64)}, 16, rng, (1, 1), 2.0, 2
        )
        assert origins["student"] == (0, 0) == origins["t"]
        assert (crops["t"] == 7).all()


def test_sampler_is_step_indexed_and_splits_the_global_batch():
    full = StepSampler(10, 8, [32, 48], [64], 0.5, seed=3, start=0, stop=6)
    resumed = StepSampler(10, 8, [32, 48], [64], 0.5, seed=3, start=4, stop=6)
    assert list(full)[4:] == list(resumed)
    ranks = [StepSampler(10, 8, [32, 48], [64], 0.5, seed=3, start=0, stop=6, rank=r, world_size=2) for r in (0, 1)]
    for m, specs in enumerate(full):
        assert ranks[0].specs(m) + ranks[1].specs(m) == specs
        assert len({(s.resolution, s.partition) for s in specs}) == 1
    # every image once per epoch of 10 positions
    seen = [s.index for m in range(5) for s in full.specs(m)][:10]
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(10, 7, [32], [], 0.0, 0, 0, 1, world_size=2)


def _dataset(source, min_side=32):
    geometry = {("low", 64): {"student": ViewGeometry(64), "ema": ViewGeometry(64)}}
    return ViewDataset(source, geometry, 16, 0, (0.5, 1.0), 0.5, 2, min_side)


def test_unreadable_and_tiny_images_are_skipped_and_counted(tmp_path):
    _write_images(tmp_path, n=3)
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    source = ImageSource.from_config(str(tmp_path))
    assert len(source) == 5
    dataset = _dataset(source)
    sampler = StepSampler(len(source), 5, [64], [], 0.0, seed=0, start=0, stop=4)
    skipped = set()
    for batch in make_loader(dataset, sampler, num_workers=1):
        assert batch.views["student"].shape == (5, 3, 64, 64) and batch.views["student"].dtype == torch.uint8
        skipped.update(batch.skipped)
        good = {source.name(int(i)) for i in batch.indices}
        assert not any(n.endswith(("broken.jpg", "tiny.png")) for n in good)
    assert {source.name(i).rsplit("/", 1)[-1] for i in skipped} == {"broken.jpg", "tiny.png"}


def test_all_images_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of its 1 image files is usable"):
        ImageSource.from_config(str(tmp_path))  # the trainer's first check
    dataset = _dataset(ImageSource([tmp_path / "a.png"], bundled=False))  # the dataset's own defence
    spec = StepSampler(1, 1, [64], [], 0.0, 0, 0, 1).specs(0)[0]
    with pytest.raises(RuntimeError, match="none of the 1 images could be read"):
        dataset[spec]


def test_samples_do_not_depend_on_workers_or_start():
    source = ImageSource.from_config(None)
    dataset = _dataset(source)
    a = list(make_loader(dataset, StepSampler(len(source), 4, [64], [], 0.0, 1, 0, 3), num_workers=0))
    b = list(make_loader(dataset, StepSampler(len(source), 4, [64], [], 0.0, 1, 2, 3), num_workers=2))
    assert torch.equal(a[2].views["student"], b[0].views["student"])
    assert torch.equal(a[2].origins["ema"], b[0].origins["ema"])
    batch = collate([dataset[s] for s in StepSampler(len(source), 4, [64], [], 0.0, 1, 0, 1).specs(0)])
    assert torch.equal(batch.views["ema"], a[0].views["ema"])
    assert torch.equal(a[2].cpe_uniforms, b[0].cpe_uniforms) and torch.equal(batch.cpe_uniforms, a[0].cpe_uniforms)


def test_cpe_uniforms_are_per_sample_and_the_same_on_every_rank():
    source = ImageSource.from_config(None)
    dataset = _dataset(source)
    full = [collate([dataset[s] for s in StepSampler(len(source), 4, [64], [], 0.0, 1, 0, 2).specs(m)]) for m in (0, 1)]
    for m, batch in enumerate(full):
        u = batch.cpe_uniforms
        assert u.shape == (4, 5) and u.dtype == torch.float32 and ((u >= 0) & (u <= 1)).all()
        assert len({tuple(row.tolist()) for row in u}) == 4  # every sample its own draw
        for r in (0, 1):  # a rank's share carries exactly the single-process rows
            specs = StepSampler(len(source), 4, [64], [], 0.0, 1, 0, 2, rank=r, world_size=2).specs(m)
            local = collate([dataset[s] for s in specs]).cpe_uniforms
            assert torch.equal(local, u[2 * r : 2 * r + 2])
        # A pure function of (seed, micro-step, global position), independent of the image geometry.
        assert np.array_equal(u[3].numpy(), cpe_uniforms(0, m, 3))
    assert not torch.equal(full[0].cpe_uniforms, full[1].cpe_uniforms)
    assert not np.array_equal(cpe_uniforms(0, 0, 0), cpe_uniforms(1, 0, 0))
    # Many draws look like U(0, 1) in every column (a mean far from 0.5 would bias the crops).
    many = np.stack([cpe_uniforms(0, m, q) for m in range(40) for q in range(10)])
    assert np.all(np.abs(many.mean(0) - 0.5) < 0.06) and many.min() >= 0 and many.max() < 1
