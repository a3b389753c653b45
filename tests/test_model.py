"""RadioModel: config, any-resolution forward, CPE, adaptors, gradients, persistence, input checks."""

import math

import pytest
import torch

from radio import AdaptorSpec, RadioConfig, RadioModel, RadioOutput
from radio.model.adaptors import pixel_shuffle_tokens
from radio.model.cpe import MIN_SIDE_SCALE, PositionEmbedding, draw_cpe_uniforms


def tiny(**overrides) -> RadioConfig:
    return RadioConfig.preset("tiny", **overrides)


def make_model(seed=0, adaptors=None, **overrides) -> RadioModel:
    torch.manual_seed(seed)
    return RadioModel(tiny(**overrides), adaptors).eval()


def images(b, h, w, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


ADAPTORS = [
    AdaptorSpec("siglip", summary_dim=24, feature_dim=20),
    AdaptorSpec("dino", summary_dim=16, feature_dim=12, head="attn", num_inner=2),
    AdaptorSpec("sam", summary_dim=None, feature_dim=8, upsample_factor=2, cls_index=2),
]


# ---------------------------------------------------------------------------------------- config
def test_presets_match_the_published_architectures():
    h = RadioConfig.preset("h")
    assert (h.embed_dim, h.depth, h.num_heads, h.hidden_dim, h.layer_scale) == (1280, 32, 16, 5120, None)
    so = RadioConfig.preset("so400m")
    assert (so.embed_dim, so.depth, so.num_heads, so.hidden_dim, so.head_dim) == (1152, 27, 16, 4304, 72)
    assert (h.num_cls_tokens, h.num_registers, h.summary_idxs, h.num_prefix_tokens) == (3, 7, [0, 1], 10)
    assert RadioConfig.preset("vit-b", window_size=8).global_block_indices() == [2, 5, 8, 11]
    assert RadioConfig.preset("h", window_size=8).global_block_indices() == [7, 15, 23, 31]
    assert RadioConfig.preset("tiny", window_size=2).windowed_blocks() == [True, False, True, False]
    # Explicit lists win, and the last block is always global.
    assert RadioConfig.preset("tiny", window_size=2, global_blocks=[0]).global_block_indices() == [0, 3]
    assert RadioConfig.preset("vit-b").windowed_blocks() == [False] * 12  # no window_size: all global


@pytest.mark.parametrize(
    "field, value",
    [
        ("embed_dim", 50),  # not divisible by 3 heads
        ("depth", 0),
        ("summary_idxs", [3]),
        ("pos_dropout", 1.0),
        ("vitdet_prefix", "mean"),
        ("attention_backend", "cuda"),
        ("cpe_max_size", 1000),
        ("global_blocks", [7]),
        ("layer_scale", -1.0),
        ("window_size", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})
    with pytest.raises(ValueError, match="preset"):
        RadioConfig.preset("huge")


def test_adaptor_spec_validation():
    with pytest.raises(ValueError, match="head"):
        AdaptorSpec("x", 4, 4, head="conv")
    with pytest.raises(ValueError, match="name"):
        AdaptorSpec("backbone", 4, 4)
    with pytest.raises(ValueError, match="cls_index"):
        RadioModel(tiny(), [AdaptorSpec("x", 4, 4, cls_index=3)])


# ---------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("hw", [(32, 32), (32, 96), (160, 48), (1024, 1024)])
def test_any_resolution_shapes_and_formats(hw):
    model = make_model()
    H, W = hw
    h, w = H // 16, W // 16
    x = images(1, H, W)
    with torch.no_grad():
        out = model(x)
        nchw = model(x, feature_fmt="NCHW").features
        nhwc = model(x, feature_fmt="NHWC").features
    assert isinstance(out, RadioOutput)
    assert out.summary.shape == (1, 2 * 48) and out.features.shape == (1, h * w, 48)
    assert torch.isfinite(out.features).all() and torch.isfinite(out.summary).all()
    assert torch.equal(nhwc, out.features.view(1, h, w, 48))
    assert torch.equal(nchw, nhwc.permute(0, 3, 1, 2))


def test_summary_is_the_selected_cls_tokens_and_features_the_patch_tokens():
    model = make_model()
    x = images(2, 48, 64)
    with torch.no_grad():
        tokens, grid = model.forward_features(x)
        out = model(x)
    assert grid == (3, 4) and tokens.shape == (2, 10 + 12, 48)
    assert torch.equal(out.summary, torch.cat([tokens[:, 0], tokens[:, 1]], dim=1))
    assert torch.equal(out.features, tokens[:, 10:])
    # The final LayerNorm (no affine change at init) normalises every output token.
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 22), atol=1e-5)


