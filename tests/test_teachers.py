"""Teachers: tiny configs of each family, checkpoint round trips, tiling and mosaics."""

import json
import os

import pytest
import torch
from torch import nn

from radio.teachers import (
    TEACHER_KINDS,
    Teacher,
    TeacherOutput,
    load_teacher,
    mosaic_features,
    plan_mosaic,
    tiled_features,
    tiled_teacher_output,
    tiles_for,
    tiny_teacher,
)
from radio.teachers.siglip2 import naflex_inputs

# (kind, naflex, input side, summary?) for each tiny family.
FAMILIES = {
    "siglip2": ("siglip2", False, 64, True),
    "siglip2-naflex": ("siglip2", True, 64, True),
    "dinov3": ("dinov3", False, 64, True),
    "sam3": ("sam3", False, 112, False),
}


def _images(batch: int, side: int, seed: int = 0, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, width or side, generator=g)


class PatchTeacher(Teacher):
    """Per-patch teacher: features = tanh(patchify conv), so token (i, j) depends on patch (i, j) only.

    Without global mixing, tiled and mosaicked features must equal a direct run exactly.
    """

    def __init__(self, fixed_size=None, native_size=32, patch=8, dim=6, seed=0):
        super().__init__(
            name="patch",
            patch_size=patch,
            feature_dim=dim,
            summary_dim=dim,
            mean=(0.4, 0.5, 0.6),
            std=(0.2, 0.25, 0.3),
            fixed_size=fixed_size,
            native_size=native_size if fixed_size is None else fixed_size,
            dtype=torch.float64,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, dim, patch, stride=patch, dtype=torch.float64)
        self.requires_grad_(False)

    def _encode(self, pixels):
        features = torch.tanh(self.conv(pixels)).permute(0, 2, 3, 1)
        return TeacherOutput(features.mean((1, 2)), features)


# ---------------------------------------------------------------------------------------------
# Tiny teachers of each family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_teacher_shapes_and_properties(family):
    kind, naflex, side, has_summary = FAMILIES[family]
    teacher = tiny_teacher(kind, naflex=naflex)
    out = teacher(_images(2, side))
    assert isinstance(out, TeacherOutput)
    grid = side // teacher.patch_size
    assert out.features.shape == (2, grid, grid, teacher.feature_dim)
    if has_summary:
        assert out.summary.shape == (2, teacher.summary_dim)
    else:
        assert out.summary is None and teacher.summary_dim is None
    assert torch.isfinite(out.features).all()
    assert not out.features.requires_grad and not teacher.training
    teacher.train()  # frozen teachers ignore train()
    assert not teacher.training and not teacher.model.training
    assert (teacher.fixed_size is not None) == (kind == "sam3")
    assert len(teacher.mean) == 3 and len(teacher.std) == 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_teacher_deterministic_per_seed(family):
    kind, naflex, side, _ = FAMILIES[family]
    x = _images(1, side)
    a = tiny_teacher(kind, seed=0, naflex=naflex)(x).features
    b = tiny_teacher(kind, seed=0, naflex=naflex)(x).features
    c = tiny_teacher(kind, seed=1, naflex=naflex)(x).features
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_offline(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kind, naflex, side, _ = FAMILIES[family]
    teacher = tiny_teacher(kind, seed=3, naflex=naflex)
    teacher.save_pretrained(tmp_path)
    loaded = load_teacher(kind, str(tmp_path))
    assert type(loaded) is type(teacher)
    assert (loaded.mean, loaded.std, loaded.patch_size, loaded.fixed_size) == (
        teacher.mean,
        teacher.std,
        teacher.patch_size,
        teacher.fixed_size,
    )
    x = _images(2, side, seed=1)
    a, b = teacher(x), loaded(x)
    assert torch.equal(a.features, b.features)
    if a.summary is not None:
        assert torch.equal(a.summary, b.summary)


def test_load_reads_normalisation_and_dtype(tmp_path):
    teacher = tiny_teacher("dinov3")
    teacher.save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}, f)
    loaded = load_teacher("dinov3", str(tmp_path), dtype=torch.bfloat16)
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6)
    out = loaded(_images(1, 64))
    assert out.features.dtype == torch.bfloat16 and out.summary.dtype == torch.bfloat16
    # Family defaults when the checkpoint has no image-processor config.
    os.remove(tmp_path / "preprocessor_config.json")
    assert load_teacher("dinov3", str(tmp_path)).mean == (0.485, 0.456, 0.406)


