"""radio_kernels.nn: timm-compatible Attention module and the swap helper."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from radio_kernels import reference
from radio_kernels.nn import Attention, swap_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
# float32: the interpreter is exact, a GPU runs the kernel's dots in TF32.
TOL = dict(rtol=5e-3, atol=5e-3) if DEVICE == "cuda" else dict(rtol=1e-4, atol=1e-5)


def timm_attention(**kwargs) -> TimmAttention:
    torch.manual_seed(0)
    attn = TimmAttention(**kwargs).to(DEVICE).eval()
    for p in attn.parameters():  # non-trivial norms / biases
        nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.05)
        if p.dim() == 1 and p.shape[0] == attn.head_dim:
            p.data += 1
    return attn


CONFIGS = [
    dict(dim=64, num_heads=2),
    dict(dim=96, num_heads=4, qkv_bias=True),
    dict(dim=64, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm),
    dict(dim=64, num_heads=4, attn_head_dim=20, dim_out=48, scale_norm=True, norm_layer=nn.LayerNorm, gated=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_timm_attention_on_the_same_weights(cfg, backend):
    ref = timm_attention(**cfg)
    ours = Attention(**cfg, backend=backend).to(DEVICE).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, cfg["dim"], device=DEVICE)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    # and from_timm copies rather than shares
    copied = Attention.from_timm(ref, backend=backend)
    torch.testing.assert_close(copied(x), ref(x), **TOL)
    assert copied.qkv.weight.data_ptr() != ref.qkv.weight.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_windowed_forward_uses_prefix_and_windows(backend):
    attn = Attention(dim=32, num_heads=2, qkv_bias=True, backend=backend).to(DEVICE).eval()
    P, T, B = 3, 16, 2
    x = torch.randn(B, P + 3 * T, 32, device=DEVICE)
    got = attn(x, num_prefix=P, window_tokens=T)
    q, k, v = attn.qkv(x).reshape(B, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
    mixed = reference.attention_dense(q, k, v, P, T, 16**-0.5).transpose(1, 2).reshape(B, -1, 32)
    torch.testing.assert_close(got, attn.proj(mixed), **TOL)
    assert not torch.allclose(got, attn(x))  # the windows did change something


def test_gradients_flow_to_every_parameter():
    attn = Attention(dim=32, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm, backend="triton").to(DEVICE)
    x = torch.randn(1, 21, 32, device=DEVICE, requires_grad=True)
    attn(x, num_prefix=1, window_tokens=10).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_keeps_vit_output(backend):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
        num_heads=3, reg_tokens=2, qkv_bias=True, num_classes=5,
    ).to(DEVICE).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        before = vit(x)
        keys = list(vit.state_dict())
        swap_attention(vit, backend=backend)
        after = vit(x)
    assert all(isinstance(b.attn, Attention) for b in vit.blocks)
    assert list(vit.state_dict()) == keys
    torch.testing.assert_close(after, before, **TOL)
    swap_attention(vit, backend="torch")  # idempotent: only the backend changes
    assert all(b.attn.backend == "torch" for b in vit.blocks)


def test_bad_use_raises():
    attn = Attention(dim=32, num_heads=2).to(DEVICE)
    x = torch.randn(1, 5, 32, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(5, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="divisible"):
        Attention(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(dim=32, qk_norm=True)
    with pytest.raises(ValueError, match="backend"):
        Attention(dim=32, backend="flash")
    with pytest.raises(NotImplementedError, match="dropout"):
        Attention(dim=32, num_heads=2, attn_drop=0.1).train()(x)
    with pytest.raises(TypeError, match="blocks"):
        swap_attention(nn.Linear(2, 2))
