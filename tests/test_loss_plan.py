"""Launch plans of the loss kernels: the static bytes model, launch counts seen on real calls, no gradient
without autograd, and the in-place backward scale (interpreter on CPU, compiled on a GPU)."""

import importlib
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from radio_kernels import angular_loss, loss_plan, mesa_loss, shifted_mse

smse_mod = importlib.import_module("radio_kernels.shifted_mse")
mesa_mod = importlib.import_module("radio_kernels.mesa")
angular_mod = importlib.import_module("radio_kernels.angular")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAIN_KERNELS = {
    "shifted_mse": smse_mod._shifted_mse_fwd_kernel,
    "mesa_loss": mesa_mod._mesa_fwd_kernel,
    "angular_loss": angular_mod._angular_fwd_kernel,
}
SHARED_KERNELS = {"finish": smse_mod._loss_finish_kernel, "scale": smse_mod._loss_scale_grad_kernel}
# aten ops that launch no device kernel: allocations and views (metadata only).
NO_KERNEL_OPS = {"empty", "empty_strided", "detach", "alias", "lift_fresh"}


class AtenLog(TorchDispatchMode):
    """Every aten op run under it, with the numel of each tensor it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[object, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((func, [t.numel() for t in flat if isinstance(t, torch.Tensor)]))
        return out

    def launching(self) -> list[str]:
        """Ops that launch a device kernel (on a GPU): everything but allocations and views."""
        names = [(func, func.overloadpacket.__name__) for func, _ in self.ops]
        return [name for func, name in names if name not in NO_KERNEL_OPS and not func.is_view]

    def largest_allocation(self) -> int:
        sizes = [n for func, numels in self.ops if func.overloadpacket.__name__.startswith("empty") for n in numels]
        return max(sizes, default=0)


class TritonLog:
    """Counts launches of the loss kernels (and their launch options), with the aten log paused inside
    them: the interpreter copies arguments with aten ops of its own, which a GPU launch does not."""

    def __init__(self):
        self.launches: list[tuple[str, dict]] = []
        self._stack = ExitStack()

    def __enter__(self):
        kernels = [("main", kernel) for kernel in MAIN_KERNELS.values()] + list(SHARED_KERNELS.items())
        for name, kernel in kernels:
            self._stack.enter_context(mock.patch.object(kernel, "run", self._wrap(name, kernel.run)))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _wrap(self, name, run):
        def counted(*args, **kwargs):
            self.launches.append((name, kwargs))
            with _disable_current_modes():
                return run(*args, **kwargs)

        return counted

    def names(self) -> list[str]:
        return [name for name, _ in self.launches]


def problem(op: str, shape, dtype=torch.float32, seed=0):
    """(loss callable of the differentiable input, that input, n_rows, C) for a small problem of ``op``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    y = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    if op == "angular_loss":
        fn = lambda x: angular_loss(x, y, 0.7, backend="triton")  # noqa: E731
    elif op == "mesa_loss":
        shift = torch.tensor([[1, 0]] * shape[0], device=DEVICE)
        fn = lambda x: mesa_loss(x, y, shift, backend="triton")  # noqa: E731
    else:
        shift = torch.tensor([[0, -1]] * shape[0], device=DEVICE)
        fn = lambda x: shifted_mse(x, y, shift, backend="triton")  # noqa: E731
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return fn, x, n_rows, shape[-1]


MAP = (2, 3, 5, 40)
SUMMARY = (7, 40)
SHAPES = {"shifted_mse": MAP, "mesa_loss": MAP, "angular_loss": SUMMARY}


