"""Attention at C-RADIOv4 shapes: our fused Triton kernels against SDPA, FlexAttention and eager math.

Shapes (GPU default): the problems of the static performance model (``radio_kernels.perf_model``,
``python -m radio_kernels.audit --plan``): ViT-H/16 (D = 80, 16 heads, B = 16) at 512 / 1024 / 1152 px,
global and windows of 8 x 8 / 16 x 16 patches, SO400M/16 (D = 72) at 1152 px in windows of 12 x 12,
ViT-B/16 (D = 64, 12 heads) at 1024 px; N = (px / 16)^2 + 10 prefix tokens (patch queries see their
window + the 10 prefix keys, prefix queries see everything). ``--full``: head dims 64 / 72 / 80 at 512
to 2048 px, windows 8 / 12 / 16 (16 heads). Passes: forward, backward, forward + backward.

Providers:
    ours            radio_kernels.attention, backend="triton"
    sdpa-<backend>  F.scaled_dot_product_attention pinned to flash / efficient / cudnn / math; for
                    windows with prefix, on per-window copies that include the prefix (the rule of
                    reference.attention, with windows folded into the head axis so that the fused
                    backends, which take 4-D inputs only, can run it: ``sdpa_windowed``)
    flex            torch.compile(flex_attention) with the block mask of the same rule
    eager           softmax(q k^T + mask) v with an explicit N x N mask (reference.attention_dense)

TFLOP/s count visible pairs only (reference.attention_flops; backward = 2.5x forward), the same
count for every provider. Peak memory = torch.cuda.max_memory_allocated during the pass minus what
was allocated before it (inputs excluded).

    python -m bench.attention --device cuda           # bf16, the default GPU set (< 1 minute)
    python -m bench.attention --device cuda --full    # every shape above (several minutes)
    python -m bench.attention --device cpu --quick    # smoke: PyTorch providers at toy sizes

Before timing on a GPU, ours and flex are compiled for every shape in parallel processes (Triton
compiles serially otherwise: minutes), and ours is checked against SDPA at bf16 on every shape's
forward (and the gradients of the first shape); on a mismatch ours is not timed, the rest is.
Writes ``bench/results/attention_<date>_<device>[_quick].{csv,md,png}`` (PNG: TFLOP/s against N).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench import _common
from radio_kernels import attention, reference
from radio_kernels.perf_model import PROBLEMS

HEADS, PREFIX, PATCH = 16, 10, 16
PASSES = ("fwd", "bwd", "fwd+bwd")
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
TOKENS_PER_BATCH = 16384  # batch = max(1, this // N): every shape does a comparable amount of work
EAGER_MAX_N = 5200  # explicit N x N scores above this cost seconds and tens of GB

# (px, head dim, window side or 0): the default GPU set, then the full sweep.
# The default GPU set is the static model's problems (radio_kernels.perf_model.PROBLEMS: ViT-H/16
# D = 80 at 512 / 1024 / 1152 px global and windows 8 / 16, SO400M D = 72 window 12, ViT-B D = 64;
# B = 16), so that one GPU run answers whether the launch plan's numbers hold.
GPU_FULL = [
    (px, d, w)
    for d in (64, 72, 80)
    for px in (512, 1024, 1152, 2048)
    for w in (0, 8, 12, 16)
    if w == 0 or (px // PATCH) % w == 0
]
# The stated speed target: global forward at N = 4096, D = 128, bf16 (B = 4).
TARGET_SHAPE = dict(px=None, n=4096, d=128, window=0, batch=4, prefix=0)
CPU_SHAPES = [(128, 32, 0), (128, 32, 4)]  # grid 8 x 8: tiny, for a smoke run
CPU_HEADS = 2


# ------------------------------------------------------------------------------------------------ shapes
def shape_of(px: int, d: int, w: int, heads: int, batch: int | None = None) -> dict:
    side = px // PATCH
    n = side * side + PREFIX
    batch = batch or max(1, TOKENS_PER_BATCH // n)
    return dict(px=px, n=n, d=d, window=w, batch=batch, prefix=PREFIX, heads=heads)


def make_inputs(shape: dict, dtype, device, requires_grad: bool):
    """q, k, v as the three views of one packed (B, N, 3, H, D) projection, as a ViT block has them."""
    g = torch.Generator(device=device).manual_seed(0)
    B, N, H, D = shape["batch"], shape["n"], shape["heads"], shape["d"]
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, generator=g).requires_grad_(requires_grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, (q, k, v)


def flops(shape: dict, which: str) -> float:
    T = shape["window"] ** 2
    fwd = reference.attention_flops(shape["n"], shape["prefix"], T, shape["d"], shape["batch"] * shape["heads"])
    return fwd * PASS_FLOPS[which]


# ------------------------------------------------------------------------------------------------ providers
def providers_for(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["sdpa-math", "eager"]
    return ["ours", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "flex", "eager"]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


_FLEX = {}


def _flex_fn(shape: dict, device):
    """Compiled flex_attention and the block mask of the window / prefix rule for this shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    P, T, N = shape["prefix"], shape["window"] ** 2, shape["n"]
    if T == 0:
        block_mask = None
    else:

        def visible(b, h, q_idx, kv_idx):
            same = (q_idx - P) // T == (kv_idx - P) // T
            return same | (q_idx < P) | (kv_idx < P)

        block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=N, KV_LEN=N, device=device)
    return lambda q, k, v: _FLEX["fn"](q, k, v, block_mask=block_mask)


