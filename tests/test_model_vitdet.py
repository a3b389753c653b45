"""ViTDet mode: window order, and each prefix mode against an independent per-window reference.

The reference never permutes tokens: it cuts windows out of the (h, w) token grid by slicing, runs
blocks on them with plain global attention (or an explicit spatial mask for "global"), and writes them
back; the model's window-major bookkeeping must reproduce it.
"""

import pytest
import torch

from radio import RadioConfig, RadioModel
from radio.model.vitdet import window_major_permutation


def make_model(seed=0, **overrides) -> RadioModel:
    torch.manual_seed(seed)
    return RadioModel(RadioConfig.preset("tiny", **overrides)).eval()


def images(b, h, w, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_window_major_permutation():
    perm = window_major_permutation(4, 6, 2)
    grid = torch.arange(24).view(4, 6)
    assert perm[:4].tolist() == grid[:2, :2].flatten().tolist()  # window (0, 0)
    assert perm[4:8].tolist() == grid[:2, 2:4].flatten().tolist()  # window (0, 1)
    assert perm[12:16].tolist() == grid[2:, :2].flatten().tolist()  # window (1, 0)
    assert torch.equal(torch.sort(perm).values, torch.arange(24))
    with pytest.raises(ValueError, match="window"):
        window_major_permutation(4, 5, 2)


def masked_block(block, x, mask):
    """A ViT block with attention restricted by a boolean (N, N) mask, written out by hand."""
    attn = block.attn
    B, N, C = x.shape
    y = block.norm1(x)
    q, k, v = attn.qkv(y).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
    o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    x = x + block.ls1(attn.proj(o.transpose(1, 2).reshape(B, N, C)))
    return x + block.ls2(block.mlp(block.norm2(x)))


def spatial_window_mask(P, h, w, ws):
    """Raster order: patch (i, j) sees patches of its own window and the prefix; prefix sees all."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    win = ((rows // ws) * (w // ws) + cols // ws).flatten()
    win = torch.cat([torch.full((P,), -1), win])
    return (win[:, None] == win[None, :]) | (win[:, None] < 0) | (win[None, :] < 0)


def reference_forward(model, x):
    cfg = model.config
    P, ws = cfg.num_prefix_tokens, cfg.window_size
    tokens, (h, w) = model._embed(x, None)
    B, _, D = tokens.shape
    prefix, grid = tokens[:, :P], tokens[:, P:].reshape(B, h, w, D)
    windows = [(r, c) for r in range(0, h, ws) for c in range(0, w, ws)]
    copies = None  # replicate: per-window prefix copies, alive across consecutive windowed blocks
    for i, block in enumerate(model.blocks):
        if not cfg.windowed_blocks()[i]:
            if copies is not None:
                prefix, copies = torch.stack(copies).mean(0), None
            out = block(torch.cat([prefix, grid.reshape(B, h * w, D)], 1))
            prefix, grid = out[:, :P], out[:, P:].reshape(B, h, w, D)
        elif cfg.vitdet_prefix == "global":
            out = masked_block(
                block, torch.cat([prefix, grid.reshape(B, h * w, D)], 1), spatial_window_mask(P, h, w, ws)
            )
            prefix, grid = out[:, :P], out[:, P:].reshape(B, h, w, D)
        else:
            grid = grid.clone()
            if cfg.vitdet_prefix == "replicate" and copies is None:
                copies = [prefix] * len(windows)
            for n, (r, c) in enumerate(windows):
                win = grid[:, r : r + ws, c : c + ws].reshape(B, ws * ws, D)
                if cfg.vitdet_prefix == "skip":
                    win = block(win)
                else:
                    out = block(torch.cat([copies[n], win], 1))
                    copies[n], win = out[:, :P], out[:, P:]
                grid[:, r : r + ws, c : c + ws] = win.reshape(B, ws, ws, D)
    return model.norm(torch.cat([prefix, grid.reshape(B, h * w, D)], 1))


@pytest.mark.parametrize("mode", ["skip", "global", "replicate"])
@pytest.mark.parametrize("global_blocks", [None, [3]])  # tiny default (1, 3); or 0, 1, 2 windowed in a row
def test_windowed_model_matches_the_per_window_reference(mode, global_blocks):
    model = make_model(window_size=2, vitdet_prefix=mode, global_blocks=global_blocks)
    x = images(2, 64, 96)  # 4 x 6 tokens, 6 windows
    with torch.no_grad():
        got, _ = model.forward_features(x)
        ref = reference_forward(model, x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # ... and the windows make a difference.
    glob = make_model(global_blocks=global_blocks)
    with torch.no_grad():
        assert not torch.allclose(glob.forward_features(x)[0], got, atol=1e-3)


@pytest.mark.parametrize("mode", ["global", "replicate"])
def test_a_window_covering_the_whole_grid_equals_the_global_model(mode):
    windowed = make_model(window_size=4, vitdet_prefix=mode)
    global_ = make_model()
    global_.load_state_dict(windowed.state_dict())
    x = images(2, 64, 64)  # 4 x 4 tokens = one window
    with torch.no_grad():
        a, b = windowed(x), global_(x)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.summary, b.summary, atol=1e-5, rtol=1e-5)


def test_skip_leaves_prefix_tokens_untouched_through_windowed_blocks():
    model = make_model(window_size=2, vitdet_prefix="skip", global_blocks=[3])  # blocks 0-2 windowed
    x = images(2, 64, 64)
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=[0, 1, 2, 3], output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    initial = model.prefix_tokens[model.config.summary_idxs].flatten().expand(2, -1)
    for out in inter[:3]:
        assert torch.equal(out.summary, initial)
    assert not torch.allclose(inter[3].summary, initial)  # the global block does update them
    # Windowed blocks see only the patch tokens, with window-sized attention.
    seen = []
    hook = model.blocks[0].attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].shape, kw)), with_kwargs=True
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    assert seen == [((2, 16, 48), dict(num_prefix=0, window_tokens=4, cu_seqlens=None))]


def test_global_prefix_mode_passes_the_prefix_layout_to_the_kernel():
    model = make_model(window_size=2, vitdet_prefix="global")
    seen = []
    hook = model.blocks[0].attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].shape, kw)), with_kwargs=True
    )
    with torch.no_grad():
        model(images(1, 64, 128))
    hook.remove()
    assert seen == [((1, 10 + 32, 48), dict(num_prefix=10, window_tokens=4, cu_seqlens=None))]


def padded_reference(model, x, ws, mode):
    """``model.windowed(ws, mode)`` written out: windowed blocks see the grid zero-padded at the bottom and
    right to a multiple of ws (padding kept across consecutive windowed blocks), global blocks the grid."""
    cfg = model.config.replace(window_size=ws)
    P = cfg.num_prefix_tokens
    tokens, (h, w) = model._embed(x, None)
    B, _, D = tokens.shape
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    prefix, grid = tokens[:, :P], tokens[:, P:].reshape(B, h, w, D)
    windows = [(r, c) for r in range(0, hp, ws) for c in range(0, wp, ws)]
    padded, copies = None, None
    for i, block in enumerate(model.blocks):
        if not cfg.windowed_blocks()[i]:
            if padded is not None:
                grid, padded = padded[:, :h, :w], None
            if copies is not None:
                prefix, copies = torch.stack(copies).mean(0), None
            out = block(torch.cat([prefix, grid.reshape(B, h * w, D)], 1))
            prefix, grid = out[:, :P], out[:, P:].reshape(B, h, w, D)
            continue
        if padded is None:
            padded = grid.new_zeros(B, hp, wp, D)
            padded[:, :h, :w] = grid
        if mode == "global":
            out = masked_block(
                block, torch.cat([prefix, padded.reshape(B, hp * wp, D)], 1), spatial_window_mask(P, hp, wp, ws)
            )
            prefix, padded = out[:, :P], out[:, P:].reshape(B, hp, wp, D)
            continue
        padded = padded.clone()
        if mode == "replicate" and copies is None:
            copies = [prefix] * len(windows)
        for n, (r, c) in enumerate(windows):
            win = padded[:, r : r + ws, c : c + ws].reshape(B, ws * ws, D)
            if mode == "skip":
                win = block(win)
            else:
                out = block(torch.cat([copies[n], win], 1))
                copies[n], win = out[:, :P], out[:, P:]
            padded[:, r : r + ws, c : c + ws] = win.reshape(B, ws, ws, D)
    if padded is not None:
        grid = padded[:, :h, :w]
    if copies is not None:
        prefix = torch.stack(copies).mean(0)
    return model.norm(torch.cat([prefix, grid.reshape(B, h * w, D)], 1))


@pytest.mark.parametrize("mode", ["skip", "global", "replicate"])
@pytest.mark.parametrize("global_blocks", [None, [3]])
def test_windowed_context_pads_a_grid_that_is_not_a_window_multiple(mode, global_blocks):
    model = make_model(global_blocks=global_blocks)  # configured without windows: any multiple of the patch
    x = images(2, 80, 112)  # 5 x 7 tokens: windows of 3 pad it to 6 x 9
    with torch.no_grad(), model.windowed(3, mode):
        got, _ = model.forward_features(x)
        ref = padded_reference(model, x, 3, mode)
        inter = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert inter[0].shape == (2, 5 * 7, 48)
    with torch.no_grad():  # the context restores global attention
        assert not torch.allclose(model.forward_features(x)[0], got, atol=1e-3)
        assert model._window_override is None


@pytest.mark.parametrize("mode", ["skip", "global", "replicate"])
def test_windowed_context_equals_the_configured_windowed_model_on_window_multiples(mode):
    configured = make_model(window_size=2, vitdet_prefix=mode)
    plain = make_model()
    plain.load_state_dict(configured.state_dict())
    x = images(2, 64, 96)
    with torch.no_grad(), plain.windowed(2, mode):
        torch.testing.assert_close(plain(x).features, configured(x).features, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="prefix"), plain.windowed(2, "bogus"):
        pass
    with pytest.raises(ValueError, match="window_size"), plain.windowed(0):
        pass
