"""Alignment of student cells with teacher cells must be exact.

"Pixel teachers" compute each token's feature from the pixels of its own patch only (no mixing
across patches, no position dependence). Running the trainer's whole data path (canvas, base
crop, independent whole-patch shifts, per-teacher view plans, tiles, mosaics) and its alignment
(``teacher_shift`` + ``aligned_target``, i.e. what ``shifted_mse`` compares), the target aligned to
each student cell must be the teacher feature of the very same image region, over Omega.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radio.teachers import Teacher, TeacherOutput
from radio.train.align import (
    ViewPlan,
    aligned_target,
    overlap_count,
    plan_view,
    resolve_mode,
    teacher_shift,
    to_teacher_grid,
)
from radio.train.config import TeacherConfig, TrainConfig
from radio.train.data import ImageSource, StepSampler, ViewDataset, collate
from radio.train.step import teacher_targets
from radio.train.teaching import TeacherSlot, plan_all_views
from radio_kernels import shifted_mse

PATCH = 16


class PixelTeacher(Teacher):
    """features[b, i, j] = a fixed, position-independent function of patch (i, j)'s pixels.

    mode "sum": integer channel sums of the patch (the [0, 1] input is mapped back to its uint8
    values first), so the features are exact in float32 whatever the summation order.
    mode "coords": mean pixel value of the patch (used on coordinate images, where it is the
    patch centre; for teachers whose crops get resampled).
    """

    def __init__(self, patch: int, *, fixed_size=None, native_size=64, mode="sum"):
        super().__init__(
            name=f"pixel-{patch}-{mode}",
            patch_size=patch,
            feature_dim=8,
            summary_dim=None,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            fixed_size=fixed_size,
            native_size=native_size,
        )
        self.mode = mode

    def _encode(self, pixels: torch.Tensor) -> TeacherOutput:
        b, c, h, w = pixels.shape
        p = self.patch_size
        blocks = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c, -1)
        if self.mode == "sum":
            stats = torch.round(blocks * 255.0).sum(-1)
        else:
            stats = blocks.mean(-1) * 255.0
        # A position-independent transform to more channels (integer arithmetic stays exact).
        r, g, b_ = stats.unbind(-1)
        features = torch.stack([r, g, b_, r - g, 2 * b_ + r, g + b_, r + g + b_, -g], -1)
        return TeacherOutput(None, features)


def _slots(teachers: dict[str, tuple[Teacher, str]]) -> dict[str, TeacherSlot]:
    cfg = TrainConfig()
    return {
        name: TeacherSlot(name, TeacherConfig(kind="dinov3", high_res_mode=mode), teacher, cfg)
        for name, (teacher, mode) in teachers.items()
    }


class ArraySource(ImageSource):
    def __init__(self, images: list[np.ndarray]):
        super().__init__([f"img{i}" for i in range(len(images))], bundled=False)
        self.images = images

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


def _batches(source, slots, low, high, steps, *, crop_scale=(0.3, 1.0), shift_std=1.0, batch_size=4, seed=0):
    cfg = TrainConfig()
    cfg.data.low_resolutions, cfg.data.high_resolutions = low, high
    plans, geometry = plan_all_views(cfg, slots, PATCH, PATCH)
    dataset = ViewDataset(source, geometry, PATCH, seed, crop_scale, shift_std, 2, 8)
    sampler = StepSampler(
        len(source), batch_size, low, high, 0.5 if low and high else float(bool(high)), seed, 0, steps
    )
    for specs in sampler:
        batch = collate([dataset[s] for s in specs])
        yield batch, plans[(batch.partition, batch.resolution)]


def _random_images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(150, 210), (260, 190), (333, 333)]
    return [rng.integers(0, 256, size=(*sizes[i % 3], 3), dtype=np.uint8) for i in range(n)]


def test_pixel_teachers_align_exactly_plain_tiles_and_mosaic():
    """Same-patch teachers (no resampling anywhere): aligned targets equal the student's own patches bit for bit."""
    teachers = {
        "plain": (PixelTeacher(16), "plain"),
        "tiled": (PixelTeacher(16, native_size=48), "tile"),  # 3 tokens per tile
        "mosaic": (PixelTeacher(16, fixed_size=128, native_size=128), "mosaic"),  # 8 x 8-token canvas
    }
    slots = _slots(teachers)
    reference = PixelTeacher(16)
    nonzero_shifts = cells = 0
    modes_seen = set()
    for batch, plans in _batches(ArraySource(_random_images()), slots, [32, 48, 64], [80, 96, 112], steps=12):
        targets = teacher_targets(batch, slots, plans, PATCH, "cpu")
        truth = reference(batch.images("student")).features  # the student's own patches
        for name, target in targets.items():
            modes_seen.add(target.plan.mode)
            aligned, mask = aligned_target(target.raw, target.shift, truth.shape[1:3])
            assert mask.any()
            assert torch.equal(aligned[mask], truth[mask]), (name, batch.resolution, target.shift.tolist())
            # ... which is exactly what the spatial loss compares: zero loss for the ideal student.
            assert shifted_mse(truth, target.raw, target.shift).item() == 0.0
            nonzero_shifts += int((target.shift != 0).any(1).sum())
            cells += int(mask.sum())
    assert modes_seen == {"plain", "tile", "mosaic"}
    assert nonzero_shifts > 20 and cells > 1000  # the shifts were exercised, not all zero


