"""Loading checkpoints in the NVlabs/RADIO layout (built here with the official key names and shapes)."""

from argparse import Namespace

import pytest
import torch

from radio import AdaptorSpec, RadioConfig, RadioModel

TEACHERS = [
    dict(name="siglip2-g", type="siglip2", use_summary=True),
    dict(name="dinov3", type="dino", use_summary=True),
    dict(name="sam3", type="sam", use_summary=False, fd_upsample_factor=2),
]


def source_model(final_norm=True, seed=0) -> RadioModel:
    torch.manual_seed(seed)
    specs = [
        AdaptorSpec("siglip2-g", summary_dim=24, feature_dim=20, hidden_dim=40, num_inner=1),
        AdaptorSpec("dinov3", summary_dim=16, feature_dim=12, head="attn", hidden_dim=40, num_inner=2),
        AdaptorSpec("sam3", summary_dim=8, feature_dim=6, hidden_dim=40, upsample_factor=2, num_inner=0),
    ]
    model = RadioModel(RadioConfig.preset("tiny", final_norm=final_norm, cpe_max_size=512), specs).eval()
    with torch.no_grad():  # non-trivial norms and LayerScales, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def official_backbone(model: RadioModel) -> dict:
    """Our weights under the timm / ViTPatchGenerator names the public checkpoints use."""
    sd = model.state_dict()
    out = {
        "patch_generator.embedder.weight": sd["patch_embed.proj.weight"],
        "patch_generator.pos_embed": sd["cpe.pos_embed"],
        "patch_generator.cls_token.token": sd["prefix_tokens"],
    }
    out.update({k: v for k, v in sd.items() if k.startswith("blocks.") or k.startswith("norm.")})
    return out


def heads(model: RadioModel, name: str, which: str) -> dict:
    prefix = f"adaptors.{name}.{which}."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def training_layout(model: RadioModel) -> dict:
    sd = {f"base_model.{k}": v for k, v in official_backbone(model).items()}
    sd["input_conditioner.norm_mean"] = model.input_norm.mean.clone()
    sd["input_conditioner.norm_std"] = model.input_norm.std.clone()
    for i, t in enumerate(TEACHERS):
        # Heads are stored by teacher index in some releases and by name in others: use both.
        key = str(i) if i != 1 else t["name"]
        sd.update({f"_heads.{key}.{k}": v for k, v in heads(model, t["name"], "summary_head").items()})
        sd.update({f"_feature_projections.{key}.{k}": v for k, v in heads(model, t["name"], "feature_head").items()})
    return sd


def wrapper_layout(model: RadioModel) -> dict:
    sd = {f"radio_model.model.{k}": v for k, v in official_backbone(model).items()}
    sd["radio_model.input_conditioner.norm_mean"] = model.input_norm.mean.clone()
    sd["radio_model.input_conditioner.norm_std"] = model.input_norm.std.clone()
    sd["radio_model.summary_idxs"] = torch.tensor([0, 1])
    for t in TEACHERS:
        sd.update(
            {
                f"radio_model.adaptors.{t['name']}.head_mlp.{k}": v
                for k, v in heads(model, t["name"], "summary_head").items()
            }
        )
        sd.update(
            {
                f"radio_model.adaptors.{t['name']}.feat_mlp.{k}": v
                for k, v in heads(model, t["name"], "feature_head").items()
            }
        )
    return sd


def args(**changes):
    fields = dict(
        model="vit_custom_patch16",
        model_kwargs=dict(num_heads=3),
        teachers=TEACHERS,
        cpe_max_size=512,
        cls_token_per_teacher=True,
        register_multiple=10,
        mlp_version="v2",
        spatial_mlp_version="attn",
    )
    return Namespace(**{**fields, **changes})


def assert_same_outputs(a: RadioModel, b: RadioModel, hw=(64, 96)):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert list(ya) == list(yb)
    for name in ya:
        torch.testing.assert_close(yb[name].features, ya[name].features, msg=name)
        if ya[name].summary is not None:
            torch.testing.assert_close(yb[name].summary, ya[name].summary, msg=name)


def test_training_layout_file_prefers_ema(tmp_path):
    model = source_model()
    garbage = {k: torch.randn_like(v.float()) for k, v in training_layout(source_model(seed=7)).items()}
    path = tmp_path / "c-radio_v4-tiny.pth.tar"
    torch.save(dict(args=args(), state_dict=garbage, state_dict_ema=training_layout(model)), path)
    loaded = RadioModel.from_radio_checkpoint(path)
    cfg = loaded.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.hidden_dim, cfg.patch_size) == (48, 4, 3, 96, 16)
    assert (cfg.num_cls_tokens, cfg.num_registers, cfg.summary_idxs, cfg.cpe_max_size) == (3, 7, [0, 1], 512)
    assert cfg.qkv_bias and cfg.layer_scale is not None and cfg.final_norm
    specs = {s.name: s for s in loaded.adaptor_specs}
    assert specs["dinov3"].head == "attn" and specs["dinov3"].num_inner == 2 and specs["dinov3"].cls_index == 1
    assert specs["sam3"].upsample_factor == 2 and specs["sam3"].feature_dim == 6 and specs["sam3"].cls_index == 2
    assert not loaded.training
    assert_same_outputs(model, loaded)


