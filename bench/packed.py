"""Packed variable-size batches against padding to the largest image.

A batch of S images of different sizes, three ways through ``RadioModel`` (forward, inference):

    packed   ``model(patches, image_grid_hw=...)``: one token row, block-diagonal attention over
             ``cu_seqlens`` (radio_kernels.attention), no padding; each image's outputs are its own
    padded   every image zero-padded to the largest H x W, one dense (S, 3, Hmax, Wmax) forward: the
             usual way to batch mixed sizes (every image pays for the largest, and its outputs change)
    loop     one forward per image (the same outputs as packed, S launches of everything)

and the attention op alone at the model's width (forward, and forward + backward): the packed
(1, H, L, D) row with ``cu_seqlens`` against global attention on the padded (S, H, Lmax, D) batch.
``useful`` is the fraction of computed tokens that belong to an image (packed: 1).

    python -m bench.packed --device cpu            # ViT-B, float32, 6 images of 64..256 px (CPU time, 1 thread)
    python -m bench.packed --device cpu --quick    # tiny student, 3 small images (seconds)
    python -m bench.packed --device cuda           # ViT-L, bf16 autocast, 8 images of 256..1024 px

Writes ``bench/results/packed_<date>_<device>[_quick].{csv,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from bench import _common
from radio import RadioConfig, RadioModel
from radio.model.packed import pack_images
from radio_kernels import attention

SIZES = {
    "cpu": [(64, 64), (128, 96), (96, 224), (224, 224), (160, 64), (256, 192)],
    "quick": [(32, 32), (64, 48), (16, 96)],
    "cuda": [(256, 256), (384, 512), (512, 512), (768, 512), (1024, 1024), (320, 640), (512, 1024), (448, 448)],
}
PRESET = {"cpu": "vit-b", "quick": "tiny", "cuda": "vit-l"}


def time_ms(fn, device, repeats: int) -> dict:
    """GPU: ``_common.time_ms`` (CUDA events). CPU: process CPU time of a single-threaded run (min and
    median), which other jobs on a shared machine barely disturb, as in bench/model.py."""
    if device.type == "cuda":
        return _common.time_ms(fn, device, warmup=2, repeats=repeats)
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times)}


def _padded(images, H, W):
    return torch.stack([F.pad(img, (0, W - img.shape[-1], 0, H - img.shape[-2])) for img in images])


def model_rows(model, images, device, dtype, repeats) -> list[dict]:
    patches, grid = pack_images(images, model.patch_size)
    H, W = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    padded = _padded(images, H, W)
    P, p = model.num_summary_tokens, model.patch_size
    useful = sum(P + i.shape[-2] * i.shape[-1] // p**2 for i in images)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    runs = {
        "packed": (lambda: model(patches, image_grid_hw=grid), useful),
        "padded": (lambda: model(padded), len(images) * (P + H * W // p**2)),
        "loop": (lambda: [model(i[None]) for i in images], useful),
    }
    rows = []
    for provider, (fn, tokens) in runs.items():
        with torch.inference_mode(), torch.autocast(**autocast):
            t = time_ms(fn, device, repeats)
        rows.append(dict(level="model fwd", provider=provider, ms=t["ms"], ms_min=t["ms_min"], tokens=tokens,
                         useful=useful / tokens))  # fmt: skip
    return rows


def attention_rows(model, images, device, dtype, repeats) -> list[dict]:
    cfg, p = model.config, model.patch_size
    lengths = [cfg.num_prefix_tokens + i.shape[-2] * i.shape[-1] // p**2 for i in images]
    L, S, Lmax, Hh, D = sum(lengths), len(lengths), max(lengths), cfg.num_heads, cfg.head_dim
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    adtype = dtype if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    row = torch.randn(1, L, 3, Hh, D, device=device, dtype=adtype, generator=g)
    pad = torch.randn(S, Lmax, 3, Hh, D, device=device, dtype=adtype, generator=g)
    runs = {
        "packed": (lambda t: attention(*t.permute(2, 0, 3, 1, 4).unbind(0), cu_seqlens=cu), row, L),
        "padded": (lambda t: attention(*t.permute(2, 0, 3, 1, 4).unbind(0)), pad, S * Lmax),
    }
    rows = []
    for provider, (fn, x, tokens) in runs.items():
        with torch.no_grad():
            t = time_ms(lambda fn=fn, x=x: fn(x), device, repeats)
        rows.append(dict(level="attention fwd", provider=provider, ms=t["ms"], ms_min=t["ms_min"], tokens=tokens,
                         useful=L / tokens))  # fmt: skip
        leaf = x.detach().requires_grad_()

        def step(fn=fn, leaf=leaf):
            fn(leaf).sum().backward()

        t = time_ms(step, device, repeats)
        rows.append(dict(level="attention fwd+bwd", provider=provider, ms=t["ms"], ms_min=t["ms_min"],
                         tokens=tokens, useful=L / tokens))  # fmt: skip
    return rows


def _speedups(rows: list[dict]) -> list[dict]:
    base = {r["level"]: r["ms_min"] for r in rows if r["provider"] == "padded"}
    return [r | {"speedup_vs_padded": base[r["level"]] / r["ms_min"]} for r in rows if r["level"] in base]


def headline(rows: list[dict]) -> str:
    def pick(level, provider):
        return next((r for r in rows if r["level"] == level and r["provider"] == provider), None)

    parts = []
    for level in ("model fwd", "attention fwd+bwd"):
        packed, padded = pick(level, "packed"), pick(level, "padded")
        if packed and padded:
            parts.append(
                f"{level}: packed {packed['ms_min']:.3g} ms vs padded {padded['ms_min']:.3g} ms "
                f"({padded['ms_min'] / packed['ms_min']:.2f}x, {float(padded['useful']):.0%} useful when padded)"
            )
    return "; ".join(parts) or f"{len(rows)} rows"


def main(argv=None) -> list[dict]:
    p = _common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--preset", help="student preset (default: vit-b on CPU, vit-l on GPU, tiny with --quick)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, help="start no new measurement after this many seconds")
    a = p.parse_args(argv)
    deadline = time.time() + (a.budget_s if a.budget_s is not None else math.inf)
    device = torch.device(a.device)
    kind = "quick" if a.quick else device.type
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = a.repeats or (2 if a.quick else 3 if device.type == "cpu" else 20)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: robust on a shared machine
    preset = a.preset or PRESET[kind]
    torch.manual_seed(0)
    model = RadioModel(RadioConfig.preset(preset)).to(device).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g).to(device) for h, w in SIZES[kind]]
    sizes = ", ".join(f"{h}x{w}" for h, w in SIZES[kind])
    stem = _common.result_stem(a.out, "packed", device, a.quick)
    clock = "CUDA events" if device.type == "cuda" else "process CPU time, 1 thread"
    notes = [f"{preset} student, {len(images)} images: {sizes}", f"dtype {dtype}, {clock}, best of {repeats} runs"]
    notes.append("speedup_vs_padded: padded ms_min / ms_min at the same level (loop: one forward per image)")

    rows: list[dict] = []
    for measure in (model_rows, attention_rows):
        if time.time() > deadline:
            notes.append(f"not measured (time budget): {measure.__name__}")
            break
        rows += measure(model, images, device, dtype, repeats)
        out = _speedups(rows)
        _common.write_csv(stem + ".csv", out)
        text = _common.write_markdown(stem + ".md", "Packed variable-size batches vs padding", notes, out)
    print(text)
    return out


if __name__ == "__main__":
    main()
