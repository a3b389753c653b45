"""Fused attention for ViTs: global, ViTDet-windowed, and windowed with global prefix tokens.

Semantics (q, k, v (B, H, N, D); P = num_prefix, T = window_tokens)::

    T == 0 : every query attends to all N keys.
    T  > 0 : tokens [0, P) are prefix tokens (CLS, registers); the rest form (N - P) / T windows
             of T contiguous tokens. A prefix query attends to all N keys; a query in window w
             attends to the P prefix keys and the T keys of window w.
    out    = softmax(q k^T * scale, over visible keys) v,   scale = D ** -0.5 by default

Packed variable-length mode (``cu_seqlens``, (S + 1,) boundaries of S sequences concatenated along
N): a token attends to the tokens of its own sequence [cu[s], cu[s+1]) only (block-diagonal), as if
each sequence ran alone; P and T must be 0 (each sequence's prefix tokens are part of it). See
``_varlen_attention``.

The output is (B, H, N, D) laid out in memory as (B, N, H, D), so that
``out.transpose(1, 2).reshape(B, N, H * D)`` is free.

Backends: ``"torch"`` runs ``reference.attention`` (SDPA, per-window copies for the prefix case);
``"triton"`` runs the fused flash-style kernels of ``_attention_kernels`` (forward and a
deterministic backward, head dim <= 128; launch plan: ``_attention_plan``). On GPUs they ship for
sm_90 (H100 / H200), sm_80 (A100) and sm_86 / sm_89 / sm_120 (RTX 30xx / 40xx / 50xx, A10, L4, L40)
in float16 / bfloat16 / float32, where their tiles are audited (see ``_attention_configs.SHIPPED_ARCHS``);
the interpreter runs them on CPU in any float dtype. ``"auto"`` takes Triton on CUDA and falls back to
the reference for what the kernels do not cover (float64, head dim > 128, sm_100 and other GPUs whose
tiles are not re-audited for v2).
"""

from __future__ import annotations

import math

import torch
import triton
from torch.autograd.function import once_differentiable

from . import _attention_configs as configs
from . import _attention_plan as plan
from . import reference
from ._attention_kernels import (
    LOG2E,
    attn_bwd_delta_kernel,
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_window_kernel,
    attn_fwd_kernel,
    attn_fwd_prefix_combine_kernel,
    attn_fwd_window_kernel,
)
from ._backend import device_guard, interpreter_enabled, resolve_backend
from ._checks import check_same_device, check_tensor

MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_args(q, k, v, num_prefix: int, window_tokens: int, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have equal shapes (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v, allow_meta=True)
    if q.shape[-1] == 0:
        raise ValueError(f"q, k and v need a head dim D >= 1, got shape {tuple(q.shape)}")
    n = q.shape[2]
    # bool is an int subclass: True would silently mean one token per window.
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int):
        raise TypeError(f"num_prefix must be an int, got {type(num_prefix).__name__} {num_prefix!r}")
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int):
        raise TypeError(f"window_tokens must be an int, got {type(window_tokens).__name__} {window_tokens!r}")
    if num_prefix < 0 or num_prefix > n:
        raise ValueError(f"num_prefix must be an int in [0, N={n}], got {num_prefix!r}")
    if window_tokens < 0:
        raise ValueError(f"window_tokens must be an int >= 0, got {window_tokens!r}")
    if window_tokens and (n - num_prefix) % window_tokens:
        raise ValueError(
            f"N - num_prefix must be a multiple of window_tokens, got N={n}, num_prefix={num_prefix}, "
            f"window_tokens={window_tokens}"
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf
    ):
        raise ValueError(f"scale must be a finite positive float or None, got {scale!r}")