def test_batch_elements_are_independent_in_eval():
    model = make_model()
    x = images(3, 64, 48)
    with torch.no_grad():
        full = model(x).features
        single = model(x[1:2]).features
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- CPE
def test_cpe_eval_is_a_resized_square_cropped_top_left():
    torch.manual_seed(0)
    pe = PositionEmbedding(8, table_side=16).eval()
    square = pe.eval_embedding(6, 6)
    torch.testing.assert_close(pe.eval_embedding(3, 6), square[:, :3])
    torch.testing.assert_close(pe.eval_embedding(6, 2), square[:, :, :2])
    # At full size the table is used as is.
    torch.testing.assert_close(pe.eval_embedding(16, 16).reshape(1, 256, 8), pe.pos_embed)


def _coordinate_table(side: int) -> PositionEmbedding:
    """A table whose channel 0 is the column index and channel 1 the row index: bilinear resampling
    of it returns the sampled (x, y) coordinates exactly."""
    pe = PositionEmbedding(2, table_side=side, pos_dropout=0.0)
    rows, cols = torch.meshgrid(torch.arange(side.__float__()), torch.arange(side.__float__()), indexing="ij")
    with torch.no_grad():
        pe.pos_embed.copy_(torch.stack([cols, rows], dim=-1).reshape(1, side * side, 2))
    return pe.train()


def test_cpe_training_crops_follow_the_scale_aspect_and_offset_laws():
    side, h, w, batch = 33, 5, 7, 512
    pe = _coordinate_table(side)
    pos = pe.train_embedding(batch, h, w, torch.Generator().manual_seed(0)) / (side - 1)  # [0, 1] units
    x, y = pos[..., 0], pos[..., 1]
    # Each crop is an axis-aligned linear grid: x depends on the column only, y on the row only.
    torch.testing.assert_close(x, x[:, :1, :].expand_as(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, y[:, :, :1].expand_as(y), atol=1e-5, rtol=0)
    sx, sy = x[:, 0, -1] - x[:, 0, 0], y[:, -1, 0] - y[:, 0, 0]
    ox, oy = x[:, 0, 0], y[:, 0, 0]
    eps = 1e-5
    assert (ox >= -eps).all() and (oy >= -eps).all() and (ox + sx <= 1 + eps).all() and (oy + sy <= 1 + eps).all()
    unclamped = (sx < 1 - eps) & (sy < 1 - eps)
    side_scale, aspect_sq = (sx * sy).sqrt(), sx / sy
    assert (side_scale[unclamped] >= MIN_SIDE_SCALE - eps).all()
    assert (aspect_sq[unclamped] >= (3 / 4) ** 2 - eps).all() and (aspect_sq[unclamped] <= (4 / 3) ** 2 + eps).all()
    assert sx.min() < 0.45 and sx.max() > 0.95  # the range is actually explored
    assert (~unclamped).any() and unclamped.float().mean() > 0.5


def test_cpe_training_randomness_comes_from_the_generator_and_dropout_zeroes_samples():
    torch.manual_seed(0)
    pe = PositionEmbedding(4, table_side=8, pos_dropout=0.5).train()
    draw = lambda seed: pe.train_embedding(64, 3, 5, torch.Generator().manual_seed(seed))
    a, b = draw(1), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, draw(2))
    dropped = (a.flatten(1) == 0).all(dim=1)
    assert 0.25 < dropped.float().mean() < 0.75
    assert not torch.equal(a[~dropped][0], a[~dropped][1])  # per-sample crops


