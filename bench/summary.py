"""One-line headlines of each benchmark's CSV rows, for the summary table of ``bench.run_all``, and
the device reference (``bench._common.reference_numbers``) in the form the summary and the
training-step benchmark print.

A benchmark module may define ``headline(rows) -> str`` itself (rows as read back from its CSV,
values as strings); otherwise the function registered here for its name is used, and a benchmark
with neither gets a row count.
"""

from __future__ import annotations

import importlib
import math


def measure_reference(device, quick: bool = False) -> dict:
    """{device, copy_gbps, matmul_tflops, matmul_dtype}: measured now on ``device`` (bf16 matmul on a
    GPU, fp32 on a CPU, where bf16 matmul is not representative)."""
    from bench import _common

    ref = _common.reference_numbers(device, quick=quick)
    key = next(k for k in ref if k.endswith("_matmul_TFLOPs"))
    return {
        "device": _common.device_slug(device),
        "copy_gbps": ref["copy_GBps"],
        "matmul_tflops": ref[key],
        "matmul_dtype": key.split("_")[0],
    }


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# Issue 7's target for the triton backend's training step on an H100/H200, against backend "torch".
TARGET_SPEEDUP, TARGET_MEMORY = 1.5, 0.7


def train_step(rows: list[dict]) -> str:
    """Per point: triton's images/s and peak memory relative to the torch backend (and compile's)."""
    parts = []
    points = dict.fromkeys((r["preset"], r["resolution"]) for r in rows)
    for preset, res in points:
        here = {r["provider"]: r for r in rows if (r["preset"], r["resolution"]) == (preset, res)}
        bits = []
        for provider, r in here.items():
            if str(r.get("status", "")).startswith("failed"):
                bits.append(f"{provider} {r['status'][:60]}")
                continue
            if provider == "torch" or r.get("status") != "ok":
                continue
            speed, mem = _num(r.get("speedup_vs_torch")), _num(r.get("mem_vs_torch"))
            text = f"{provider} {speed:.2f}x img/s"
            if mem == mem:
                text += f", {mem:.2f}x mem"
            if provider == "triton" and not str(r.get("device", "")).startswith("cpu") and speed == speed:
                met = speed >= TARGET_SPEEDUP and mem == mem and mem <= TARGET_MEMORY
                text += f" (target >= {TARGET_SPEEDUP}x, <= {TARGET_MEMORY}x: {'met' if met else 'NOT met'})"
            bits.append(text)
        torch_row = here.get("torch")
        if torch_row is not None and torch_row.get("status") == "ok":
            bits.insert(0, f"torch {_num(torch_row['images_per_s']):.3g} img/s")
        elif not bits:
            bits.append(next(iter(here.values())).get("status", "?"))
        parts.append(f"{preset} {res}px: " + "; ".join(bits))
    return " / ".join(parts)


def model(rows: list[dict]) -> str:
    """At the largest resolution: best latency per backend and mode."""
    res = max(int(r["resolution"]) for r in rows)
    bits = [
        f"{r['backend']} {r['mode']} {_num(r['ms_min']):.1f} ms"
        for r in rows
        if int(r["resolution"]) == res and _num(r["ms_min"]) == _num(r["ms_min"])
    ]
    return f"{rows[0]['preset']} at {res}px: " + ", ".join(bits)


_BUILTIN = {"train_step": train_step, "model": model}


def headline(name: str, rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    try:
        own = getattr(importlib.import_module(f"bench.{name}"), "headline", None)
    except ImportError:
        own = None
    if callable(own):
        return own(rows)
    if name in _BUILTIN:
        return _BUILTIN[name](rows)
    return f"{len(rows)} rows"
