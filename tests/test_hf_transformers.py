"""Parity with transformers' own RADIO port (``transformers.RadioModel``), both ways.

The installed transformers is an independent implementation: tiny random models are built on its side,
saved with its ``save_pretrained`` and loaded with ours, and ours are exported and loaded with its
``from_pretrained``. Outputs must agree to float32 round-off; ours -> transformers -> ours is exact.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from radio.model import AdaptorSpec, RadioConfig, RadioModel
from radio.model.hf_transformers import EXTRAS_FILE, is_transformers_folder

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "RadioModel"):
    pytest.skip("this transformers has no RadioModel", allow_module_level=True)

ATOL = 2e-5  # float32 round-off over a 2-3 block model with O(1) activations


def _hf_model(seed: int, **overrides) -> transformers.RadioModel:
    """A tiny transformers RadioModel with every weight random (not just its init)."""
    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_img_size=128, patch_size=16, mlp_ratio=2.0
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.RadioModel(transformers.RadioConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # LayerScale 1 stays 1 (the identity C-RADIO uses) unless a test asks for another value.
            if "lambda1" not in name or kwargs.get("layerscale_value", 1.0) != 1.0:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _assert_close(hf_out, ours_out, atol=ATOL):
    torch.testing.assert_close(ours_out.summary, hf_out.summary, atol=atol, rtol=1e-4)
    torch.testing.assert_close(ours_out.features, hf_out.features, atol=atol, rtol=1e-4)


def _assert_same_model(a: RadioModel, b: RadioModel):
    assert a.config == b.config and a.adaptor_specs == b.adaptor_specs
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# (transformers config overrides, input sizes (H, W)); the table is 128 px = 8 x 8 patches.
HF_CASES = [
    (dict(num_cls_tokens=3, num_registers=7, summary_idxs=[0, 1]), [(128, 128), (32, 96)]),
    (dict(num_cls_tokens=2, num_registers=0, summary_idxs=[1]), [(64, 48), (16, 128)]),
    (dict(num_cls_tokens=4, num_registers=2, summary_idxs=[3, 0, 2], layerscale_value=0.3), [(96, 64)]),
    (
        dict(num_cls_tokens=1, num_registers=3, summary_idxs=[0], use_swiglu_ffn=True, qkv_bias=False, mlp_ratio=3.0),
        [(80, 128)],
    ),
    (dict(num_hidden_layers=3, norm_mean=[0.5, 0.4, 0.3], norm_std=[0.2, 0.25, 0.3]), [(112, 32)]),
]


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_transformers_checkpoint_loads_with_equal_outputs(tmp_path, case):
    overrides, sizes = HF_CASES[case]
    hf = _hf_model(case, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    assert is_transformers_folder(tmp_path / "hf")
    ours = RadioModel.from_pretrained(tmp_path / "hf")
    assert not ours.training and ours.config.final_norm is False
    assert ours.config.summary_idxs == hf.config.summary_idxs
    assert ours.config.num_prefix_tokens == hf.config.num_cls_tokens + hf.config.num_registers
    assert ours.config.ffn == ("swiglu" if overrides.get("use_swiglu_ffn") else "mlp")
    assert (ours.config.layer_scale is None) == ("layerscale_value" not in overrides)
    torch.manual_seed(100 + case)
    for h, w in sizes:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            _assert_close(hf(pixel_values=x), ours(x))


def test_sharded_and_module_layout_folders_load(tmp_path):
    hf = _hf_model(7, num_cls_tokens=2, num_registers=1)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # The module layout (RadioModel.state_dict() names, separate q/k/v) under a wrapper's "model." prefix.
    (tmp_path / "module").mkdir()
    hf.config.to_json_file(tmp_path / "module" / "config.json")
    state = {f"model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "module" / "model.safetensors"))
    x = torch.rand(1, 3, 64, 112)
    with torch.no_grad():
        expected = hf(pixel_values=x)
        for folder in ("sharded", "module"):
            _assert_close(expected, RadioModel.from_pretrained(tmp_path / folder)(x))


@pytest.mark.parametrize(
    "config",
    [
        RadioConfig.preset("tiny", final_norm=False),  # C-RADIOv4 prefix: 3 CLS + 7 registers, summary [0, 1]
        RadioConfig(embed_dim=24, depth=2, num_heads=3, mlp_dim=40, num_cls_tokens=2, num_registers=0,
                    summary_idxs=[1], cpe_max_size=96, final_norm=False, layer_scale=0.5, qkv_bias=False),
        RadioConfig(embed_dim=32, depth=2, num_heads=2, mlp_dim=48, num_cls_tokens=1, num_registers=4,
                    summary_idxs=[0], cpe_max_size=64, patch_size=8, final_norm=False, ffn="swiglu"),
    ],
)  # fmt: skip
def test_export_loads_in_transformers_with_equal_outputs(tmp_path, config):
    torch.manual_seed(3)
    ours = RadioModel(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours.save_pretrained(tmp_path / "out", format="transformers")
    hf = transformers.RadioModel.from_pretrained(tmp_path / "out").eval()
    assert hf.config.num_registers == config.num_registers and hf.config.summary_idxs == config.summary_idxs
    step, top = config.patch_size, config.cpe_max_size
    for h, w in [(top, top), (step, 3 * step), (top - 2 * step, top // 2)]:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            _assert_close(hf(pixel_values=x), ours(x))
    _assert_same_model(ours, RadioModel.from_pretrained(tmp_path / "out"))


def test_round_trip_keeps_heads_norms_and_training_fields(tmp_path):
    """What transformers has no place for (teacher heads, final norm, feature normaliser) rides in the side file."""
    config = RadioConfig.preset("tiny", pos_dropout=0.3, feature_normalizer=True, intermediate_normalizer="shared")
    specs = [AdaptorSpec("siglip2", 16, 24), AdaptorSpec("sam3", None, 8, head="attn", upsample_factor=2)]
    torch.manual_seed(5)
    ours = RadioModel(config, specs).eval()
    with torch.no_grad():
        for p in ours.buffers():
            p.add_(torch.randn_like(p) * 0.1)
    with pytest.warns(UserWarning, match="final LayerNorm or feature normaliser"):
        ours.save_pretrained(tmp_path / "out", format="transformers")
    assert (tmp_path / "out" / EXTRAS_FILE).is_file()
    back = RadioModel.from_pretrained(tmp_path / "out")
    _assert_same_model(ours, back)
    x = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        a, b = ours(x), back(x)
    for name in ("backbone", "siglip2", "sam3"):
        assert torch.equal(a[name].features, b[name].features)
    # transformers' model reads the same backbone: its last hidden state is ours before the two norms.
    hf = transformers.RadioModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        tokens = hf(pixel_values=x).last_hidden_state
        expected, _ = ours.forward_features(x)
    torch.testing.assert_close(ours._final_norm(tokens), expected, atol=ATOL, rtol=1e-4)


def test_export_rejects_what_transformers_cannot_run(tmp_path):
    model = RadioModel(RadioConfig.preset("tiny", window_size=2))
    with pytest.raises(ValueError, match="ViTDet windows"):
        model.save_pretrained(tmp_path / "w", format="transformers")
    with pytest.raises(ValueError, match="format must be"):
        model.save_pretrained(tmp_path / "w", format="onnx")


def test_bad_transformers_folders_raise_clear_errors(tmp_path):
    hf = _hf_model(1)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "act").mkdir()
    (tmp_path / "act" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    (tmp_path / "act" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="hidden_act"):
        RadioModel.from_pretrained(tmp_path / "act")
    (tmp_path / "nowts").mkdir()
    (tmp_path / "nowts" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="neither model.safetensors"):
        RadioModel.from_pretrained(tmp_path / "nowts")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "config.json").write_text(json.dumps({**cfg, "summary_idxs": [1, 0]}))
    (tmp_path / "idx" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="summary_idxs"):
        RadioModel.from_pretrained(tmp_path / "idx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not is_transformers_folder(tmp_path / "missing")


def test_cli_exports_a_run_for_transformers(tmp_path, capsys):
    from radio.cli import main
    from radio.normalize import load_normalizers

    fast = ["--no-progress", "--steps", "1", "--set", "data.batch_size=2", "--set", "data.num_workers=0",
            "--set", "data.low_resolutions=[32]", "--set", "data.high_resolutions=[64]",
            "--set", "fidelity.resolution=32", "--set", "fidelity.crops_per_image=1"]  # fmt: skip
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--out", str(run), *fast]) == 0
    with pytest.warns(UserWarning, match="final LayerNorm"):  # the tiny student trains with a final norm
        assert main(["export", "--run", str(run), "--out", str(out), "--format", "transformers"]) == 0
    assert "transformers format" in capsys.readouterr().out
    hf = transformers.RadioModel.from_pretrained(out).eval()
    ours = RadioModel.from_pretrained(out)
    assert [s.name for s in ours.adaptor_specs] == ["siglip2", "dinov3", "sam3"]
    assert set(load_normalizers(out)) == {"siglip2", "dinov3", "sam3"}
    x = torch.rand(1, 3, 48, 32)
    with torch.no_grad():
        tokens, _ = ours.forward_features(x)
        torch.testing.assert_close(ours._final_norm(hf(pixel_values=x).last_hidden_state), tokens, atol=ATOL, rtol=0)
