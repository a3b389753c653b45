"""Packed variable-size batches (``RadioModel.forward(patches, image_grid_hw=...)``): each image's outputs
equal a forward pass on that image alone, on both attention backends, and match transformers' packed path."""

from __future__ import annotations

import pytest
import torch

from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.model.packed import pack_images, unpack_features

SIZES = [(32, 48), (64, 64), (16, 16), (48, 16)]  # patch 16: grids 2x3, 4x4, 1x1, 3x1
TOL = dict(rtol=1e-5, atol=1e-5)


def _model(adaptors=(), **overrides) -> RadioModel:
    torch.manual_seed(0)
    cfg = RadioConfig.preset("tiny", cpe_max_size=128, **overrides)
    return RadioModel(cfg, list(adaptors)).eval()


def _images(sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_equals_each_image_alone(backend):
    specs = [AdaptorSpec("siglip2", 16, 24), AdaptorSpec("sam3", None, 8, head="attn", upsample_factor=2)]
    model = _model(specs)
    model.set_attention_backend(backend)
    images = _images()
    patches, grid = pack_images(images, model.patch_size)
    with torch.no_grad():
        packed = model(patches, image_grid_hw=grid)
        alone = [model(img[None]) for img in images]
    assert packed["backbone"].summary.shape == (len(images), model.summary_dim)
    assert packed["backbone"].features.shape == (patches.shape[0], model.embed_dim)
    for name, k in (("backbone", 1), ("siglip2", 1), ("sam3", 2)):
        if alone[0][name].summary is not None:
            torch.testing.assert_close(packed[name].summary, torch.cat([a[name].summary for a in alone]), **TOL)
        else:
            assert packed[name].summary is None
        for got, ref in zip(unpack_features(packed[name].features, grid, "NLC", upsample=k), alone):
            torch.testing.assert_close(got, ref[name].features[0], **TOL)


def test_packed_training_grads_and_cpe_match_each_image_alone():
    """Training mode: per-image CPE crops from cpe_uniforms rows, and the gradients of the packed pass."""
    model = _model().train()
    images = _images(SIZES[:3], seed=2)
    uniforms = torch.rand(len(images), 5, generator=torch.Generator().manual_seed(3))
    uniforms[:, 4] = 0.9  # keep every position embedding (pos_dropout 0.1)
    patches, grid = pack_images(images, model.patch_size)
    out = model(patches, image_grid_hw=grid, cpe_uniforms=uniforms)
    loss = out.summary.square().sum() + out.features.square().sum()
    packed_grads = torch.autograd.grad(loss, list(model.parameters()))
    loss = 0
    for s, img in enumerate(images):
        alone = model(img[None], cpe_uniforms=uniforms[s : s + 1])
        loss = loss + alone.summary.square().sum() + alone.features.square().sum()
    alone_grads = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(packed_grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_matches_transformers_packed_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "RadioModel"):
        pytest.skip("this transformers has no RadioModel")
    model = _model(final_norm=False)
    model.save_pretrained(tmp_path / "hf", format="transformers")
    hf = transformers.RadioModel.from_pretrained(tmp_path / "hf").eval()
    patches, grid = pack_images(_images(), model.patch_size)
    with torch.no_grad():
        ref, got = hf(pixel_values=patches, image_grid_hw=grid), model(patches, image_grid_hw=grid)
    torch.testing.assert_close(got.summary, ref.summary, **TOL)
    torch.testing.assert_close(got.features, ref.features, **TOL)


def test_packed_input_errors():
    model = _model()
    patches, grid = pack_images(_images(SIZES[:2]), model.patch_size)
    with pytest.raises(ValueError, match="covers 22 patches but x has 21"):
        model(patches[:-1], image_grid_hw=grid)
    with pytest.raises(ValueError, match="shape \\(T, 3\\*p\\*p\\)"):
        model(patches[:, :10], image_grid_hw=grid)
    with pytest.raises(ValueError, match="must be in \\[1, 8\\]"):
        model(patches, image_grid_hw=torch.tensor([[1, 22]]))
    with pytest.raises(TypeError, match="integer torch.Tensor"):
        model(patches, image_grid_hw=grid.float())
    with pytest.raises(ValueError, match="feature_fmt must be 'NLC'"):
        model(patches, "NCHW", image_grid_hw=grid)
    with pytest.raises(ValueError, match="ViTDet windows"):
        _model(window_size=2)(patches, image_grid_hw=grid)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pack_images([torch.rand(3, 20, 16)], 16)
