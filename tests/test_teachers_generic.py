"""Teachers of kind "hf" and "timm" (radio.teachers.generic), on tiny random models saved to a folder."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models import save_for_hf
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTModel

from radio.teachers.base import PREPROCESSOR_FILE
from radio.teachers.generic import load_generic_teacher
from radio.train import TrainConfig, apply_overrides
from radio.train.teaching import build_teachers

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY, image_size=64)).eval()
    model.save_pretrained(folder)
    with open(folder / PREPROCESSOR_FILE, "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, f)
    return folder, model


def test_hf_teacher_layers_prefix_and_summaries(hf_vit):
    folder, model = hf_vit
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))  # off the native 64 x 64
    pixels = (images - 0.5) / 0.25
    with torch.no_grad():
        ref = model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    teacher = load_generic_teacher("hf", folder)
    assert (teacher.patch_size, teacher.feature_dim, teacher.summary_dim, teacher.native_size) == (16, 32, 32, 64)
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25)
    out = teacher(images)
    torch.testing.assert_close(out.features, ref.last_hidden_state[:, 1:].reshape(2, 3, 5, 32))
    torch.testing.assert_close(out.summary, ref.last_hidden_state[:, 0])

    first = load_generic_teacher("hf", folder, layer=1, summary="pooler")(images)
    torch.testing.assert_close(first.features, ref.hidden_states[1][:, 1:].reshape(2, 3, 5, 32))
    torch.testing.assert_close(first.summary, ref.pooler_output)
    none = load_generic_teacher("hf", folder, summary="none")
    assert none.summary_dim is None and none(images).summary is None
    with pytest.raises(ValueError, match="prefix_tokens"):
        load_generic_teacher("hf", folder, prefix_tokens=3)(images)
    with pytest.raises(ValueError, match="summary must be one of"):
        load_generic_teacher("hf", folder, summary="mean")
    with pytest.raises(ValueError, match="layer applies to kind 'hf'"):
        load_generic_teacher("timm", folder, layer=1)


def test_hf_teacher_drops_registers(tmp_path):
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, image_size=64, num_register_tokens=3)).eval()
    model.save_pretrained(tmp_path)
    images = torch.rand(1, 3, 32, 64)
    teacher = load_generic_teacher("hf", tmp_path)
    assert teacher.mean == (0.485, 0.456, 0.406)  # no preprocessor file: ImageNet's
    with torch.no_grad():
        tokens = model(pixel_values=teacher_pixels(teacher, images)).last_hidden_state
    assert tokens.shape[1] == 1 + 3 + 8
    torch.testing.assert_close(teacher(images).features, tokens[:, 4:].reshape(1, 2, 4, 32))
    torch.testing.assert_close(
        load_generic_teacher("hf", tmp_path, prefix_tokens=4)(images).features, tokens[:, 4:].reshape(1, 2, 4, 32)
    )


def teacher_pixels(teacher, images):
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    return (images - mean) / std


def test_timm_teacher_vit_and_cnn(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).eval()
    save_for_hf(vit, tmp_path / "vit", safe_serialization=True)
    teacher = load_generic_teacher("timm", tmp_path / "vit")
    assert (teacher.patch_size, teacher.feature_dim, teacher.summary_dim, teacher.fixed_size) == (16, 64, 64, None)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    reference = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True, dynamic_img_size=True).eval()
    with torch.no_grad():
        tokens = reference.forward_features(teacher_pixels(teacher, images))
        pooled = reference.forward_head(tokens, pre_logits=True)
    out = teacher(images)
    torch.testing.assert_close(out.features, tokens[:, 1:].reshape(2, 4, 6, 64))
    torch.testing.assert_close(out.summary, pooled)
    torch.testing.assert_close(
        load_generic_teacher("timm", tmp_path / "vit", summary="cls")(images).summary, tokens[:, 0]
    )

    cnn = timm.create_model("test_resnet", pretrained=False).eval()
    save_for_hf(cnn, tmp_path / "cnn", safe_serialization=True)
    teacher = load_generic_teacher("timm", tmp_path / "cnn")
    assert (teacher.patch_size, teacher.feature_dim) == (32, 96)
    out = teacher(torch.rand(1, 3, 64, 96))
    assert out.features.shape == (1, 2, 3, 96) and out.summary.shape == (1, 96)
    with pytest.raises(ValueError, match="summary='cls' needs a ViT"):
        load_generic_teacher("timm", tmp_path / "cnn", summary="cls")


def test_trainer_builds_hf_and_timm_teachers(hf_vit, tmp_path):
    folder, _ = hf_vit
    save_for_hf(timm.create_model("test_vit", pretrained=False), tmp_path / "vit", safe_serialization=True)
    cfg = apply_overrides(
        TrainConfig(),
        [
            "teachers.vit.kind=hf",
            f"teachers.vit.name_or_path={folder}",
            "teachers.vit.summary=pooler",
            "teachers.tvit.kind=timm",
            f"teachers.tvit.name_or_path={tmp_path / 'vit'}",
            "teachers.tvit.prefix_tokens=1",
        ],
    )
    slots = build_teachers(cfg, torch.device("cpu"))
    assert (slots["vit"].teacher.feature_dim, slots["tvit"].teacher.feature_dim) == (32, 64)
    with pytest.raises(ValueError, match="teachers.x: kind 'hf' needs name_or_path"):
        apply_overrides(TrainConfig(), ["teachers.x.kind=hf"])
    with pytest.raises(ValueError, match="teachers.vit.summary"):
        apply_overrides(cfg, ["teachers.vit.summary=avg"])


def test_hf_kind_refuses_models_without_tokens(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kind 'hf' takes ViT-style models.*kind 'timm'"):
        load_generic_teacher("hf", tmp_path)
