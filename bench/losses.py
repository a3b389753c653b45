"""Loss kernels, forward + backward: Triton vs the eager PyTorch reference vs torch.compile of it.

    python -m bench.losses                      # GPU: every provider at training sizes
    python -m bench.losses --device cpu --quick # CPU smoke run (PyTorch providers, seconds)

Sizes (GPU): exactly the paper problems of ``radio_kernels.loss_plan.paper_problems()``, the ones its
static bytes model describes: ViT-H/16 student maps B = 16 on a 64 x 64 grid (1024 px) against
teachers of C = 1280, 1536, 4096 (shifted_mse), MESA at C = 1280, summaries B = 1024 with
C = 1152, 1536, 4096 (angular_loss); bf16, zero shift (full overlap, as in the model). The CPU runs
use smaller shapes in float32 and only the PyTorch providers (the Triton interpreter measures numpy).

Reported per (op, shape, provider): median / min ms of one forward + backward, achieved GB/s counting
the inputs read once plus the gradient written once (the least any implementation must move: the
model's ``bytes_min``), that as a percentage of the device's copy bandwidth measured in the same run,
the peak device memory above the inputs (GPU), and from the model the Triton plan's kernel launches
and bytes moved (forward + backward) relative to ``bytes_min``. Results:
``bench/results/losses_<date>_<device>[_quick].{csv,md,png}`` (PNG: GB/s against C).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench import _common
from bench._common import (
    add_common_args,
    allow_recompiles,
    device_slug,
    peak_memory_mb,
    reference_numbers,
    result_stem,
    time_ms,
    write_csv,
    write_markdown,
)
from radio_kernels import angular_loss, loss_plan, mesa_loss, reference, shifted_mse
from radio_kernels.shifted_mse import grad_dtype

OPS = loss_plan.OPS
# Smaller stand-ins off the GPU: (B, H, W) maps and B summaries, channels shared by all ops.
CPU_SIZES = {"cpu": ((4, 32, 32), 256, (1280, 1536)), "quick": ((2, 16, 16), 64, (256,))}
COLUMNS = ["op", "shape", "dtype", "provider", "ms", "ms_min", "GBps", "pct_copy", "peak_MB", "speedup_vs_torch"]
COLUMNS += ["launches", "model_bytes_x_min"]


def problems(size: str, ops=OPS) -> list[tuple[str, tuple[int, ...]]]:
    """(op, shape of the differentiable input) to time: (B, H, W, C) maps or (B, C) summaries."""
    if size == "gpu":
        return [(op, shape) for op, shape in loss_plan.paper_problems() if op in ops]
    maps, rows, channels = CPU_SIZES[size]
    return [(op, (rows, C) if op == "angular_loss" else (*maps, C)) for op in ops for C in channels]


def model_columns(op: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """The Triton plan's launches (forward + backward) and bytes (same) over the least that must move."""
    size = torch.empty((), dtype=dtype).element_size()
    n_rows = math.prod(shape[:-1])
    model = loss_plan.traffic(
        op, n_rows, shape[-1], size, size, torch.empty((), dtype=grad_dtype(dtype)).element_size()
    )
    moved = model["bytes_planned"] + model["bytes_backward"]
    return {"launches": model["launches"], "model_bytes_x_min": moved / model["bytes_min"]}


