"""Fused attention for ViTs: global, ViTDet-windowed, and windowed with global prefix tokens.

Semantics (q, k, v (B, H, N, D); P = num_prefix, T = window_tokens)::

    T == 0 : every query attends to all N keys.
    T  > 0 : tokens [0, P) are prefix tokens (CLS, registers); the rest form (N - P) / T windows
             of T contiguous tokens. A prefix query attends to all N keys; a query in window w
             attends to the P prefix keys and the T keys of window w.
    out    = softmax(q k^T * scale, over visible keys) v,   scale = D ** -0.5 by default

The output is (B, H, N, D) laid out in memory as (B, N, H, D), so that
``out.transpose(1, 2).reshape(B, N, H * D)`` is free.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._checks import check_same_device, check_tensor


def check_attention_args(q, k, v, num_prefix: int, window_tokens: int, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have equal shapes (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    n = q.shape[2]
    if not isinstance(num_prefix, int) or num_prefix < 0 or num_prefix > n:
        raise ValueError(f"num_prefix must be an int in [0, N={n}], got {num_prefix!r}")
    if not isinstance(window_tokens, int) or window_tokens < 0:
        raise ValueError(f"window_tokens must be an int >= 0, got {window_tokens!r}")
    if window_tokens and (n - num_prefix) % window_tokens:
        raise ValueError(
            f"N - num_prefix must be a multiple of window_tokens, got N={n}, num_prefix={num_prefix}, "
            f"window_tokens={window_tokens}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int = 0,
    window_tokens: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention with optional ViTDet windows and global prefix tokens."""
    check_attention_args(q, k, v, num_prefix, window_tokens, scale)
    if resolve_backend(backend, q.device) == "torch":
        return reference.attention(q, k, v, num_prefix=num_prefix, window_tokens=window_tokens, scale=scale)
    raise NotImplementedError("the Triton attention kernel has not landed yet; use backend='torch'")