def sdpa_windowed(q, k, v, num_prefix: int, window_tokens: int) -> torch.Tensor:
    """SDPA baseline: the window / prefix rule on 4-D SDPA calls (radio_kernels.reference.sdpa_attention)."""
    return reference.sdpa_attention(q, k, v, num_prefix, window_tokens)


def attention_fn(provider: str, shape: dict, device):
    """A callable (q, k, v) -> out for one provider, or raises if it cannot run this shape."""
    P, T = shape["prefix"], shape["window"] ** 2
    if T == 0:
        P = 0  # global attention: the prefix is just tokens
    if provider == "ours":
        return lambda q, k, v: attention(q, k, v, num_prefix=P, window_tokens=T, backend="triton")
    if provider.startswith("sdpa-"):
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(provider[5:])

        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa_windowed(q, k, v, P, T)

        return run
    if provider == "flex":
        return _flex_fn(shape, device)
    if provider == "eager":
        if shape["n"] > EAGER_MAX_N:
            raise RuntimeError(f"skipped: N = {shape['n']} > {EAGER_MAX_N} (N x N scores)")
        scale = shape["d"] ** -0.5
        return lambda q, k, v: reference.attention_dense(q, k, v, P, T, scale)
    raise ValueError(provider)


# ------------------------------------------------------------------------------------------------ timing
def time_ms(fn, device, rep_ms: float) -> float:
    """Median ms of fn: triton's do_bench on a GPU (CUDA events, L2 flushed between runs; about
    rep_ms of repetitions), bench._common's wall-clock timer on a CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median")
    return _common.time_ms(fn, device, warmup=1, repeats=5)["ms"]


def measure(provider: str, shape: dict, which: str, dtype, device, rep_ms: float) -> dict:
    """ms, TFLOP/s and peak extra memory of one pass of one provider (status != ok on failure)."""
    fn = attention_fn(provider, shape, device)
    grad = which != "fwd"
    qkv, (q, k, v) = make_inputs(shape, dtype, device, grad)
    do = torch.randn(shape["batch"], shape["heads"], shape["n"], shape["d"], device=device, dtype=dtype)
    if which == "fwd":

        def step():
            with torch.no_grad():
                fn(q, k, v)

    elif which == "bwd":
        out = fn(q, k, v)

        def step():
            torch.autograd.grad(out, qkv, do, retain_graph=True)

    else:

        def step():
            torch.autograd.grad(fn(q, k, v), qkv, do)

    step()  # compile / autotune / first-call costs
    peak = _common.peak_memory_mb(step, device)
    ms = time_ms(step, device, rep_ms)
    return dict(ms=ms, tflops=flops(shape, which) / ms / 1e9, peak_mb=math.nan if peak is None else peak)


def check_ours_against_sdpa(shapes: list[dict], dtype, device) -> list[str]:
    """Forward of every shape (and gradients of the first) vs SDPA's default backend at bf16."""
    notes = []
    for i, shape in enumerate(shapes):
        qkv, (q, k, v) = make_inputs(shape, dtype, device, requires_grad=i == 0)
        ours = attention_fn("ours", shape, device)(q, k, v)
        P, T = (shape["prefix"], shape["window"] ** 2) if shape["window"] else (0, 0)
        ref = reference.attention(q, k, v, num_prefix=P, window_tokens=T)
        err = (ours.float() - ref.float()).abs().max().item()
        # bf16 rounding of outputs of magnitude ~1 is 2^-8; both sides round differently.
        if not err < 2e-2:
            raise AssertionError(f"ours vs SDPA at {shape}: max |diff| {err:.3g} (bf16)")
        line = f"px={shape['px']} D={shape['d']} w={shape['window']}: fwd max|ours - sdpa| {err:.2g}"
        if i == 0:
            do = torch.randn_like(ours)
            g_ours = torch.autograd.grad(ours, qkv, do)[0].float()
            g_ref = torch.autograd.grad(ref, qkv, do)[0].float()
            gerr = (g_ours - g_ref).abs().max().item() / g_ref.abs().max().item()
            if not gerr < 3e-2:
                raise AssertionError(f"ours vs SDPA gradients at {shape}: max rel diff {gerr:.3g} (bf16)")
            line += f", grad max|diff|/max|grad| {gerr:.2g}"
        notes.append(line)
    return notes