def _coordinate_image(side: int) -> np.ndarray:
    """R = row, G = column, B = 0: each pixel encodes its position (side <= 256)."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def test_resampled_teacher_sees_the_same_region():
    """Patch-14 teachers (crops resized by 14/16, SAM3-like) and the "resize" fallback.

    On a coordinate image the mean of a patch is its centre, so the aligned teacher cell must
    report the centre of the student's patch (up to resampling error, far below one patch).
    """
    side = 256
    teachers = {
        "sam_like": (PixelTeacher(14, fixed_size=112, native_size=112, mode="coords"), "mosaic"),
        "vit14": (PixelTeacher(14, mode="coords"), "plain"),
    }
    slots = _slots(teachers)
    reference = PixelTeacher(16, mode="coords")
    for batch, plans in _batches(ArraySource([_coordinate_image(side)]), slots, [48, 64], [96, 128], 10,
                                 crop_scale=(0.5, 0.5), batch_size=3):  # fmt: skip
        targets = teacher_targets(batch, slots, plans, PATCH, "cpu")
        truth = reference(batch.images("student")).features
        for name, target in targets.items():
            if target.plan.mode == "resize":  # views larger than the 8 x 8-token canvas
                feats = to_teacher_grid(truth, target.plan)
                err = (feats[:, 1:-1, 1:-1, :2] - target.raw[:, 1:-1, 1:-1, :2]).abs().max()
                assert target.plan.follows_student and (target.shift == 0).all()
                assert err < 1.5, (name, batch.resolution, float(err))  # cells are 16 px apart
                continue
            aligned, mask = aligned_target(target.raw, target.shift, truth.shape[1:3])
            err = (aligned[mask][:, :2] - truth[mask][:, :2]).abs().max()
            assert err < 1.0, (name, batch.resolution, float(err))


def test_a_misaligned_shift_would_be_caught():
    """Guard for the tests above: an off-by-one shift is off by a whole patch (16 canvas px, a bit
    less in image coordinates when the canvas is a downscaled image)."""
    slots = _slots({"plain": (PixelTeacher(16, mode="coords"), "plain")})
    batch, plans = next(_batches(ArraySource([_coordinate_image(200)]), slots, [64], [], 1, shift_std=0.0))
    target = teacher_targets(batch, slots, plans, PATCH, "cpu")["plain"]
    truth = PixelTeacher(16, mode="coords")(batch.images("student")).features
    aligned, mask = aligned_target(target.raw, target.shift + torch.tensor([0, 1]), truth.shape[1:3])
    assert (aligned[mask][:, 1] - truth[mask][:, 1]).abs().min() > 8.0


# ----------------------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------------------


def test_plan_view_modes():
    assert plan_view("plain", 96, 16, 16, 64) == ViewPlan("plain", 6, 96, 0, 96)
    assert plan_view("plain", 96, 16, 14, 64) == ViewPlan("plain", 6, 96, 0, 84)  # 6 tokens x 14 px
    # 7 student tokens, 4 per tile -> 2 tiles = 8 tokens: one extra patch, on the bottom/right.
    assert plan_view("tile", 112, 16, 16, 64) == ViewPlan("tile", 8, 128, 0, 128, tiles=2, region=112)
    # 5 tokens, 3 per tile -> 6: margin 0; 10 tokens, 4 per tile -> 12: one patch each side.
    assert plan_view("tile", 160, 16, 16, 64) == ViewPlan("tile", 12, 192, 16, 192, tiles=3, region=160)
    # C-RADIOv4 scale: SigLIP2-384 at 1152 px = 3 x 3 tiles, same 72-token grid as the student.
    assert plan_view("tile", 1152, 16, 16, 384) == ViewPlan("tile", 72, 1152, 0, 1152, tiles=3, region=1152)
    # SAM3 at 1008 px: a 1152-px view (72 tokens) fills the 72-token canvas exactly, as 1008 px.
    assert plan_view("mosaic", 1152, 16, 14, 1008, 1008) == ViewPlan("mosaic", 72, 1152, 0, 1008)
    assert plan_view("mosaic", 128, 16, 14, 112, 112) == ViewPlan("mosaic", 8, 128, 0, 112)
    resized = plan_view("mosaic", 160, 16, 14, 112, 112)  # 10 tokens > 8: fallback
    assert resized == ViewPlan("resize", 8, 160, 0, 112, follows_student=True)
    with pytest.raises(ValueError, match="multiple of the student patch"):
        plan_view("plain", 100, 16, 16, 64)
    with pytest.raises(ValueError, match="mode must be one of"):
        plan_view("bogus", 96, 16, 16, 64)


def test_resolve_mode():
    assert resolve_mode("auto", "siglip2", None, high=False) == "plain"
    assert resolve_mode("auto", "siglip2", None, high=True) == "tile"
    assert resolve_mode("auto", "dinov3", None, high=True) == "plain"
    assert resolve_mode("auto", "sam3", 1008, high=False) == "mosaic"
    assert resolve_mode("resize", "sam3", 1008, high=True) == "resize"
    assert resolve_mode("tile", "dinov3", None, high=True) == "tile"
    with pytest.raises(ValueError, match="fixed-size"):
        resolve_mode("mosaic", "dinov3", None, high=True)


def test_teacher_shift_requires_whole_patches():
    s = torch.tensor([[32, 48], [0, 0]])
    t = torch.tensor([[16, 80], [0, 16]])
    assert teacher_shift(s, t, 16).tolist() == [[1, -2], [0, -1]]
    with pytest.raises(ValueError, match="whole patches"):
        teacher_shift(s, t + 1, 16)


def test_overlap_count_and_aligned_target_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        hs, ws, ht, wt = (int(v) for v in torch.randint(1, 7, (4,), generator=gen))
        shift = torch.randint(-4, 5, (3, 2), generator=gen)
        target = torch.randn(3, ht, wt, 2, generator=gen)
        aligned, mask = aligned_target(target, shift, (hs, ws))
        counts = overlap_count((hs, ws), (ht, wt), shift)
        for b in range(3):
            dy, dx = shift[b].tolist()
            n = 0
            for i in range(hs):
                for j in range(ws):
                    inside = 0 <= i + dy < ht and 0 <= j + dx < wt
                    assert bool(mask[b, i, j]) == inside
                    if inside:
                        n += 1
                        assert torch.equal(aligned[b, i, j], target[b, i + dy, j + dx])
            assert counts[b] == n