def test_cpe_uniforms_set_each_crop_by_the_documented_formulas():
    side = 17
    pe = _coordinate_table(side)
    pe.pos_dropout = 0.5
    # Columns: side scale, aspect, offset x, offset y, dropout.
    u = torch.tensor(
        [
            [1.0, 0.5, 0.3, 0.9, 0.9],  # s = 1, a = 1: the whole table, whatever the offsets
            [0.0, 0.5, 1.0, 0.0, 0.9],  # s = sqrt(0.1), a = 1: right edge, top edge
            [0.5, 1.0, 0.25, 0.75, 0.9],  # a = 4/3: wider than tall
            [1.0, 0.5, 0.0, 0.0, 0.1],  # dropped: u4 < pos_dropout
        ]
    )
    pos = pe.train_embedding(4, 3, 5, uniforms=u) / (side - 1)
    x, y = pos[..., 0], pos[..., 1]
    torch.testing.assert_close(x[0, 0], torch.linspace(0, 1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, :, 0], torch.linspace(0, 1, 3), atol=1e-5, rtol=0)
    s = MIN_SIDE_SCALE
    torch.testing.assert_close(x[1, 0], torch.linspace(1 - s, 1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1, :, 0], torch.linspace(0, s, 3), atol=1e-5, rtol=0)
    s = MIN_SIDE_SCALE + (1 - MIN_SIDE_SCALE) * 0.5
    sx, sy = min(s * 4 / 3, 1.0), s * 3 / 4
    torch.testing.assert_close(x[2, 0], 0.25 * (1 - sx) + sx * torch.linspace(0, 1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[2, :, 0], 0.75 * (1 - sy) + sy * torch.linspace(0, 1, 3), atol=1e-5, rtol=0)
    assert torch.equal(pos[3], torch.zeros_like(pos[3]))


def test_cpe_sample_depends_only_on_its_own_uniforms():
    torch.manual_seed(0)
    pe = PositionEmbedding(6, table_side=12, pos_dropout=0.3).train()
    u = draw_cpe_uniforms(5, torch.Generator().manual_seed(4), torch.device("cpu"))
    full = pe.train_embedding(5, 4, 7, uniforms=u)
    for b in range(5):  # alone, in a reversed batch, next to other samples: the same embedding
        torch.testing.assert_close(pe.train_embedding(1, 4, 7, uniforms=u[b : b + 1])[0], full[b], atol=1e-6, rtol=0)
    torch.testing.assert_close(pe.train_embedding(5, 4, 7, uniforms=u.flip(0)), full.flip(0), atol=1e-6, rtol=0)
    others = torch.cat([u[2:3], torch.rand(3, 5)])
    torch.testing.assert_close(pe.train_embedding(4, 4, 7, uniforms=others)[0], full[2], atol=1e-6, rtol=0)
    # The generator path draws exactly these uniforms.
    assert torch.equal(pe.train_embedding(5, 4, 7, torch.Generator().manual_seed(4)), full)

    # Through the whole model in train mode: sample b's output depends on (x[b], u[b]) only.
    model = make_model().train()
    x = images(3, 48, 64)
    with torch.no_grad():
        out = model(x, cpe_uniforms=u[:3]).features
        alone = model(x[1:2], cpe_uniforms=u[1:2]).features
        ev = model.eval()(x, cpe_uniforms=u[:3]).features  # eval mode: uniforms are ignored
    torch.testing.assert_close(alone[0], out[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ev, model(x).features)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.rand(2, 4), ValueError, "shape"),
        (torch.rand(5), ValueError, "shape"),
        (torch.full((2, 5), 1.5), ValueError, r"\[0, 1\]"),
        (torch.tensor([[0.5] * 5, [float("nan")] * 5]), ValueError, "NaN"),
        (torch.ones(2, 5, dtype=torch.long), TypeError, "floating"),
        ([[0.5] * 5] * 2, TypeError, "torch.Tensor"),
    ],
)
def test_bad_cpe_uniforms_raise(bad, error, match):
    model = make_model().train()
    with pytest.raises(error, match=match) as info:
        model(images(2, 32, 32), cpe_uniforms=bad)
    assert "cpe_uniforms" in str(info.value)
    with pytest.raises(error, match=match):  # validated in eval mode too, where they are unused
        model.eval()(images(2, 32, 32), cpe_uniforms=bad)