# Measured in this order, every shape in a phase before the next phase starts, so a time budget
# cuts the slow providers (compile per shape / N x N memory) rather than the comparison that
# matters; cuDNN gets a phase of its own because a backend that faults can lose the CUDA context
# (everything measured after it in this process), and it is the least proven on new shapes.
LATE_PHASES = (("sdpa-cudnn",), ("flex", "eager"))
FLEX_MIN_LEFT_S = 20.0  # a first torch.compile of flex fwd + bwd takes about this long (cold)


def _row(shape: dict, which: str, provider: str) -> dict:
    return dict(
        px=shape["px"] or "",
        n=shape["n"],
        batch=shape["batch"],
        heads=shape["heads"],
        head_dim=shape["d"],
        mode=f"window {shape['window']}" if shape["window"] else "global",
        num_prefix=shape["prefix"] if shape["window"] else 0,
        which=which,
        provider=provider,
        status="ok",
        ms=math.nan,
        tflops=math.nan,
        peak_mb=math.nan,
    )


def _cuda_alive(device) -> bool:
    """False once a fault (illegal address, launch failure) has poisoned this process's CUDA context."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return (torch.ones(1, device=device) + 1).item() == 2
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False


def run(
    shapes, providers, dtype, device, rep_ms: float, deadline: float, on_progress=None, preset_status=None
) -> list[dict]:
    """One row per (shape, pass, provider), in that order.

    Phases (ours and SDPA, then cuDNN, then FlexAttention and eager math; see LATE_PHASES) each
    cover every shape before the next starts. ``on_progress(rows)`` is called after each shape (to
    write partial results a hard timeout cannot lose). ``preset_status`` {provider: status} marks a
    provider's rows as not run (ours, when it failed its check against SDPA).
    """
    rows = {(i, w, p): _row(s, w, p) for i, s in enumerate(shapes) for w in PASSES for p in providers}
    for (_, _, provider), row in rows.items():
        if provider in (preset_status or {}):
            row["status"] = preset_status[provider]
    ordered = lambda: [rows[k] for k in sorted(rows, key=lambda k: (k[0], PASSES.index(k[1]), providers.index(k[2])))]
    late = [p for phase in LATE_PHASES for p in phase]
    phases = [[p for p in providers if p not in late], *([p for p in ph if p in providers] for ph in LATE_PHASES)]
    for phase in phases:
        for i, shape in enumerate(shapes):
            for which in PASSES:
                for provider in phase:
                    row = rows[i, which, provider]
                    if row["status"] != "ok":  # set before the run (ours failed its check)
                        continue
                    left = deadline - time.time()
                    if left <= 0 or (provider == "flex" and left < FLEX_MIN_LEFT_S):
                        row["status"] = "skipped (time budget)"
                        continue
                    try:
                        row.update(measure(provider, shape, which, dtype, device, rep_ms))
                    except Exception as err:  # a backend that cannot run this shape: report, go on
                        row["status"] = f"n/a: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]}"
                        if not _cuda_alive(device):  # nothing measured after this would be real
                            lost = f"skipped: CUDA context lost after {provider} failed"
                            for other in rows.values():
                                if other["status"] == "ok" and math.isnan(other["ms"]):
                                    other["status"] = lost
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
            if on_progress is not None:
                on_progress(_add_ratios(ordered()))
    return _add_ratios(ordered())


def _add_ratios(rows: list[dict]) -> list[dict]:
    """vs_best_sdpa = best SDPA backend's ms / ours' ms, per shape and pass (on ours' rows)."""
    key = lambda r: (r["px"], r["n"], r["head_dim"], r["mode"], r["which"])
    for r in rows:
        r["vs_best_sdpa"] = math.nan
    for r in rows:
        if r["provider"] != "ours" or r["status"] != "ok":
            continue
        sdpa = [x["ms"] for x in rows if key(x) == key(r) and x["provider"].startswith("sdpa-") and x["status"] == "ok"]
        if sdpa:
            r["vs_best_sdpa"] = min(sdpa) / r["ms"]
    return rows


# ------------------------------------------------------------------------------------------------ output
def headline(rows: list[dict]) -> str:
    """ours vs the best SDPA backend, fwd+bwd, per mode (geometric mean over shapes); target point."""
    bits = []
    ours = [r for r in rows if r["provider"] == "ours" and r.get("status") == "ok" and r["which"] == "fwd+bwd"]
    for mode in dict.fromkeys(r["mode"] for r in ours):
        ratios = [float(r["vs_best_sdpa"]) for r in ours if r["mode"] == mode and float(r["vs_best_sdpa"]) > 0]
        if ratios:
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            bits.append(f"{mode} {gm:.2f}x")
    target = [
        r
        for r in rows
        if r["provider"] == "ours" and r.get("status") == "ok" and r["which"] == "fwd" and str(r["px"]) == ""
    ]
    text = "ours vs best SDPA (fwd+bwd): " + (", ".join(bits) or "n/a")
    if target:
        text += f"; global fwd N=4096 D=128: {float(target[0]['tflops']):.0f} TFLOP/s"
    return text


def markdown(rows: list[dict], title: str, notes: list[str]) -> str:
    header = ["px", "N", "B", "D", "mode", "pass", "provider", "ms", "TFLOP/s", "peak MiB", "vs best SDPA"]
    lines = [f"### {title}", "", *(f"- {n}" for n in notes), "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [str(r["px"]), str(r["n"]), str(r["batch"]), str(r["head_dim"]), r["mode"], r["which"], r["provider"]]
        if r["status"] == "ok":
            cells += [_common.fmt(r["ms"], ".3f"), _common.fmt(r["tflops"], ".3g"), _common.fmt(r["peak_mb"], ".0f")]
            cells.append(_common.fmt(r["vs_best_sdpa"], ".2f", "x"))
        else:
            cells += [r["status"], "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one small shape: a smoke run")
    p.add_argument("--full", action="store_true", help="every C-RADIOv4 shape (GPU; several minutes)")
    p.add_argument("--providers", nargs="+", help="subset of the providers")
    p.add_argument("--budget-s", type=float, help="stop starting new measurements after this (default cuda 45)")
    p.add_argument("--out", default=_common.RESULTS_DIR)
    a = p.parse_args(argv)

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    started = time.time()
    if cuda:
        dtype, heads, rep_ms = torch.bfloat16, HEADS, 25.0
        if a.full:
            shapes = [shape_of(px, d, w, heads) for px, d, w in GPU_FULL]
        else:
            shapes = [shape_of(p.px, p.head_dim, p.window, p.heads, batch=p.batch) for p in PROBLEMS]
            shapes = shapes[:1] if a.quick else shapes
        if not a.quick:
            shapes.append(dict(TARGET_SHAPE, heads=heads))
    else:
        dtype, heads, rep_ms = torch.float32, CPU_HEADS, 0.0
        shapes = [shape_of(px, d, w, heads, batch=1 if a.quick else 4) for px, d, w in CPU_SHAPES]
    providers = a.providers or providers_for(device)
    budget = a.budget_s if a.budget_s is not None else (600.0 if a.full else 45.0) if cuda else 120.0

    ref = _common.reference_numbers(device, quick=a.quick)
    device_name = _common.device_slug(device)
    notes = [
        f"device {device_name}; {str(dtype).replace('torch.', '')}; {heads} heads; "
        f"q, k, v = views of one packed (B, N, 3, H, D) projection",
        "TFLOP/s on visible pairs (4 B H pairs D forward, 2.5x backward); reference in this run: "
        + ", ".join(f"{k} {v:.4g}" for k, v in ref.items()),
        "windowed rows: 10 prefix tokens seeing everything, patch tokens their window + the prefix; SDPA runs on "
        "per-window copies that include the prefix",
    ]
    preset_status = {}
    if cuda:
        _common.allow_recompiles()  # flex compiles once per shape and mask: more than dynamo's 8
        left = started + budget - time.time()
        warm = [p for p in ("ours", "flex") if p in providers]
        items = [(shape, warm, "bfloat16", "cuda") for shape in shapes] if warm else []
        notes.append(_common.prewarm(_warm, items, timeout_s=min(40.0, 0.5 * left), max_parallel=12))
        print(notes[-1], flush=True)
    if cuda and "ours" in providers:
        try:
            notes += check_ours_against_sdpa(shapes if not a.full else shapes[:6], dtype, device)
        except Exception as err:  # noqa: BLE001 - reported in the table; SDPA and flex still timed
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
            notes.append(f"CHECK FAILED, ours not timed: {reason}")
            preset_status["ours"] = "not timed: failed its check against SDPA"
            print(notes[-1], flush=True)
    elif not cuda:
        notes.append(
            "CPU smoke run: not a speed ("
            + ("ours runs under the Triton interpreter" if "ours" in providers else "PyTorch providers only")
            + ")"
        )
    title = f"Attention at C-RADIOv4 shapes, {device_name}"
    stem = _common.result_stem(a.out, "attention", device, quick=a.quick)

    def write(rows: list[dict]) -> str:
        _common.write_csv(stem + ".csv", rows)
        table = markdown(rows, title, notes + [headline(rows)])
        with open(stem + ".md", "w") as f:
            f.write(table)
        return table

    rows = run(shapes, providers, dtype, device, rep_ms, started + budget, write, preset_status)
    print(write(rows))
    why_not = plot(rows, stem + ".png", title)
    print(why_not or "", f"wrote {stem}.csv, .md{'' if why_not else ', .png'} in {time.time() - started:.0f} s")
    return rows


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """fwd+bwd TFLOP/s against N per provider and mode, at the smallest head dim measured."""
    ok = [r for r in rows if r["status"] == "ok" and r["which"] == "fwd+bwd"]
    if not ok:
        return "no plot: no fwd+bwd row measured"
    d = min(r["head_dim"] for r in ok)
    series: dict[str, list] = {}
    for r in ok:
        if r["head_dim"] == d and r["px"] != "":
            series.setdefault(f"{r['provider']}, {r['mode']}", []).append((r["n"], r["tflops"]))
    return _common.plot_xy(path, series, "tokens N", "TFLOP/s (fwd + bwd, visible pairs)", f"{title}, D={d}", True)


def _warm(item: tuple) -> None:
    """Prewarm worker (own process): compile ``providers`` (ours, flex) fwd + bwd for one shape."""
    shape, providers, dtype_name, device = item
    _common.allow_recompiles()
    device = torch.device(device)
    for provider in providers:
        try:
            qkv, (q, k, v) = make_inputs(shape, getattr(torch, dtype_name), device, requires_grad=True)
            out = attention_fn(provider, shape, device)(q, k, v)
            torch.autograd.grad(out, qkv, torch.ones_like(out))
        except Exception as err:  # noqa: BLE001 - the timed run reports it properly
            print(f"prewarm {provider} {shape}: {type(err).__name__}: {err}", flush=True)
    _common.synchronize(device)


if __name__ == "__main__":
    main()
