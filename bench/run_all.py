"""Run every benchmark in bench/ for one device and print a summary table as the last lines.

    python -m bench.run_all --device cpu                 # `make bench`
    python -m bench.run_all --device cuda                # `make bench-gpu` (after the kernel tests)
    python -m bench.run_all --device cpu --quick         # smoke sizes, about a minute on a CPU
    python -m bench.run_all --device cuda --only train_step

Each benchmark runs in its own process (``python -m bench.<name> --device D --out DIR [--quick]``),
under a wall-clock budget (passed to it as ``--budget-s``, less a margin, so it stops starting new
measurements in time): a hung or slow benchmark is stopped at its budget and reported, the others
still run, and GPU memory is returned between benchmarks. ``--total-s`` bounds the whole run
(``bench/gpu.sh`` passes what its 8 minutes leave after the kernel tests); time one benchmark leaves
unused goes to the later ones.
Each benchmark writes ``<name>_<date>_<device>[_quick].{csv,md[,png]}`` under ``--out`` with the
reference (copy bandwidth, bf16 matmul TFLOP/s) it measured in the same run; this script collects
the files each one wrote, writes ``summary_<date>_<device>[_quick].md`` and prints it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time

from bench.summary import headline

BENCHMARKS = ("losses", "attention", "model", "packed", "train_step")
# Wall-clock cap per benchmark (seconds). With --total-s (gpu.sh), time a benchmark leaves unused
# flows to the later ones, and the last one (train_step, the slowest) gets whatever is left.
BUDGET_S = {
    "cuda": {"losses": 45, "attention": 60, "model": 40, "packed": 35, "train_step": 140},
    # CPU: guards against hangs only
    "cpu": {"losses": 600, "attention": 600, "model": 600, "packed": 600, "train_step": 600},
}
MIN_BUDGET_S = 20  # below this a benchmark is not started (python + torch import, reference alone)
SUMMARY_RESERVE_S = 5  # kept back from --total-s for writing the summary
# Each benchmark stops *starting* new measurements this long before its budget (passed as
# --budget-s), so the one in flight can finish and its files be written before the hard stop.
INNER_MARGIN_S = {
    "cuda": {"losses": 10, "attention": 12, "model": 10, "packed": 10, "train_step": 15},
    "cpu": {"losses": 30, "attention": 30, "model": 30, "packed": 30, "train_step": 60},
}
QUICK_BUDGET_S = 120


def command(name: str, device: str, out: str, quick: bool, budget: float, prewarmed=()) -> list[str]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    cmd = [sys.executable, "-m", f"bench.{name}", "--device", device, "--out", out]
    if quick:
        cmd.append("--quick")
    if name in prewarmed:
        cmd.append("--no-prewarm")
    cmd += ["--budget-s", f"{max(budget - INNER_MARGIN_S[kind][name], 10):.0f}"]
    return cmd


def budget_for(name: str, names: list[str], device: str, quick: bool, deadline: float | None) -> float:
    """Seconds for benchmark ``name`` now: its cap, or with a deadline (``--total-s``) the smaller of
    that and what is left after MIN_BUDGET_S for each later one; the last one gets all that is left."""
    cap = QUICK_BUDGET_S if quick else BUDGET_S[device][name]
    if deadline is None:
        return cap
    later = names[names.index(name) + 1 :]
    left = deadline - time.time() - SUMMARY_RESERVE_S - MIN_BUDGET_S * len(later)
    return left if not later else min(cap, left)


def new_files(out: str, name: str, since: float) -> list[str]:
    """Result files of benchmark ``name`` written in ``out`` at or after ``since`` (sorted)."""
    if not os.path.isdir(out):
        return []
    found = []
    for entry in os.scandir(out):
        if entry.is_file() and entry.name.startswith(name + "_") and entry.stat().st_mtime >= since - 1:
            found.append(entry.path)
    return sorted(found)


def _value(text: str):
    """A CSV cell back as int / float where it parses (what the benchmark wrote), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def run_one(name: str, device: str, out: str, quick: bool, budget: float, prewarmed=()) -> dict:
    """Run one benchmark; return {name, status, seconds, files, headline}."""
    record = {"name": name, "files": [], "headline": ""}
    if importlib.util.find_spec(f"bench.{name}") is None:
        return record | {"status": "absent", "seconds": 0.0}
    print(f"== {name} (budget {budget:.0f} s) ==", flush=True)
    started = time.time()
    # Own process group: at the budget, the benchmark and any workers it started (torch.compile's
    # compiler pool) are stopped together.
    proc = subprocess.Popen(command(name, device, out, quick, budget, prewarmed), start_new_session=True)
    try:
        code = proc.wait(timeout=budget)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"stopped at its {budget:.0f} s budget"
    record |= {"status": status, "seconds": time.time() - started}
    record["files"] = new_files(out, name, started)
    csvs = [f for f in record["files"] if f.endswith(".csv")]
    if csvs:
        try:
            record["headline"] = headline(name, read_csv(csvs[-1]))
        except Exception as err:  # noqa: BLE001 - a headline must never cost the summary table
            record["headline"] = f"(no headline: {type(err).__name__} {err})"
    return record


def summary_table(records: list[dict], device: str, reference: str, notes=()) -> str:
    lines = [f"### Benchmark summary ({device})", "", f"- {reference}", *(f"- {n}" for n in notes), ""]
    lines += ["| benchmark | status | seconds | headline | files |", "|---|---|---|---|---|"]
    for r in records:
        files = ", ".join(os.path.basename(f) for f in r["files"]) or "-"
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['headline'] or '-'} | {files} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    p.add_argument("--note", action="append", default=[], help="a line for the summary (e.g. kernel test result)")
    p.add_argument("--total-s", type=float, help="wall-clock seconds for the whole run, summary included")
    p.add_argument("--prewarmed", nargs="*", default=[], help="benchmarks whose compile caches are warm already")
    a = p.parse_args(argv)
    deadline = time.time() + a.total_s if a.total_s else None

    import torch  # after argument parsing: --help stays fast

    from bench import _common
    from bench.summary import measure_reference

    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device)
    ref = measure_reference(dev, quick=a.quick)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the benchmarks run in their own processes: hold no memory for them
    ref_line = (
        f"Reference measured at the start of this run on {ref['device']}: {ref['matmul_dtype']} matmul "
        f"{ref['matmul_tflops']:.3g} TFLOP/s, device copy {ref['copy_gbps']:.4g} GB/s "
        "(each benchmark measures it again in its own run and reports fractions of it)."
    )
    records = []
    names = list(a.only or BENCHMARKS)
    for name in names:
        budget = budget_for(name, names, a.device, a.quick, deadline)
        if budget < MIN_BUDGET_S:
            records.append(dict(name=name, status="skipped: no time left", seconds=0.0, files=[], headline=""))
            continue
        records.append(run_one(name, a.device, a.out, a.quick, budget, a.prewarmed))
    table = summary_table(records, ref["device"], ref_line, a.note)
    stem = _common.result_stem(a.out, "summary", dev, quick=a.quick)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(f"wrote {stem}.md\n")
    print(table, end="")
    if any(r["status"] not in ("ok", "absent") for r in records):  # stopped / skipped / failed
        sys.exit(1)
    return records


if __name__ == "__main__":
    main()