# ----------------------------------------------------------------------------------------
# the static model
# ----------------------------------------------------------------------------------------
def test_plan_rows_cover_the_paper_problems():
    rows = loss_plan.loss_plan_rows()
    assert [(r["op"], r["problem"]) for r in rows] == [
        ("shifted_mse", "(16x64x64x1280) bf16 shift=0"),
        ("shifted_mse", "(16x64x64x1536) bf16 shift=0"),
        ("shifted_mse", "(16x64x64x4096) bf16 shift=0"),
        ("mesa_loss", "(16x64x64x1280) bf16 shift=0"),
        ("angular_loss", "(1024x1152) bf16"),
        ("angular_loss", "(1024x1536) bf16"),
        ("angular_loss", "(1024x4096) bf16"),
    ]
    for r in rows:
        assert {"op", "problem", "bytes_min", "bytes_planned", "launches", "grad_stored"} <= set(r)
        n = 16 * 64 * 64 * int(r["problem"].split("x")[-1].split(")")[0]) if r["op"] != "angular_loss" else None
        if n is not None:
            assert r["bytes_min"] == 3 * 2 * n  # s, t read + gradient written, bf16
        # every paper size takes a one-read plan: the forward moves at most 5% over the minimum
        assert r["passes"] == 1 and r["bytes_min"] < r["bytes_planned"] <= 1.05 * r["bytes_min"], r
        # the backward scale reads and rewrites the stored bf16 gradient: 2/3 of the minimum
        assert r["bytes_backward"] == 2 * r["bytes_min"] // 3 + 8  # + grad_output and 1 / N
        assert r["launches"] == 3 and r["grad_stored"] is True
    mesa = rows[3]
    # the paper's MESA rows: one warp owns one 1280-channel row (held in a 2048-wide register tile)
    assert (mesa["block_r"], mesa["block_c"], mesa["num_warps"], mesa["resident"]) == (1, 2048, 1, True)


def test_chunked_fallback_counts_its_rereads():
    one = loss_plan.traffic("mesa_loss", 1024, 4096, 2, 2, 2)
    wide = loss_plan.traffic("mesa_loss", 1024, 8192, 2, 2, 2)
    assert loss_plan.mesa_plan(8192).passes == 3 and not loss_plan.mesa_plan(8192).resident
    assert one["bytes_planned"] / one["bytes_min"] < 1.01
    # three sweeps over s and t (L2-or-HBM) plus one gradient write: (3 * 2 + 1) / 3 of the minimum
    assert wide["bytes_planned"] / wide["bytes_min"] == pytest.approx(7 / 3, rel=1e-3)
    assert loss_plan.traffic("mesa_loss", 1024, 8192, 2, 2, 2, grad_stored=False)["launches"] == 2


@pytest.mark.parametrize("op", loss_plan.OPS)
def test_plans_own_whole_rows_per_warp(op):
    for C in (1, 16, 100, 1280, 1536, 2048, 3000, 4096, 5000):
        plan = loss_plan.PLANS[op](C)
        if op != "shifted_mse":
            assert plan.resident == (C <= loss_plan.MAX_RESIDENT_C) and plan.passes == (1 if plan.resident else 3)
        if plan.resident:
            assert plan.block_c >= C and plan.block_c & (plan.block_c - 1) == 0
            # one warp per program holds whole rows, or one row is split over the program's warps
            assert plan.num_warps == 1 or plan.block_r == 1
    assert loss_plan.mesa_plan(1280).num_warps == 1 and loss_plan.mesa_plan(2048).num_warps == 1


# ----------------------------------------------------------------------------------------
# launches of real calls
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", loss_plan.OPS)
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("empty", [False, True])
def test_launches_match_the_plan(op, grad, empty, one_thread):
    shape = SHAPES[op]
    if empty:
        if op == "angular_loss":
            pytest.skip("angular_loss needs B >= 1")
        shape = (shape[0], 0, *shape[2:])
    fn, x, n_rows, C = problem(op, shape)
    x.requires_grad_(grad)
    aten = AtenLog()
    with TritonLog() as triton_log:
        with aten:
            loss = fn(x)
            if grad:
                torch.autograd.grad(loss, x, torch.tensor(0.5, device=DEVICE))
    assert aten.launching() == [], "no PyTorch kernel around the loss kernels"
    plan = loss_plan.PLANS[op](C)
    expected = list(loss_plan.forward_launches(plan, n_rows) + loss_plan.backward_launches(n_rows * C, grad))
    assert triton_log.names() == expected
    # main (unless the map is empty) + finish, + the backward scale when a non-empty gradient is stored
    assert len(expected) == loss_plan.count_launches(op, n_rows, C, grad) == (1 if empty else 2 + grad)
    for name, kwargs in triton_log.launches:
        if name == "main":
            assert (kwargs["BLOCK_R"], kwargs["BLOCK_C"], kwargs["num_warps"]) == (
                plan.block_r,
                plan.block_c,
                plan.num_warps,
            )
            assert kwargs["STORE_GRAD"] is grad