def test_model_train_mode_is_random_and_reproducible_eval_is_not():
    model = make_model()
    x = images(2, 64, 64)
    with torch.no_grad():
        ev = model(x).features
        model.train()
        t1 = model(x, generator=torch.Generator().manual_seed(5)).features
        t2 = model(x, generator=torch.Generator().manual_seed(5)).features
        t3 = model(x, generator=torch.Generator().manual_seed(6)).features
        torch.manual_seed(9)
        g1 = model(x).features
        torch.manual_seed(9)
        g2 = model(x).features
        model.eval()
        assert torch.equal(model(x).features, ev)
    assert torch.equal(t1, t2) and torch.equal(g1, g2)
    assert not torch.allclose(t1, t3) and not torch.allclose(t1, ev)


# ---------------------------------------------------------------------------------------- adaptors
def test_adaptor_outputs_shapes_cls_mapping_and_upsampling():
    model = make_model(adaptors=ADAPTORS, window_size=2)
    x = images(2, 64, 96)  # 4 x 6 tokens
    with torch.no_grad():
        out = model(x)
        tokens, grid = model.forward_features(x)
        nhwc = model(x, feature_fmt="NHWC")
    assert list(out) == ["backbone", "siglip", "dino", "sam"]
    assert out["siglip"].summary.shape == (2, 24) and out["siglip"].features.shape == (2, 24, 20)
    assert out["dino"].summary.shape == (2, 16) and out["dino"].features.shape == (2, 24, 12)
    assert out["sam"].summary is None and out["sam"].features.shape == (2, 4 * 24, 8)
    assert nhwc["sam"].features.shape == (2, 8, 12, 8)
    assert [s.cls_index for s in model.adaptor_specs] == [0, 1, 2]
    # Adaptor i's summary head reads CLS token i.
    torch.testing.assert_close(out["dino"].summary, model.adaptors["dino"].summary_head(tokens[:, 1]))
    torch.testing.assert_close(out["siglip"].summary, model.adaptors["siglip"].summary_head(tokens[:, 0]))
    assert model.adaptors["dino"].feature_head.blocks[0].attn.num_heads == 4  # 16 heads would be 3 wide


def test_pixel_shuffle_tokens_places_each_sub_token_in_its_cell():
    B, h, w, k, C = 2, 3, 4, 2, 5
    x = torch.randn(B, h * w, k * k * C)
    out = pixel_shuffle_tokens(x, h, w, k).view(B, k * h, k * w, C)
    for i in range(h):
        for j in range(w):
            cell = x[:, i * w + j].view(B, k, k, C)
            assert torch.equal(out[:, k * i : k * i + k, k * j : k * j + k], cell)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", ["skip", "global", "replicate"])
def test_gradients_reach_every_parameter(mode):
    model = make_model(adaptors=ADAPTORS, window_size=2, vitdet_prefix=mode, pos_dropout=0.0).train()
    out = model(images(2, 64, 64), generator=torch.Generator().manual_seed(0))
    loss = sum(
        o.features.square().mean() + (o.summary.square().mean() if o.summary is not None else 0) for o in out.values()
    )
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_gradient_checkpointing_gives_the_same_gradients():
    x = images(2, 64, 64)

    def grads(ckpt):
        model = make_model(window_size=2, pos_dropout=0.0).train()
        model.set_grad_checkpointing(ckpt)
        model(x, generator=torch.Generator().manual_seed(0)).features.square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


