"""pytest-benchmark microbenchmarks of the kernels (forward + backward), Triton vs the torch backend.

    pytest bench/ --benchmark-only                      # on a CUDA machine
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Without a CUDA GPU every test is skipped ("needs a CUDA GPU"): the Triton interpreter on a CPU
measures numpy, not the kernels. Plain ``pytest`` never collects this folder (testpaths = tests).
Shapes are those of a vit-b/so400m step at 512 px, batch 16: 32 x 32 feature grids, teacher widths
1024..1536, head dims 64 and 72. Each test stores its byte / FLOP count in ``extra_info`` with the
achieved GB/s or TFLOP/s, so ``--benchmark-json`` output can be set against the device's reference.
"""

from __future__ import annotations

import pytest
import torch

from radio_kernels import angular_loss, attention, mesa_loss, shifted_mse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ("triton", "torch")
B, GRID = 16, 32  # batch, feature grid side (512 px / patch 16)


def _run(benchmark, fn, *, bytes_moved: float = 0.0, flops: float = 0.0):
    """Time ``fn`` (launch + synchronise) with pytest-benchmark; record achieved GB/s or TFLOP/s."""

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=30, warmup_rounds=5, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a plain test, nothing was timed
        return
    median = benchmark.stats.stats.median
    if bytes_moved:
        benchmark.extra_info.update(bytes=bytes_moved, gbps=bytes_moved / median / 1e9)
    if flops:
        benchmark.extra_info.update(flops=flops, tflops=flops / median / 1e12)


def _loss_step(loss_fn, x, *args, backend):
    def fn():
        x.grad = None
        loss_fn(x, *args, backend=backend).backward()

    return fn


def _shift(batch: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(-2, 3, (batch, 2), generator=g).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1024, 1536])
def test_shifted_mse(benchmark, backend, channels):
    """bf16 student features against fp32 PHI-S targets (the trainer's dtypes)."""
    benchmark.group = f"shifted_mse C={channels}"
    x = torch.randn(B, GRID, GRID, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(B, GRID, GRID, channels, device="cuda")
    # One read of x and y, one write of grad x (the minimum any implementation must move).
    moved = x.numel() * (2 + 4 + 2)
    _run(benchmark, _loss_step(shifted_mse, x, y, _shift(B, "cuda"), backend=backend), bytes_moved=moved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [768, 1152])
def test_mesa_loss(benchmark, backend, channels):
    benchmark.group = f"mesa_loss C={channels}"
    x = torch.randn(B, GRID, GRID, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ema = torch.randn(B, GRID, GRID, channels, device="cuda", dtype=torch.bfloat16)
    moved = x.numel() * (2 + 2 + 2)
    _run(benchmark, _loss_step(mesa_loss, x, ema, _shift(B, "cuda"), backend=backend), bytes_moved=moved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_angular_loss(benchmark, backend):
    benchmark.group = "angular_loss 1024 x 1536"
    x = torch.randn(1024, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(1024, 1536, device="cuda")
    moved = x.numel() * (2 + 4 + 2)
    _run(benchmark, _loss_step(angular_loss, x, y, 0.5, backend=backend), bytes_moved=moved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("head_dim", "window"),
    [(64, 0), (72, 0), (64, 16), (72, 16)],
    ids=["d64-global", "d72-global", "d64-window16", "d72-window16"],
)
def test_attention(benchmark, backend, head_dim, window):
    """Forward + backward, 10 prefix tokens, 64 x 64 grid (1024 px); windows of 16 x 16 tokens."""
    benchmark.group = f"attention D={head_dim} {'global' if not window else f'window {window}'}"
    heads, batch, prefix, n_patch = 16, 2, 10, 64 * 64
    t = window * window  # window-major order: 16 windows of 256 tokens follow the prefix
    shape = (batch, heads, prefix + n_patch, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def fn():
        for tensor in (q, k, v):
            tensor.grad = None
        out = attention(q, k, v, num_prefix=prefix, window_tokens=t, backend=backend)
        out.backward(do)

    # FLOPs (KERNELS.md convention): forward 4 * B * H * Nq * Nk_visible * D, backward 2.5x forward.
    if window:  # patch queries see their window plus the prefix; prefix queries see everything
        visible = batch * heads * (n_patch * (t + prefix) + prefix * (prefix + n_patch))
    else:
        visible = batch * heads * (prefix + n_patch) ** 2
    _run(benchmark, fn, flops=3.5 * 4 * visible * head_dim)