def test_load_full_siglip_checkpoint(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    teacher = tiny_teacher("siglip2")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    full = SiglipModel(
        SiglipConfig(
            text_config={**text, "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
            vision_config=teacher.model.config.to_dict(),
        )
    )
    full.vision_model.load_state_dict(teacher.model.state_dict())
    full.save_pretrained(tmp_path)
    loaded = load_teacher("siglip2", str(tmp_path))
    x = _images(1, 64)
    assert torch.equal(loaded(x).features, teacher(x).features)
    assert torch.equal(loaded(x).summary, teacher(x).summary)


def test_load_full_sam3_vision_checkpoint(tmp_path):
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig
    from transformers.models.sam3.modeling_sam3 import Sam3VisionModel

    teacher = tiny_teacher("sam3", seed=5)
    vision = Sam3VisionModel(Sam3VisionConfig(backbone_config=teacher.model.config.to_dict(), fpn_hidden_size=16))
    vision.backbone.load_state_dict(teacher.model.state_dict())
    vision.save_pretrained(tmp_path)
    loaded = load_teacher("sam3", str(tmp_path))
    assert loaded.fixed_size == 112
    x = _images(1, 112)
    assert torch.equal(loaded(x).features, teacher(x).features)


def test_load_rejects_bad_kind_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="siglip2.*dinov3.*sam3"):
        load_teacher("clip", str(tmp_path))
    with pytest.raises(ValueError, match="siglip2.*dinov3.*sam3"):
        tiny_teacher("dino")
    with pytest.raises(ValueError, match="naflex"):
        tiny_teacher("dinov3", naflex=True)
    tiny_teacher("dinov3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dinov3_vit"):
        load_teacher("siglip2", str(tmp_path))
    assert set(TEACHER_KINDS) == {"siglip2", "dinov3", "sam3"}


def test_bad_images_rejected():
    siglip, sam3 = tiny_teacher("siglip2"), tiny_teacher("sam3")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        siglip(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="multiples of patch_size=16"):
        siglip(torch.rand(1, 3, 64, 72))
    with pytest.raises(TypeError, match="floating-point"):
        siglip(torch.ones(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="only accepts 112x112"):
        sam3(torch.rand(1, 3, 56, 56))


def test_siglip_fixed_interpolates_off_native_sizes():
    teacher = tiny_teacher("siglip2")
    assert teacher.native_size == 64
    out = teacher(_images(1, 96, width=48))
    assert out.features.shape == (1, 6, 3, 32)
    direct = teacher.model(pixel_values=(_images(1, 96, width=48) - 0.5) / 0.5, interpolate_pos_encoding=True)
    assert torch.allclose(out.features.reshape(1, 18, 32), direct.last_hidden_state)


def test_naflex_patchify_matches_image_processor_layout():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    x = _images(2, 48, width=32)
    inputs = naflex_inputs(x, 16)
    for i in range(2):
        assert torch.equal(inputs["pixel_values"][i], convert_image_to_patches(x[i], 16))
    assert inputs["spatial_shapes"].tolist() == [[3, 2], [3, 2]]
    assert inputs["pixel_attention_mask"].all()
    out = tiny_teacher("siglip2", naflex=True)(x)
    assert out.features.shape == (2, 3, 2, 32)


def test_dinov3_summary_is_cls_and_registers_dropped():
    teacher = tiny_teacher("dinov3")
    x = _images(2, 64)
    out = teacher(x)
    tokens = teacher.model(
        pixel_values=(x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    ).last_hidden_state
    assert tokens.shape[1] == 1 + 2 + 16  # CLS + 2 registers + 4x4 patches
    assert torch.allclose(out.summary, tokens[:, 0])
    assert torch.allclose(out.features.reshape(2, 16, -1), tokens[:, 3:])


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------


def test_tiling_equals_full_run_for_per_patch_teacher():
    teacher = PatchTeacher(native_size=32)
    x = _images(2, 96).double()
    tiled = tiled_features(teacher, x, 3)
    assert tiled.shape == (2, 12, 12, 6)
    assert torch.allclose(tiled, teacher(x).features, rtol=0, atol=1e-12)


def test_tiling_windows_are_per_tile_runs_and_summary_is_global_view():
    teacher = tiny_teacher("siglip2")  # native 64: global attention, so stitching order matters
    x = _images(2, 128)
    out = tiled_teacher_output(teacher, x, 2)
    assert out.features.shape == (2, 8, 8, 32) and out.summary.shape == (2, 32)
    for r in range(2):
        for c in range(2):
            tile = x[:, :, 64 * r : 64 * (r + 1), 64 * c : 64 * (c + 1)]
            expect = teacher(tile).features
            assert torch.allclose(out.features[:, 4 * r : 4 * (r + 1), 4 * c : 4 * (c + 1)], expect, atol=1e-5)
    global_view = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    assert torch.allclose(out.summary, teacher(global_view).summary, atol=1e-5)
    assert torch.allclose(tiled_features(teacher, x, 2), out.features, atol=1e-5)


def test_tiled_summary_from_a_box_is_that_region_at_native_size():
    """The trainer's tiled view is larger than the student's crop: its summary comes from the crop only."""
    teacher = tiny_teacher("siglip2")
    x = _images(2, 128)
    out = tiled_teacher_output(teacher, x, 2, summary_box=(16, 8, 96))
    region = torch.nn.functional.interpolate(x[:, :, 16:112, 8:104], size=(64, 64), mode="bilinear", antialias=True)
    assert torch.allclose(out.summary, teacher(region).summary, atol=1e-5)
    assert torch.allclose(out.features, tiled_features(teacher, x, 2), atol=1e-5)  # features: whole view
    with pytest.raises(ValueError, match="summary_box"):
        tiled_teacher_output(teacher, x, 2, summary_box=(64, 0, 96))


def test_tiling_resizes_to_tiles_times_native_and_tiles_for():
    teacher = PatchTeacher(native_size=32)
    assert tiled_features(teacher, _images(1, 80).double(), 3).shape == (1, 12, 12, 6)
    assert [tiles_for(r, 384) for r in (256, 384, 512, 768, 1024, 1152)] == [1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="tiles"):
        tiled_features(teacher, _images(1, 64).double(), 0)


# ---------------------------------------------------------------------------------------------
# Mosaic
# ---------------------------------------------------------------------------------------------


def test_plan_mosaic_equal_views_fill_rows_then_canvases():
    # 72-token canvas, 24-token views: 3 per row, 3 rows, 9 per canvas.
    placements = plan_mosaic([(24, 24)] * 11, 72)
    assert placements[:4] == [(0, 0, 0), (0, 0, 24), (0, 0, 48), (0, 24, 0)]
    assert placements[8] == (0, 48, 48) and placements[9] == (1, 0, 0) and placements[10] == (1, 0, 24)
    # 16-token views: 72 // 16 = 4 per row.
    assert [p.left for p in plan_mosaic([(16, 16)] * 5, 72)] == [0, 16, 32, 48, 0]


def test_plan_mosaic_mixed_sizes_do_not_overlap():
    grids = [(3, 5), (8, 8), (2, 2), (4, 3), (6, 2), (1, 8), (5, 5), (2, 7)]
    placements = plan_mosaic(grids, 8)
    occupied = {}
    for i, ((gh, gw), p) in enumerate(zip(grids, placements)):
        assert p.top + gh <= 8 and p.left + gw <= 8
        for r in range(p.top, p.top + gh):
            for c in range(p.left, p.left + gw):
                assert (p.canvas, r, c) not in occupied, f"view {i} overlaps view {occupied[(p.canvas, r, c)]}"
                occupied[(p.canvas, r, c)] = i


def test_mosaic_equals_per_view_runs_for_per_patch_teacher():
    fixed = PatchTeacher(fixed_size=64)
    free = PatchTeacher(fixed_size=None)  # same seed, same weights, any input size
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (16, 48), (24, 24), (64, 64), (8, 40), (32, 16), (48, 8)]
    views = [torch.rand(3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    calls = []
    fixed.register_forward_hook(lambda *_: calls.append(1))
    feats = mosaic_features(fixed, views)
    assert len(calls) == 1  # one teacher call, however many canvases
    for v, f in zip(views, feats):
        assert f.shape == (v.shape[1] // 8, v.shape[2] // 8, 6)
        assert torch.allclose(f, free(v[None]).features[0], rtol=0, atol=1e-12)


def test_mosaic_batch_tensor_and_sam3():
    teacher = tiny_teacher("sam3")
    views = _images(5, 56)  # 4x4 tokens each on an 8x8 canvas: 4 per canvas -> 2 canvases
    feats = mosaic_features(teacher, views)
    assert len(feats) == 5 and all(f.shape == (4, 4, 32) for f in feats)
    # SAM3 mixes tokens globally, so a view's features depend on its neighbours, but the
    # first canvas holds views 0-3 in raster order: check the slicing against a direct run.
    canvas = torch.cat([torch.cat([views[0], views[1]], 2), torch.cat([views[2], views[3]], 2)], 1)
    direct = teacher(canvas[None]).features[0]
    assert torch.allclose(feats[3], direct[4:, 4:], atol=1e-5)


def test_mosaic_rejects_views_that_do_not_fit():
    teacher = PatchTeacher(fixed_size=64)
    with pytest.raises(ValueError, match="view 1 of 9x2 tokens does not fit"):
        mosaic_features(teacher, [torch.rand(3, 16, 16), torch.rand(3, 72, 16)])
    with pytest.raises(ValueError, match="view 0 is 20x16, not a multiple of patch_size=8"):
        mosaic_features(teacher, [torch.rand(3, 20, 16)])
    with pytest.raises(ValueError, match=r"float \(3, h, w\)"):
        mosaic_features(teacher, [torch.rand(1, 3, 16, 16)])
    with pytest.raises(TypeError, match="non-empty"):
        mosaic_features(teacher, [])


def test_load_full_sam3_model_checkpoint(tmp_path):
    from transformers.models.sam3.configuration_sam3 import Sam3Config
    from transformers.models.sam3.modeling_sam3 import Sam3Model

    teacher = tiny_teacher("sam3", seed=2)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    text = {
        **small,
        "num_hidden_layers": 1,
        "vocab_size": 64,
        "projection_dim": 16,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config = Sam3Config(
        vision_config={"backbone_config": teacher.model.config.to_dict(), "fpn_hidden_size": 16},
        text_config=text,
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 4},
        mask_decoder_config={"hidden_size": 16, "num_attention_heads": 2},
    )
    full = Sam3Model(config)
    full.vision_encoder.backbone.load_state_dict(teacher.model.state_dict())
    full.save_pretrained(tmp_path)
    loaded = load_teacher("sam3", str(tmp_path))
    x = _images(1, 112)
    assert torch.equal(loaded(x).features, teacher(x).features)


def test_load_refuses_partly_random_model(tmp_path):
    from safetensors.torch import save_file

    teacher = tiny_teacher("sam3")
    teacher.model.config.save_pretrained(tmp_path)
    # Trunk weights under an unknown prefix: nothing maps onto the model.
    save_file(
        {f"other.{k}": v.contiguous() for k, v in teacher.model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    with pytest.raises(ValueError, match="lacks weights"):
        load_teacher("sam3", str(tmp_path))


def test_dtype_follows_to():
    teacher = tiny_teacher("siglip2").to(torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    assert teacher(_images(1, 64)).features.dtype == torch.bfloat16