# ---------------------------------------------------------------------------------------- backends
def test_torch_and_triton_attention_backends_agree():
    model = make_model(adaptors=ADAPTORS[1:2], window_size=2, vitdet_prefix="global")
    x = images(1, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.set_attention_backend("triton")
        got = model(x)
    for name in ref:
        torch.testing.assert_close(got[name].features, ref[name].features, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------- API
def test_official_api_properties():
    model = make_model(window_size=2)
    assert (model.patch_size, model.min_resolution_step, model.window_size) == (16, 32, 2)
    assert (model.max_resolution, model.preferred_resolution) == (1024, (512, 512))
    assert (model.num_summary_tokens, model.summary_dim, model.embed_dim) == (10, 96, 48)
    assert model.get_nearest_supported_resolution(100, 17) == (96, 32)
    assert model.get_nearest_supported_resolution(5000, 40) == (4992, 32)  # not clamped: larger inputs run
    assert make_model().min_resolution_step == 16


def test_make_preprocessor_external():
    model = make_model()
    x = images(1, 32, 48)
    with torch.no_grad():
        ref = model(x).features
        norm = model.make_preprocessor_external()
        expected_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        assert torch.allclose(norm.mean, expected_mean)
        torch.testing.assert_close(model(norm(x)).features, ref)
        assert not torch.allclose(model(x).features, ref)


def test_forward_intermediates():
    model = make_model(adaptors=ADAPTORS[:1], window_size=2)
    x = images(2, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC")
        ref = model(x)
        only = model.forward_intermediates(
            x, indices=[0, -1], output_fmt="NCHW", intermediates_only=True, stop_early=True, return_prefix_tokens=True
        )
    assert len(inter) == 2 and inter[-1].shape == (2, 24, 48)
    torch.testing.assert_close(inter[-1], ref["backbone"].features)  # last block + final norm = output
    torch.testing.assert_close(final["siglip"].summary, ref["siglip"].summary)
    assert len(only) == 2 and only[0].features.shape == (2, 48, 4, 6) and only[0].summary.shape == (2, 96)
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=[4])


# ---------------------------------------------------------------------------------------- persistence
def test_save_pretrained_round_trip(tmp_path):
    model = make_model(adaptors=ADAPTORS, window_size=2, vitdet_prefix="replicate")
    model.save_pretrained(tmp_path)
    loaded = RadioModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config and loaded.adaptor_specs == model.adaptor_specs
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    x = images(1, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for name in a:
        assert torch.equal(a[name].features, b[name].features)
    with pytest.raises(ValueError, match="config.json"):
        RadioModel.from_pretrained(tmp_path / "missing")


def test_state_dict_keys_are_stable_for_the_tiny_preset():
    block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    ]
    expected = {
        "input_norm.mean",
        "input_norm.std",
        "patch_embed.proj.weight",
        "cpe.pos_embed",
        "prefix_tokens",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.{i}.{k}" for i in range(4) for k in block}
    sd = RadioModel(tiny()).state_dict()
    assert set(sd) == expected
    assert sd["cpe.pos_embed"].shape == (1, 64 * 64, 48) and sd["prefix_tokens"].shape == (10, 48)
    assert sd["patch_embed.proj.weight"].shape == (48, 3 * 16 * 16)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_with_the_nearest_resolution():
    model = make_model(window_size=2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"min_resolution_step=32.*nearest supported resolution: 64x96"):
        model(torch.rand(1, 3, 70, 90))
    assert model(torch.rand(1, 3, 1088, 64)).features.shape == (1, 68 * 4, 48)  # above max_resolution: runs
    with pytest.raises(TypeError, match="x"):
        model([[0.0]])
    with pytest.raises(ValueError, match="feature_fmt"):
        model(torch.rand(1, 3, 64, 64), feature_fmt="CHW")
    assert math.isfinite(model(torch.zeros(1, 3, 32, 32)).summary.sum().item())
