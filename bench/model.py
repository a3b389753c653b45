"""Student-model inference latency against resolution: global attention vs ViTDet windows.

For one preset (default ViT-B) and batch 1, times ``RadioModel.forward`` at square resolutions for
global attention and for window sizes 8 and 16 (official "skip" prefix semantics, default schedule of
4 global blocks), on every requested attention backend. Global attention costs O(N^2) in the token
count N = (res / 16)^2, windowed blocks O(N * w^2), so windowed latency grows far slower.

    python -m bench.model --device cpu            # CPU, PyTorch backend, 256..1024 px (~2-3 min)
    python -m bench.model --device cpu --quick    # smoke run: 256 px only, a few seconds
    python -m bench.model --device cuda           # GPU: 256..2048 px, bf16, backends torch + triton

Writes ``bench/results/model_<date>_<device>.{csv,md,png}``. The table and plot show the best of the
timed runs: wall time on a GPU; on a CPU the process CPU time of a single-threaded run (``--threads 1``
by default), which other jobs on a shared machine barely disturb. The CSV holds wall median/min and
CPU min.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import re
import statistics
import sys
import time

import torch

from radio import RadioConfig, RadioModel

MODES = {"global": None, "window 8": 8, "window 16": 16}
CPU_RESOLUTIONS = (256, 512, 768, 1024)
CPU_QUICK_RESOLUTIONS = (256,)
GPU_RESOLUTIONS = (256, 512, 768, 1024, 1536, 2048)
SKIPPED: list[int] = []  # resolutions the last run() left out at its deadline


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu{os.cpu_count()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(model: RadioModel, x: torch.Tensor) -> tuple[float, float]:
    """(wall ms, process CPU ms) for one forward pass (inference mode; bf16 autocast when x is bf16)."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        _sync(x.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        model(x)
        _sync(x.device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3


def run(
    device: str,
    preset: str,
    resolutions,
    backends,
    warmup: int,
    repeats: int,
    dtype: torch.dtype,
    on_progress=None,
    deadline: float = math.inf,
):
    """One result dict per (backend, mode, resolution); ``on_progress(rows)`` after each resolution.
    Resolutions not started by ``deadline`` (time.time()) are left out and named in ``SKIPPED``.

    Passes are interleaved (for each resolution and round: every backend and mode once), so a load
    spike on a shared machine hits all variants alike instead of one whole curve.
    """
    dev = torch.device(device)
    models = {}
    for mode, window in MODES.items():
        torch.manual_seed(0)  # the same weights in every variant
        models[mode] = RadioModel(RadioConfig.preset(preset, window_size=window)).eval().to(dev)
    variants = [(b, m) for b in backends for m in MODES]
    rows = []
    SKIPPED.clear()
    for k, res in enumerate(resolutions):
        if time.time() > deadline:
            SKIPPED.extend(resolutions[k:])
            print(f"  time budget: {list(SKIPPED)} px not measured", file=sys.stderr)
            break
        x = torch.rand(1, 3, res, res, device=dev).to(dtype)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {v: [] for v in variants}
        # One extra untimed round at the first size pays one-off costs (allocator, kernel autotuning).
        for round_ in range(warmup + repeats + (k == 0)):
            for backend, mode in variants:
                models[mode].set_attention_backend(backend)
                sample = time_once(models[mode], x)
                if round_ >= warmup + (k == 0):
                    times[backend, mode].append(sample)
        for (backend, mode), ts in times.items():
            row = dict(
                preset=preset,
                device=device,
                backend=backend,
                mode=mode,
                resolution=res,
                tokens=(res // models[mode].patch_size) ** 2,
                dtype=str(dtype).replace("torch.", ""),
                ms_median=statistics.median(t[0] for t in ts) if ts else float("nan"),
                ms_min=min(t[0] for t in ts) if ts else float("nan"),
                cpu_ms_min=min(t[1] for t in ts) if ts else float("nan"),
                repeats=len(ts),
            )
            print(
                f"  {backend:6s} {mode:9s} {res:5d}px  wall {row['ms_min']:9.1f} ms  cpu {row['cpu_ms_min']:9.1f} ms",
                file=sys.stderr,
            )
            rows.append(row)
        if on_progress is not None:
            on_progress(rows)
    return rows


def markdown_table(rows: list[dict], title: str, metric: str = "ms_min") -> str:
    columns = [(b, m) for b in dict.fromkeys(r["backend"] for r in rows) for m in MODES]
    by_key = {(r["backend"], r["mode"], r["resolution"]): r[metric] for r in rows}
    resolutions = sorted({r["resolution"] for r in rows})
    header = ["resolution", "tokens"] + [f"{b} {m} (ms)" for b, m in columns]
    title += f" - best of {max(r['repeats'] for r in rows)} runs"
    header += [f"{b} global / window 8" for b in dict.fromkeys(c[0] for c in columns)]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in resolutions:
        cells = [f"{res}", f"{(res // 16) ** 2}"]
        cells += [_fmt(by_key.get((b, m, res))) for b, m in columns]
        for b in dict.fromkeys(c[0] for c in columns):
            g, w = by_key.get((b, "global", res)), by_key.get((b, "window 8", res))
            cells.append(f"{g / w:.2f}x" if g == g and w == w and g and w else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(ms) -> str:
    return "n/a" if ms is None or ms != ms else f"{ms:.1f}"


def plot(rows: list[dict], path: str, title: str, metric: str = "ms_min") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for mode in MODES:
            pts = [
                (r["resolution"], r[metric])
                for r in rows
                if r["backend"] == backend and r["mode"] == mode and r[metric] == r[metric]
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{backend}, {mode}")
    ax.set_xlabel("input resolution (px, square)")
    ax.set_ylabel("CPU time per image (ms, best run)" if metric == "cpu_ms_min" else "latency per image (ms, best run)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="vit-b", choices=RadioConfig.preset_names())
    p.add_argument("--resolutions", type=int, nargs="+", help="square sides, multiples of 256")
    p.add_argument("--backends", nargs="+", choices=["torch", "triton"])
    p.add_argument("--quick", action="store_true", help="smallest sizes only: a smoke run in seconds")
    p.add_argument("--warmup", type=int, help="untimed passes per point (default: cuda 2, cpu 0)")
    p.add_argument("--repeats", type=int, help="timed passes per point (default: cuda 5, cpu 2)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default on cpu: 1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--budget-s", type=float, help="start no new resolution after this many seconds")
    a = p.parse_args(argv)
    deadline = time.time() + (a.budget_s if a.budget_s is not None else math.inf)

    cuda = a.device.startswith("cuda")
    if a.resolutions:
        bad = [r for r in a.resolutions if r % 256 or r <= 0]
        if bad:
            p.error(f"--resolutions must be positive multiples of 256 (window 16 x patch 16), got {bad}")
    resolutions = a.resolutions or (
        GPU_RESOLUTIONS[:2]
        if cuda and a.quick
        else GPU_RESOLUTIONS
        if cuda
        else CPU_QUICK_RESOLUTIONS
        if a.quick
        else CPU_RESOLUTIONS
    )
    backends = a.backends or (["torch", "triton"] if cuda else ["torch"])
    warmup = a.warmup if a.warmup is not None else (2 if cuda else 0)
    repeats = a.repeats if a.repeats is not None else (5 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.threads is not None or not cuda:
        torch.set_num_threads(a.threads or 1)

    os.makedirs(a.out, exist_ok=True)
    slug = device_slug(torch.device(a.device))
    stem = os.path.join(a.out, f"model_{dt.date.today().isoformat()}_{slug}{'_quick' if a.quick else ''}")
    # On a CPU the process CPU time of a single-threaded run is the latency a quiet machine would show;
    # wall time on a machine shared with other jobs mostly measures their load.
    metric = "ms_min" if cuda else "cpu_ms_min"
    what = "latency" if cuda else f"CPU time ({torch.get_num_threads()} thread(s))"
    title = f"RadioModel {a.preset} forward {what}, batch 1, {str(dtype).replace('torch.', '')}, {slug}"

    notes = []
    if cuda and "triton" in backends:
        from bench import _common

        items = [(a.preset, window, resolutions[0], "bfloat16", a.device) for window in MODES.values()]
        notes.append(_common.prewarm(_warm, items, timeout_s=min(30.0, 0.4 * (deadline - time.time()))))
        print(notes[-1], flush=True)

    def write(rows: list[dict]) -> None:
        # Rewritten after every resolution, so a run stopped at its time budget keeps what it measured.
        if not rows:
            return
        with open(stem + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        extra = notes + ([f"not measured (time budget): {SKIPPED} px"] if SKIPPED else [])
        with open(stem + ".md", "w") as f:
            f.write(markdown_table(rows, title, metric) + "".join(f"\n- {n}" for n in extra) + ("\n" if extra else ""))
        try:
            plot(rows, stem + ".png", title, metric)
        except Exception as err:  # noqa: BLE001 - a plot must never cost the CSV and the table
            print(f"no plot: {type(err).__name__}: {err}", file=sys.stderr)

    rows = run(a.device, a.preset, resolutions, backends, warmup, repeats, dtype, on_progress=write, deadline=deadline)
    write(rows)
    if not rows:
        print("no resolution measured within the time budget")
        return rows
    print(markdown_table(rows, title, metric))
    print(f"wrote {stem}.csv, .md, .png")
    return rows


def _warm(item: tuple) -> None:
    """Prewarm worker (own process): one triton-backend bf16 forward of (preset, window, resolution).

    The attention kernels specialise on head dim, window and the divisibility of N, not on the
    resolution here (N = (res/16)^2 + prefix has the same residue mod 16 for every multiple of 256),
    so the smallest resolution compiles what every resolution uses."""
    preset, window, res, dtype_name, device = item
    model = RadioModel(RadioConfig.preset(preset, window_size=window)).eval().to(device)
    model.set_attention_backend("triton")
    time_once(model, torch.rand(1, 3, res, res, device=device).to(getattr(torch, dtype_name)))


def headline(rows: list[dict]) -> str:
    """For bench.run_all's summary: at the largest resolution, each variant's time and global/window 8."""
    res = max(int(r["resolution"]) for r in rows)
    on_cpu = rows[0]["device"].startswith("cpu")
    key = "cpu_ms_min" if on_cpu else "ms_min"
    here = {(r["backend"], r["mode"]): float(r[key]) for r in rows if int(r["resolution"]) == res}
    bits = [f"{b} {m} {ms:.0f} ms" for (b, m), ms in here.items() if ms == ms]
    for b in dict.fromkeys(b for b, _ in here):
        g, w = here.get((b, "global"), math.nan), here.get((b, "window 8"), math.nan)
        if g == g and w == w:
            bits.append(f"{b} global/window8 {g / w:.2f}x")
    what = "CPU time, 1 thread" if on_cpu else "latency"
    return f"{rows[0]['preset']} at {res}px ({what}): " + ", ".join(bits)


if __name__ == "__main__":
    main()
