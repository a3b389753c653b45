"""Loss kernels, forward + backward: Triton vs the eager PyTorch reference vs torch.compile of it.

    python -m bench.losses                      # GPU: every provider at training sizes
    python -m bench.losses --device cpu --quick # CPU smoke run (PyTorch providers, seconds)

Sizes (GPU): feature maps B = 64 on a 64 x 64 grid with C = 1280, 1536, 4096 (shifted_mse,
mesa_loss), summaries B = 1024 with the same C (angular_loss), bf16. The CPU runs use smaller
shapes in float32 and only the PyTorch providers (the Triton interpreter measures numpy).

Reported per (op, C, provider): median / min ms of one forward + backward, achieved GB/s counting
the inputs read once plus the gradient written once (the least any implementation must move), that
as a percentage of the device's copy bandwidth measured in the same run, and the peak device memory
above the inputs (GPU). Results: ``bench/results/losses_<date>_<device>[_quick].{csv,md}``.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench._common import (
    add_common_args,
    device_slug,
    peak_memory_mb,
    reference_numbers,
    result_stem,
    time_ms,
    write_csv,
    write_markdown,
)
from radio_kernels import angular_loss, mesa_loss, reference, shifted_mse

CHANNELS = {"gpu": (1280, 1536, 4096), "cpu": (1280, 1536), "quick": (256,)}
MAP_SHAPE = {"gpu": (64, 64, 64), "cpu": (4, 32, 32), "quick": (2, 16, 16)}  # (B, H, W)
SUMMARY_ROWS = {"gpu": 1024, "cpu": 256, "quick": 64}
COLUMNS = ["op", "shape", "dtype", "provider", "ms", "ms_min", "GBps", "pct_copy", "peak_MB", "speedup_vs_torch"]


def make_inputs(op: str, size: str, C: int, dtype: torch.dtype, device: str):
    """(differentiable input, other args, bytes that must move) for one benchmark point."""
    g = torch.Generator(device=device).manual_seed(0)
    if op == "angular_loss":
        B = SUMMARY_ROWS[size]
        x = torch.randn(B, C, device=device, dtype=dtype, generator=g).requires_grad_()
        y = torch.randn(B, C, device=device, dtype=dtype, generator=g)
        return x, (y, 0.7), 3 * x.numel() * x.element_size()
    B, H, W = MAP_SHAPE[size]
    s = torch.randn(B, H, W, C, device=device, dtype=dtype, generator=g).requires_grad_()
    t = torch.randn(B, H, W, C, device=device, dtype=dtype, generator=g)
    shift = torch.randint(-1, 2, (B, 2), device=device, generator=g)
    return s, (t, shift), 3 * s.numel() * s.element_size()


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


def bench_point(op, size, C, dtype, device, provider, warmup, repeats, copy_gbps) -> dict:
    x, others, nbytes = make_inputs(op, size, C, dtype, device)
    fn = provider_fn(op, provider)

    def step():
        x.grad = None
        fn(x, *others).backward()

    row = {"op": op, "shape": f"{tuple(x.shape)}", "dtype": str(dtype).replace("torch.", ""), "provider": provider}
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


def main(argv=None) -> list[dict]:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--providers", nargs="+", choices=["triton", "torch", "compile"])
    parser.add_argument("--ops", nargs="+", default=["shifted_mse", "mesa_loss", "angular_loss"])
    a = parser.parse_args(argv)
    on_gpu = torch.device(a.device).type == "cuda"
    size = "quick" if a.quick else "gpu" if on_gpu else "cpu"
    providers = a.providers or (
        ["triton", "torch", "compile"] if on_gpu else ["torch"] if a.quick else ["torch", "compile"]
    )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    warmup, repeats = (3, 20) if on_gpu else (1, 3)

    refs = reference_numbers(a.device, quick=a.quick)
    stem = result_stem(a.out, "losses", a.device, a.quick)
    title = f"Loss kernels, forward + backward ({str(dtype).replace('torch.', '')}, {device_slug(a.device)})"
    notes = [f"device reference, measured in this run: {k} = {v:.4g}" for k, v in refs.items()]
    notes.append("GBps = (inputs read once + gradient written once) / min time; pct_copy = GBps / copy_GBps")
    notes.append("peak_MB = peak device memory above the inputs during one step (GPU only)")

    rows: list[dict] = []
    for op in a.ops:
        for C in CHANNELS[size]:
            for provider in providers:
                rows.append(bench_point(op, size, C, dtype, a.device, provider, warmup, repeats, refs["copy_GBps"]))
                for k, v in refs.items():
                    rows[-1][k] = v
            add_speedups(rows)
            # Rewritten after each point so a run stopped at its time budget keeps its results.
            write_csv(stem + ".csv", rows)
            text = write_markdown(stem + ".md", title, notes, rows, COLUMNS + ["status"])
    print(text)
    print(f"wrote {stem}.csv, {stem}.md")
    return rows


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