def test_wrapper_layout_without_final_norm_in_half_precision():
    model = source_model(final_norm=False)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in wrapper_layout(model).items()}
    loaded = RadioModel.from_radio_checkpoint(dict(args=vars(args()), state_dict=sd))
    assert loaded.config.final_norm is False and "norm.weight" not in loaded.state_dict()
    with torch.no_grad():  # compare against the same weights rounded to half
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    assert_same_outputs(model, loaded)


def test_adaptor_selection_window_mode_and_errors():
    model = source_model()
    chk = dict(args=args(), state_dict=training_layout(model))
    backbone_only = RadioModel.from_radio_checkpoint(chk, adaptor_names=[], window_size=2)
    assert backbone_only.adaptor_specs == [] and backbone_only.min_resolution_step == 32
    one = RadioModel.from_radio_checkpoint(chk, adaptor_names=["sam3"])
    assert list(one.adaptors) == ["sam3"]
    with pytest.raises(ValueError, match="adaptor_names"):
        RadioModel.from_radio_checkpoint(chk, adaptor_names=["clip"])
    with pytest.raises(ValueError, match="args"):
        RadioModel.from_radio_checkpoint(dict(state_dict=chk["state_dict"]))
    bad = dict(
        chk, state_dict={**chk["state_dict"], "base_model.patch_generator.patch_normalizer.weight": torch.ones(48)}
    )
    with pytest.raises(ValueError, match="patch_normalizer"):
        RadioModel.from_radio_checkpoint(bad)
    with pytest.raises(ValueError, match="RADIO checkpoint"):
        RadioModel.from_radio_checkpoint(dict(args=args(), state_dict={"foo.weight": torch.ones(1)}))
    heads_unknown = dict(chk, args=args(model="vit_strange", model_kwargs={}))
    with pytest.raises(ValueError, match="num_heads"):
        RadioModel.from_radio_checkpoint(heads_unknown)
    assert RadioModel.from_radio_checkpoint(heads_unknown, num_heads=3).config.num_heads == 3


def official_outputs(model: RadioModel, x: torch.Tensor, mean=None, tx=None) -> dict:
    """What the official model computes from ``model``'s weights and a feature normaliser (mean, tx):
    the normaliser whitens the patch tokens only; the backbone summary and the adaptor summary heads
    read the raw CLS tokens, the adaptor feature heads the whitened patches."""
    tokens, grid = model.forward_features(x)
    P = model.config.num_prefix_tokens
    patches = tokens[:, P:] if mean is None else (tokens[:, P:] - mean) @ tx.T
    out = {"backbone": (tokens[:, model.config.summary_idxs].flatten(1), patches)}
    for spec in model.adaptor_specs:
        out[spec.name] = model.adaptors[spec.name](tokens[:, spec.cls_index], patches, grid)
    return out


def test_feature_normalizer_whitens_patch_tokens_only(tmp_path):
    """A checkpoint's _feature_normalizer maps the patch tokens to (x - mean) @ tx^T (backbone features and
    adaptor feature heads); summaries do not depend on it."""
    model = source_model()
    g = torch.Generator().manual_seed(11)
    D = model.embed_dim
    sd = training_layout(model)
    loaded = {}
    for seed in (0, 1):
        mean, tx = torch.randn(D, generator=g), torch.randn(D, D, generator=g) / D**0.5
        sd.update({"_feature_normalizer.mean": mean, "_feature_normalizer.tx": tx})
        loaded[seed] = (RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=sd)), mean, tx)
    first = loaded[0][0]
    assert first.config.feature_normalizer and "feature_norm.tx" in first.state_dict()
    assert first.config.intermediate_normalizer == "none" and first.intermediate_norm is None

    for hw in ((64, 64), (48, 96)):
        x = torch.rand(1, 3, *hw, generator=g)
        got = {}
        with torch.no_grad():
            for seed, (m, mean, tx) in loaded.items():
                expected, got[seed] = official_outputs(model, x, mean, tx), m(x)
                for name, (summary, features) in expected.items():
                    torch.testing.assert_close(got[seed][name].features, features, msg=name)
                    if summary is not None:
                        torch.testing.assert_close(got[seed][name].summary, summary, msg=name)
        for name in got[0]:  # another normaliser: same summaries, other features
            if got[0][name].summary is not None:
                assert torch.equal(got[0][name].summary, got[1][name].summary), name
            assert not torch.allclose(got[0][name].features, got[1][name].features), name
    # and it round-trips through save_pretrained
    first.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        again = RadioModel.from_pretrained(tmp_path / "m").eval()(x)
        want = first(x)
    assert all(torch.equal(again[k].features, want[k].features) for k in want)
    assert torch.equal(again["backbone"].summary, want["backbone"].summary)


