"""Helpers shared by the benchmarks: device naming, result files, timing, reference measurements.

A benchmark module ``bench/<name>.py`` is run as ``python -m bench.<name> --device D --out DIR
[--quick]`` (see ``bench.run_all``) and writes ``<name>_<date>_<device>[_quick].{csv,md}`` under
``--out``. Every result table carries the device's own reference numbers measured in the same run
(device-to-device copy bandwidth, bf16 matmul throughput), so "achieved GB/s" can be read as a
fraction of what the machine actually does, not of a datasheet.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import statistics
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


# ----------------------------------------------------------------------------------------
# naming and files
# ----------------------------------------------------------------------------------------
def device_slug(device: torch.device | str) -> str:
    """'nvidia-h200' for a GPU, 'cpu<cores>' for the CPU: safe in file names."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_stem(out_dir: str, name: str, device: torch.device | str, quick: bool = False) -> str:
    """``out_dir/<name>_<YYYY-MM-DD>_<device>[_quick]`` (add .csv / .md)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = dt.date.today().isoformat()
    return os.path.join(out_dir, f"{name}_{stamp}_{device_slug(device)}{'_quick' if quick else ''}")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for the CSV and markdown results")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds, not minutes")
    return parser


def write_csv(path: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (+ suffix); "n/a" for None and NaN (a point not measured)."""
    return "n/a" if value is None or value != value else f"{value:{spec}}{suffix}"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: str, title: str, notes: list[str], rows: list[dict], columns: list[str] | None = None):
    text = f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes) + "\n" + markdown_table(rows, columns) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


# ----------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 10) -> dict:
    """Median / min milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times)}


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak device memory above what was allocated before ``fn()`` ran (MB); None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------------------
# the machine's own reference numbers
# ----------------------------------------------------------------------------------------
def copy_bandwidth_gbps(device: torch.device | str, mbytes: int = 1024) -> float:
    """Device copy bandwidth: (read + write bytes) / time of ``dst.copy_(src)``."""
    device = torch.device(device)
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=10)["ms_min"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense n x n x n matmul throughput in TFLOP/s."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_ms(lambda: a @ b, device, warmup=2, repeats=10)["ms_min"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def reference_numbers(device: torch.device | str, quick: bool = False) -> dict:
    """{'copy_GBps', 'bf16_matmul_TFLOPs'} measured now (smaller problems on the CPU / quick)."""
    on_gpu = torch.device(device).type == "cuda"
    mbytes = 1024 if on_gpu and not quick else 64
    n = 8192 if on_gpu and not quick else 512
    dtype = torch.bfloat16 if on_gpu else torch.float32  # CPU bf16 matmul is not representative
    return {
        "copy_GBps": copy_bandwidth_gbps(device, mbytes),
        f"{'bf16' if on_gpu else 'fp32'}_matmul_TFLOPs": matmul_tflops(device, n, dtype),
    }


# ----------------------------------------------------------------------------------------
# GPU run hygiene: compile caches warmed in parallel, enough recompiles, plots that cannot fail
# ----------------------------------------------------------------------------------------
def allow_recompiles(limit: int = 64) -> None:
    """Let torch.compile keep one compiled graph per benchmark shape.

    Dynamo's default ``recompile_limit`` (alias ``cache_size_limit``) is 8 per code object; a sweep
    of static shapes (and bf16 / fp32 entry variants) passes that, after which dynamo silently runs
    the function *eagerly*, so a "compiled" row would time eager code.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def prewarm(target: Callable, items: list, timeout_s: float, max_parallel: int = 8) -> str:
    """Run ``target(item)`` for every item in spawned processes, up to ``max_parallel`` at once, and
    return a one-line report. Stragglers are killed at ``timeout_s``; failures are only reported.

    Why: Triton (and inductor) compile in the launching thread, one kernel after another: 40 attention
    kernel variants take minutes serially. Compiling each shape in its own process fills the on-disk
    caches (Triton's ``~/.triton/cache``, inductor's FX graph cache) in parallel, and the timed
    process then loads the binaries. Compile specialisations depend on dtypes, constexprs and the
    divisibility of integer arguments, so ``target`` runs the real shapes.
    """
    import multiprocessing as mp

    if not items:
        return "prewarm: nothing to compile"
    ctx = mp.get_context("spawn")  # a forked child cannot use CUDA once the parent has
    started = time.time()
    deadline = started + timeout_s
    pending, running, failed, killed = list(items), [], 0, 0
    try:
        while pending or running:
            while pending and len(running) < max_parallel:
                proc = ctx.Process(target=target, args=(pending.pop(0),), daemon=True)
                proc.start()
                running.append(proc)
            for proc in list(running):
                proc.join(timeout=0.2)
                if proc.exitcode is not None:
                    running.remove(proc)
                    failed += proc.exitcode != 0
            if time.time() > deadline:
                killed = len(running) + len(pending)
                break
    finally:  # also on SIGTERM turned SystemExit: no orphan compiling on the GPU
        for proc in running:
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    done = len(items) - failed - killed
    return (
        f"prewarm: {done}/{len(items)} shapes compiled in parallel in {time.time() - started:.0f} s"
        + (f", {failed} failed" if failed else "")
        + (f", {killed} stopped at {timeout_s:.0f} s" if killed else "")
        + (" (compile caches warm: first-step / first-call times are not cold-compile times)" if done else "")
    )


def plot_xy(path: str, series: dict, xlabel: str, ylabel: str, title: str, logx=False, logy=False) -> str | None:
    """Line plot of ``series`` {label: [(x, y), ...]} to ``path`` (PNG). Returns None on success, else
    why no plot was written: a plot must never cost a benchmark its CSV and markdown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in series.items():
            pts = sorted((x, y) for x, y in pts if y == y and y is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log" if logx else "linear")
        ax.set_yscale("log" if logy else "linear")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None
    except Exception as err:  # noqa: BLE001 - see docstring
        return f"no plot: {type(err).__name__}: {err}"