@pytest.mark.parametrize("op", loss_plan.OPS)
def test_no_gradient_is_stored_without_autograd(op, one_thread):
    fn, x, _, _ = problem(op, SHAPES[op])
    with_grad = fn(x.detach().requires_grad_()).detach()
    module = {"shifted_mse": smse_mod, "mesa_loss": mesa_mod, "angular_loss": angular_mod}[op]
    refuse = mock.patch.object(module, "new_grad_buffer", side_effect=AssertionError("gradient buffer allocated"))
    for name, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode), ("leaf", ExitStack)):
        aten = AtenLog()
        with TritonLog(), refuse, ctx(), aten:
            loss = fn(x.detach().requires_grad_(name != "leaf"))
        assert not loss.requires_grad
        assert aten.largest_allocation() < x.numel(), (name, aten.ops)
        assert torch.equal(loss, with_grad) if DEVICE == "cpu" else torch.allclose(loss, with_grad, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", loss_plan.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_scales_the_stored_gradient_in_place(op, dtype, one_thread):
    fn, x, _, _ = problem(op, SHAPES[op], dtype)
    x.requires_grad_()
    module = {"shifted_mse": smse_mod, "mesa_loss": mesa_mod, "angular_loss": angular_mod}[op]
    buffers, allocate = [], smse_mod.new_grad_buffer

    def record(*args, **kwargs):
        buffer = allocate(*args, **kwargs)
        buffers.append((buffer.data_ptr(), buffer.dtype))  # no reference: autograd may take the tensor over
        return buffer

    aten = AtenLog()
    with TritonLog(), mock.patch.object(module, "new_grad_buffer", record), aten:
        (fn(x) * 0.25).backward()
    ((buffer_ptr, buffer_dtype),) = buffers
    # every tensor of the input's size that an op (not a view) produced, forward and backward together
    full = [n for func, numels in aten.ops if not func.is_view for n in numels if n >= x.numel()]
    if dtype == torch.float16:  # the summed gradient is kept in fp32; backward writes the fp16 one
        assert buffer_dtype == torch.float32 and len(full) == 2 and x.grad.dtype == torch.float16
    else:  # one full-size tensor: the stored buffer, scaled in place, becomes x.grad itself
        assert len(full) == 1 and x.grad.data_ptr() == buffer_ptr
    ref = x.detach().float().requires_grad_()
    (0.25 * fn(ref)).backward()
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("op", loss_plan.OPS)
def test_retained_graph_keeps_the_stored_gradient(op, one_thread):
    fn, x, _, _ = problem(op, SHAPES[op])
    x.requires_grad_()
    loss = fn(x)
    (g1,) = torch.autograd.grad(loss, x, torch.tensor(2.0, device=DEVICE), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(-1.0, device=DEVICE))
    assert g1.data_ptr() != g2.data_ptr()
    assert torch.equal(g1, -2 * g2) and g1.abs().max() > 0  # scaling by a power of two is exact


@pytest.mark.parametrize("op", loss_plan.OPS)
def test_double_backward_raises(op, one_thread):
    """Double backward through a kernel's stored gradient would be silently wrong: it raises instead."""
    fn, x, _, _ = problem(op, SHAPES[op])
    x.requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