@pytest.mark.parametrize(
    ("per_block", "prefix", "final_norm"),
    [
        (False, "_intermediate_feature_normalizer.", False),  # the key the official checkpoints use
        (True, "_intermediate_feature_normalizer.", True),
        (True, "inter_feature_normalizer.", False),  # the official module's attribute name
    ],
)
def test_intermediate_normalizer_is_loaded_and_applied(tmp_path, per_block, prefix, final_norm):
    """Block l's patch tokens -> alpha_l (x - mean_l) @ R_l^T in forward_intermediates (prefix tokens
    untouched), then the final LayerNorm with norm=True; normalize=False returns them raw."""
    model = source_model(final_norm=final_norm)
    g = torch.Generator().manual_seed(12)
    L, D = model.config.depth, model.embed_dim
    means, alphas = torch.randn(L, D, generator=g), torch.rand(L, generator=g) + 0.5
    rotation = torch.linalg.qr(torch.randn(*((L,) if per_block else ()), D, D, generator=g))[0]
    sd = training_layout(model)
    sd.update({f"{prefix}means": means, f"{prefix}alphas": alphas, f"{prefix}rotation": rotation})
    loaded = RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=sd))
    assert loaded.config.intermediate_normalizer == ("per_block" if per_block else "shared")
    assert loaded.config.final_norm == final_norm

    x = torch.rand(2, 3, 48, 64, generator=g)
    take = [0, L - 1]
    kw = dict(intermediates_only=True, output_fmt="NLC")
    with torch.no_grad():
        raw = model.forward_intermediates(x, take, return_prefix_tokens=True, **kw)
        got = loaded.forward_intermediates(x, take, return_prefix_tokens=True, **kw)
        normed = loaded.forward_intermediates(x, take, norm=True, **kw)
        plain = loaded.forward_intermediates(x, take, normalize=False, **kw)
    for layer, r, y, n, p in zip(take, raw, got, normed, plain):
        rot = rotation[layer] if per_block else rotation
        want = alphas[layer] * (r.features - means[layer]) @ rot.T
        torch.testing.assert_close(y.features, want)
        torch.testing.assert_close(y.summary, r.summary)  # prefix tokens are not normalised
        torch.testing.assert_close(n, loaded.norm(want))  # LayerNorm after the normaliser
        torch.testing.assert_close(p, r.features)
    with torch.no_grad():  # the final output does not go through it
        torch.testing.assert_close(loaded(x)["backbone"].features, model(x)["backbone"].features)

    loaded.save_pretrained(tmp_path / "m")
    again = RadioModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        redo = again.forward_intermediates(x, take, **kw)
    assert all(torch.equal(a, b.features) for a, b in zip(redo, got))

    sd[f"{prefix}means"] = means[:-1]
    with pytest.raises(ValueError, match="means must have shape"):
        RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=sd))
    del sd[f"{prefix}means"]
    with pytest.raises(ValueError, match="must hold 'means', 'alphas' and 'rotation'"):
        RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=sd))


def test_layer_scale_under_radio_name_grandma():
    """RADIO's LayerScale saves its gain as ls1/ls2.grandma (backbone and attention heads); both names load."""
    model = source_model()
    sd = training_layout(model)
    renamed = {k.replace(".ls1.gamma", ".ls1.grandma").replace(".ls2.gamma", ".ls2.grandma"): v for k, v in sd.items()}
    assert sum(".grandma" in k for k in renamed) == 2 * 4 + 2 * 2  # 4 backbone blocks + 2 attn-head blocks
    for state in (sd, renamed):
        loaded = RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=state))
        assert loaded.config.layer_scale is not None
        assert_same_outputs(model, loaded, hw=(32, 48))