def triton_supports(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    """None when the kernels handle q's (and ``tensors``') dtype, head dim and layout, else the reason."""
    tensors = (q, *tensors)
    if q.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D={q.shape[-1]}"
    if q.shape[2] * max(abs(t.stride(2)) for t in tensors) >= 2**31:
        # Row offsets (token index x token stride) are int32 inside the kernels; batch and head
        # offsets are int64. Only sequence-major layouts of huge tensors get here.
        return "the Triton kernels need N * (token stride) < 2**31; pass q, k, v in (B, N, H, D) storage"
    if q.is_cuda and not interpreter_enabled():  # the interpreter runs its own table on any device
        dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(q.dtype, "fp32")
        if reason := configs.unshipped_reason(*configs._capability(q.device.index), dtype_name):
            return reason
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        # B * H runs on the launch grid's second axis, which CUDA caps at 65535.
        return f"the Triton kernels take B * H up to {MAX_GRID_Y}, got {q.shape[0]} * {q.shape[1]}"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int = 0,
    window_tokens: int = 0,
    scale: float | None = None,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention with optional ViTDet windows and global prefix tokens, or packed sequences.

    Args:
        q, k, v: (B, H, N, D) of one dtype and device. Any strides; unit stride in D avoids a copy
            (the three views of a packed qkv projection work as they are).
        num_prefix: P, number of leading prefix tokens (CLS, registers).
        window_tokens: T, tokens per window (0 = global attention); N - P must be a multiple of T.
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "triton" or "torch" (see the module docstring).
        cu_seqlens: packed mode, (S + 1,) integer boundaries (0, ..., N) of S sequences concatenated
            along N; each attends to itself only. Needs num_prefix = window_tokens = 0.

    Returns:
        (B, H, N, D) in q's dtype, stored as (B, N, H, D).
    """
    check_attention_args(q, k, v, num_prefix, window_tokens, scale)
    if cu_seqlens is not None:
        if num_prefix or window_tokens:
            raise ValueError(f"cu_seqlens needs num_prefix=0 and window_tokens=0, got {num_prefix} and {window_tokens}")
        from ._varlen_attention import varlen_attention

        return varlen_attention(q, k, v, cu_seqlens, scale, backend, triton_supports)
    chosen = resolve_backend(backend, q.device)
    unsupported = triton_supports(q, k, v) if chosen == "triton" else None
    if unsupported and backend == "triton":
        raise ValueError(f"{unsupported}; use backend='torch'")
    if chosen == "torch" or unsupported:
        return reference.attention(q, k, v, num_prefix=num_prefix, window_tokens=window_tokens, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with device_guard(q.device):
        return _FusedAttention.apply(q, k, v, num_prefix, window_tokens, scale)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_prefix, window_tokens, scale):
        q, k, v = (_unit_d(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, num_prefix, window_tokens, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (num_prefix, window_tokens, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(_unit_d(grad_out), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def _unit_d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write (tests swap this for a NaN-filled one to catch gaps)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bnhd_empty_like(q: torch.Tensor) -> torch.Tensor:
    """Empty (B, H, N, D) tensor stored as (B, N, H, D)."""
    B, H, N, D = q.shape
    return _empty((B, N, H, D), q.dtype, q.device).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _stride_unit(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing every (B, H, N) stride of every tensor.

    Strides are passed to the kernels divided by it and multiplied back by a constexpr, so the
    compiler knows row starts are aligned (16-byte vector loads and cp.async even for D = 72,
    whose head stride 72 is not a multiple of 16, the only divisibility Triton detects itself).
    """
    g = 16
    for t in tensors:
        for s in _strides(t):
            g = math.gcd(g, s)
    return g


def _scaled(strides: tuple[int, int, int], unit: int) -> tuple[int, int, int]:
    return tuple(s // unit for s in strides)


def _grid(rows: int, block: int, bh: int) -> tuple[int, int]:
    return (triton.cdiv(rows, block), bh)


def _segment_args(launch: plan.Launch) -> tuple[int, int, int, int]:
    return launch.row_base, launch.seg_len, launch.seg_offset, launch.tiles_per_seg


def _max_regs(value: int | None) -> dict:
    return {} if value is None else {"maxnreg": value}


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether K / V rows suit tensor descriptors (16-byte aligned bases and (B, H, N) strides), and, on
    a GPU, Triton has an allocator for the descriptors' workspace (one backed by torch is installed in
    this thread's context when none is set; with an unknown Triton the pointer path runs)."""
    for t in tensors:
        if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in _strides(t)):
            return False
    if interpreter_enabled() or not tensors[0].is_cuda:
        return True
    try:
        from triton.runtime import _allocation
    except ImportError:
        return False
    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None:
        return False
    if isinstance(current.get(), null):
        device = tensors[0].device
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    return True


def attention_forward(q, k, v, num_prefix: int, window_tokens: int, scale: float):
    """Run the forward plan; returns (out (B, H, N, D) stored (B, N, H, D), lse2 (B*H, N) fp32)."""
    B, H, N, D = q.shape
    out = _bnhd_empty_like(q)
    lse = _empty((B * H, N), torch.float32, q.device)
    unit = _stride_unit(q, k, v, out)
    strides = [x for t in (q, k, v, out) for x in _scaled(_strides(t), unit)]
    table = configs.active_table()
    launches = plan.forward_plan(N, num_prefix, window_tokens, D, q.element_size(), table)
    common = dict(**plan.chunk_constexprs(D), BLOCK_S=plan.SMALL, STRIDE_UNIT=unit)
    use_tma = configs.uses_tma(table, q.element_size()) and _tma_ready(k, v)
    n_part = sum(launch.n_part for launch in launches)
    # The prefix queries' partial softmax states, one per group of windows (fp32): acc (B*H, n_part, P, D),
    # (m, l) (B*H, n_part, 2, P).
    part_acc = _empty((B * H, n_part, num_prefix, D) if n_part else (1,), torch.float32, q.device)
    part_ml = _empty((B * H, n_part, 2, num_prefix) if n_part else (1,), torch.float32, q.device)
    for launch in launches:
        tile = launch.tile
        options = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
        if launch.kernel == "combine":
            attn_fwd_prefix_combine_kernel[(launch.programs, B * H)](
                q, k, v, out, lse, part_acc, part_ml, *strides, H, N, num_prefix, n_part, scale * LOG2E,
                BLOCK_N=tile.block_n, **options, **common,
            )  # fmt: skip
            continue
        options |= _max_regs(configs.fwd_max_regs(table, D, q.element_size(), tile, use_tma))
        if launch.kernel == "fwd_window":
            attn_fwd_window_kernel[(launch.programs, B * H)](
                q, k, v, out, lse, part_acc, part_ml, *strides, H, N, num_prefix, window_tokens,
                launch.tiles_per_seg, launch.tail_tiles, launch.windows_per_part, launch.n_part, scale * LOG2E,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, USE_TMA=use_tma, **options, **common,
            )  # fmt: skip
        else:
            attn_fwd_kernel[(launch.programs, B * H)](
                q, k, v, out, lse, *strides, H, N, scale * LOG2E,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, USE_TMA=use_tma, **options, **common,
            )  # fmt: skip
    return out, lse


def backward_setup(do, q, k, v, out, lse):
    """What every backward launch plan shares: delta = rowsum(dO * O) (one kernel), the gradient
    buffers (dq, dk, dv) stored (B, N, H, D), the strides of (q, k, v, do, dq) in the kernels' unit,
    and the constexprs (HEAD_D, BLOCK_D, STRIDE_UNIT)."""
    B, H, N, D = q.shape
    bd = configs.block_d_of(D)
    delta = _empty(tuple(lse.shape), torch.float32, lse.device)
    tile = configs.pick_tile("delta", D, q.element_size())
    unit = _stride_unit(out, do)
    attn_bwd_delta_kernel[_grid(N, tile.block_m, B * H)](
        out, do, delta, *_scaled(_strides(out), unit), *_scaled(_strides(do), unit), H, N,
        HEAD_D=D, BLOCK_D=bd, BLOCK_M=tile.block_m, STRIDE_UNIT=unit, num_warps=tile.num_warps,
    )  # fmt: skip
    dq, dk, dv = _bnhd_empty_like(q), _bnhd_empty_like(q), _bnhd_empty_like(q)
    unit = _stride_unit(q, k, v, do, dq)
    strides = [x for t in (q, k, v, do, dq) for x in _scaled(_strides(t), unit)]
    return delta, (dq, dk, dv), strides, dict(HEAD_D=D, BLOCK_D=bd, STRIDE_UNIT=unit)


def attention_backward(do, q, k, v, out, lse, num_prefix: int, window_tokens: int, scale: float):
    """Gradients (dq, dk, dv), each (B, H, N, D) stored (B, N, H, D); deterministic (no atomics)."""
    B, H, N, D = q.shape
    delta, (dq, dk, dv), strides, common = backward_setup(do, q, k, v, out, lse)
    common = dict(**plan.chunk_constexprs(D), BLOCK_S=plan.SMALL, STRIDE_UNIT=common["STRIDE_UNIT"])
    launches = plan.backward_plan(N, num_prefix, window_tokens, D, q.element_size(), configs.active_table())
    # dQ of the windows' queries, summed over their key tiles in fp32 by the program owning the window.
    windowed = any(launch.kernel == "window" for launch in launches)
    dq_acc = _empty((B * H, N, D), torch.float32, q.device) if windowed else None
    for launch in launches:
        tile = launch.tile
        if launch.kernel == "window":
            attn_bwd_window_kernel[(launch.n_seg, B * H)](
                q, k, v, do, dq, dk, dv, lse, delta, dq_acc, *strides, H, N, num_prefix, window_tokens,
                scale * LOG2E, scale,
                BLOCK_M=tile.block_n, BLOCK_N=tile.block_m, num_warps=tile.num_warps,
                num_stages=tile.num_stages, **common,
            )  # fmt: skip
        elif launch.kernel == "dkdv":
            # Rows are keys (the kernel's BLOCK_N), the inner loop walks queries (BLOCK_M).
            attn_bwd_dkdv_kernel[(launch.programs, B * H)](
                q, k, v, do, dk, dv, lse, delta, *strides, H, N, num_prefix, *_segment_args(launch),
                scale * LOG2E, scale, WINDOWED=launch.windowed, BLOCK_M=tile.block_n, BLOCK_N=tile.block_m,
                num_warps=tile.num_warps, num_stages=tile.num_stages, **common,
            )  # fmt: skip
        else:
            attn_bwd_dq_kernel[(launch.programs, B * H)](
                q, k, v, do, dq, lse, delta, *strides, H, N, num_prefix, *_segment_args(launch),
                scale * LOG2E, scale, WINDOWED=launch.windowed, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                num_warps=tile.num_warps, num_stages=tile.num_stages, **common,
            )  # fmt: skip
    return dq, dk, dv