def make_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: str):
    """(differentiable input, other args, bytes that must move) for one benchmark point."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()
    y = torch.randn(*shape, device=device, dtype=dtype, generator=g)
    # inputs read once + gradient written once (loss_plan's bytes_min)
    nbytes = 3 * x.numel() * x.element_size()
    if op == "angular_loss":
        return x, (y, 0.7), nbytes
    shift = torch.zeros(shape[0], 2, dtype=torch.int64, device=device)  # full overlap, as in the model
    return x, (y, shift), nbytes


def provider_fn(op: str, provider: str):
    """The loss callable ``fn(x, *others)`` for a provider."""
    if provider in ("triton", "torch"):
        public = {"shifted_mse": shifted_mse, "mesa_loss": mesa_loss, "angular_loss": angular_loss}[op]
        return lambda x, *others: public(x, *others, backend=provider)
    ref = {
        "shifted_mse": reference.shifted_mse,
        "mesa_loss": lambda s, t, shift: reference.mesa_loss(s, t, shift),
        "angular_loss": reference.angular_loss,
    }[op]
    return torch.compile(ref, dynamic=False)  # provider == "compile"


def bench_point(op, shape, dtype, device, provider, warmup, repeats, copy_gbps) -> dict:
    x, others, nbytes = make_inputs(op, shape, dtype, device)
    fn = provider_fn(op, provider)

    def step():
        x.grad = None
        fn(x, *others).backward()

    row = {"op": op, "shape": f"{tuple(x.shape)}", "dtype": str(dtype).replace("torch.", ""), "provider": provider}
    if provider == "triton":
        row.update(model_columns(op, shape, dtype))
    try:
        row.update(time_ms(step, device, warmup=warmup, repeats=repeats))
        row["peak_MB"] = peak_memory_mb(step, device)
    except Exception as err:  # one failing provider must not lose the rest of the table
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        return row
    row["GBps"] = nbytes / (row["ms_min"] * 1e-3) / 1e9
    row["pct_copy"] = 100 * row["GBps"] / copy_gbps
    row["status"] = "ok"
    return row


def add_speedups(rows: list[dict]) -> None:
    for r in rows:
        base = next(
            (b for b in rows if b["op"] == r["op"] and b["shape"] == r["shape"] and b["provider"] == "torch"), None
        )
        if base and "ms_min" in base and "ms_min" in r:
            r["speedup_vs_torch"] = base["ms_min"] / r["ms_min"]


# The compile provider pays a torch.compile (seconds each, per op and shape): measured after the
# Triton and eager rows of every op, so a time budget cuts it rather than the comparison itself.
SLOW_PROVIDERS = ("compile",)
POINT_MARGIN_S = 5.0  # do not start a point with less than this left (one point takes ~1 s warm)


def _warm(item: tuple) -> None:
    """Prewarm worker (own process): run each provider's step once for one (op, shape) point."""
    op, shape, dtype_name, providers, device = item
    allow_recompiles()
    for provider in providers:
        x, others, _ = make_inputs(op, shape, getattr(torch, dtype_name), device)
        provider_fn(op, provider)(x, *others).backward()
    _common.synchronize(device)


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Achieved GB/s against channels, one line per (op, provider)."""
    series: dict[str, list] = {}
    for r in rows:
        if r.get("status") == "ok":
            C = int(r["shape"].strip("()").split(",")[-1])
            series.setdefault(f"{r['op']} {r['provider']}", []).append((C, r["GBps"]))
    return _common.plot_xy(path, series, "channels C", "achieved GB/s (fwd + bwd, min time)", title)


def main(argv=None) -> list[dict]:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--providers", nargs="+", choices=["triton", "torch", "compile"])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--budget-s", type=float, help="stop starting new points after this many seconds")
    a = parser.parse_args(argv)
    started = time.time()
    on_gpu = torch.device(a.device).type == "cuda"
    size = "quick" if a.quick else "gpu" if on_gpu else "cpu"
    providers = a.providers or (
        ["triton", "torch", "compile"] if on_gpu else ["torch"] if a.quick else ["torch", "compile"]
    )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    warmup, repeats = (3, 20) if on_gpu else (1, 3)
    deadline = started + (a.budget_s if a.budget_s is not None else math.inf)
    allow_recompiles()

    refs = reference_numbers(a.device, quick=a.quick)
    stem = result_stem(a.out, "losses", a.device, a.quick)
    title = f"Loss kernels, forward + backward ({str(dtype).replace('torch.', '')}, {device_slug(a.device)})"
    notes = [f"device reference, measured in this run: {k} = {v:.4g}" for k, v in refs.items()]
    notes.append("GBps = (inputs read once + gradient written once) / min time; pct_copy = GBps / copy_GBps")
    notes.append("peak_MB = peak device memory above the inputs during one step (GPU only)")
    notes.append(
        "launches, model_bytes_x_min: the Triton plan's kernel launches and bytes (forward + backward) / GBps bytes"
    )
    points = problems(size, a.ops)
    compiled = [p for p in providers if p in ("triton", "compile")]
    if on_gpu and compiled:
        items = [(op, shape, str(dtype).replace("torch.", ""), compiled, a.device) for op, shape in points]
        left = deadline - time.time()
        notes.append(_common.prewarm(_warm, items, timeout_s=min(60.0, 0.6 * left), max_parallel=9))
        print(notes[-1], flush=True)

    rows = {(op, shape, p): None for op, shape in points for p in providers}
    text = ""
    for phase in ([p for p in providers if p not in SLOW_PROVIDERS], [p for p in providers if p in SLOW_PROVIDERS]):
        for op, shape in points:
            for provider in phase:
                if deadline - time.time() < POINT_MARGIN_S:
                    row = {
                        "op": op,
                        "shape": str(shape),
                        "dtype": str(dtype).replace("torch.", ""),
                        "provider": provider,
                    }
                    row["status"] = "skipped: time budget"
                else:
                    row = bench_point(op, shape, dtype, a.device, provider, warmup, repeats, refs["copy_GBps"])
                row.update(refs)
                rows[op, shape, provider] = row
                done = [r for r in rows.values() if r is not None]
                add_speedups(done)
                # Rewritten after each point so a run stopped at its time budget keeps its results.
                write_csv(stem + ".csv", done)
                text = write_markdown(stem + ".md", title, notes, done, COLUMNS + ["status"])
    done = [r for r in rows.values() if r is not None]
    why_not = plot(done, stem + ".png", title)
    if why_not:
        print(why_not)
    print(text)
    print(f"wrote {stem}.csv, {stem}.md" + ("" if why_not else f", {stem}.png"))
    return done


def headline(rows: list[dict]) -> str:
    """For bench.run_all's summary: per op at its largest C, each provider's ms and % of copy."""
    parts = []
    for op in dict.fromkeys(r["op"] for r in rows):
        here = [r for r in rows if r["op"] == op and r.get("status") == "ok"]
        if not here:
            continue
        shape = here[-1]["shape"]
        bits = [
            f"{r['provider']} {float(r['ms_min']):.3g} ms ({float(r['pct_copy']):.0f}% copy)"
            for r in here
            if r["shape"] == shape and not math.isnan(float(r["ms_min"]))
        ]
        parts.append(f"{op} {shape}: " + ", ".join(bits))
    return " / ".join(parts)


if __name__ == "__main__":
    main()