def test_forward_intermediates_final_output_norm_and_stop_early():
    """Official semantics: the final output skips the final norm unless norm=True, and with stop_early it is
    taken after the last requested block (then through the feature normaliser and the heads)."""
    model = source_model(final_norm=True)
    g = torch.Generator().manual_seed(5)
    D = model.embed_dim
    mean, tx = torch.randn(D, generator=g), torch.randn(D, D, generator=g) / D**0.5
    sd = training_layout(model)
    sd.update({"_feature_normalizer.mean": mean, "_feature_normalizer.tx": tx})
    loaded = RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=sd))
    x = torch.rand(2, 3, 32, 48, generator=g)
    kw = dict(output_fmt="NLC", return_prefix_tokens=True)
    with torch.no_grad():
        ref = loaded(x)
        normed, _ = loaded.forward_intermediates(x, [1], norm=True, **kw)
        raw, _ = loaded.forward_intermediates(x, [1], norm=False, **kw)
        early, inter = loaded.forward_intermediates(x, [1], stop_early=True, **kw)
        early_normed, _ = loaded.forward_intermediates(x, [1], stop_early=True, norm=True, **kw)
        tokens, _ = loaded._run_blocks(loaded._embed(x)[0], (2, 3))
    for name in ref:
        torch.testing.assert_close(normed[name].features, ref[name].features, msg=name)
    assert not torch.allclose(raw["backbone"].features, ref["backbone"].features)
    torch.testing.assert_close(raw["backbone"].features, (tokens[:, 10:] - mean) @ tx.T)
    torch.testing.assert_close(raw["backbone"].summary, tokens[:, [0, 1]].flatten(1))
    # stop_early: block 1's tokens are the final output
    torch.testing.assert_close(early["backbone"].features, (inter[0].features - mean) @ tx.T)
    torch.testing.assert_close(early["backbone"].summary, inter[0].summary)
    assert not torch.allclose(early["backbone"].features, raw["backbone"].features)
    n = loaded.norm
    torch.testing.assert_close(early_normed["backbone"].summary, n(inter[0].summary.view(2, 2, -1)).flatten(1))


def test_inputs_above_cpe_max_size_run_on_the_resampled_table():
    model = source_model()  # cpe_max_size 512: a 32 x 32 table
    loaded = RadioModel.from_radio_checkpoint(dict(args=args(), state_dict=training_layout(model)))
    assert loaded.max_resolution == 512
    assert loaded.get_nearest_supported_resolution(3000, 512) == (3008, 512)
    assert loaded.get_nearest_supported_resolution(3, 700) == (16, 704)
    x = torch.rand(1, 3, 64, 576, generator=torch.Generator().manual_seed(2))  # 576 > 512
    added = {}
    hook = loaded.cpe.register_forward_hook(lambda m, inp, out: added.setdefault("pos", out - inp[0]))
    with torch.no_grad():
        out = loaded(x)
    hook.remove()
    assert out["backbone"].features.shape == (1, 4 * 36, 48) and out["sam3"].features.shape == (1, 8 * 72, 6)
    assert all(torch.isfinite(v.features).all() for v in out.values())
    # the official position embedding: the table resized to 36 x 36 (bilinear), top-left 4 x 36
    table = model.cpe.pos_embed.reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(table, size=(36, 36), mode="bilinear", align_corners=False)
    torch.testing.assert_close(added["pos"], want[:, :, :4, :].flatten(2).transpose(1, 2))


def test_vitdet_num_global_from_args_or_argument():
    chk = dict(args=args(), state_dict=training_layout(source_model()))
    load = RadioModel.from_radio_checkpoint
    assert load(chk, window_size=2).config.global_block_indices() == [0, 1, 2, 3]  # 4 global (default)
    two = dict(chk, args=args(vitdet_num_global=2))
    assert load(two, window_size=2).config.global_block_indices() == [1, 3]
    assert load(two, window_size=2, vitdet_num_global=4).config.global_block_indices() == [0, 1, 2, 3]
    assert load(chk, window_size=2, vitdet_num_global=1).config.global_block_indices() == [3]
    windowed = dict(chk, args=args(vitdet_num_windowed=2))  # RADIOv2 style: period num_windowed + 1
    assert load(windowed, window_size=2).config.global_block_indices() == [2, 3]
    with pytest.raises(ValueError, match="vitdet_num_global"):
        load(chk, window_size=2, vitdet_num_global=0)


def test_dtype_argument_and_checkpoint_dtype():
    model = source_model()
    sd = {k: v.half() for k, v in training_layout(model).items()}
    chk = dict(args=args(), state_dict=sd)
    assert RadioModel.from_radio_checkpoint(chk).patch_embed.proj.weight.dtype == torch.float32
    bf16 = RadioModel.from_radio_checkpoint(chk, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.input_norm.mean.dtype == torch.float32  # pixels are normalised in float32
    from_args = RadioModel.from_radio_checkpoint(dict(chk, args=args(dtype=torch.bfloat16)))
    assert from_args.cpe.pos_embed.dtype == torch.bfloat16
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = RadioModel.from_radio_checkpoint(chk)(x), bf16(x)
    for name in want:
        torch.testing.assert_close(got[name].features.float(), want[name].features, atol=0.1, rtol=0.1)
    with pytest.raises(TypeError, match="dtype"):
        RadioModel.from_radio_checkpoint(chk, dtype="bf16")
