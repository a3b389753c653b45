"""Run every experiment and write bench/results/experiments/ (``make experiments``).

    python -m bench.experiments.run_all [--out DIR] [--smoke] [--threads N]

Writes fixed_pattern.{json,png}, balanced_summary.json, resolution_consistency.{json,png}, featsharp.json,
vitdet_training.json, damp_robustness.json, sam3_views.json,
viz.png (``radio viz`` of the experiment-3 student on a held-out image, with its three tiny
teachers) and summary.md (the tables below, as markdown). ``--smoke`` runs the seconds-long CI budget.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from . import (
    balanced_summary,
    damp_robustness,
    featsharp,
    fixed_pattern,
    resolution_consistency,
    sam3_views,
    vitdet_training,
)
from .common import RESULTS_DIR, Stopwatch

VIZ_IMAGE = "chelsea"  # held out from every training run (radio.train.data.BUNDLED_IMAGES)


def visualise(run_dir: Path, out: Path, size: int = 128) -> Path:
    """Export the run's EMA student and draw it with its tiny teachers through the real CLI."""
    import skimage.data
    from PIL import Image

    from radio.cli import main as radio_main
    from radio.train import export_run

    with tempfile.TemporaryDirectory(prefix="radio-viz-") as tmp:
        model_dir = Path(tmp) / "model"
        export_run(run_dir, model_dir)
        image = Path(tmp) / f"{VIZ_IMAGE}.png"
        Image.fromarray(getattr(skimage.data, VIZ_IMAGE)()).save(image)
        argv = ["viz", str(image), "--model", str(model_dir), "--teachers", "siglip2", "dinov3", "sam3"]
        rc = radio_main([*argv, "--size", str(size), "--columns", "4", "--out", str(out)])
    if rc != 0:
        raise RuntimeError(f"radio viz failed with exit status {rc}")
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_markdown(
    fp: dict,
    bs: dict,
    rc: dict,
    fs: dict | None = None,
    vt: dict | None = None,
    dr: dict | None = None,
    sv: dict | None = None,
) -> str:
    lines = ["### Fixed-pattern noise (`fixed_pattern.json`)", ""]
    lines += ["| student | noise pattern reproduced | cosine to clean teacher |", "|---|---|---|"]
    for label, arm in (("no shifts", "without_shift"), ("whole-patch shifts", "with_shift")):
        lines.append(f"| {label} | {_f(fp[f'noise_reproduced_{arm}'])} | {_f(fp[f'clean_fidelity_{arm}'])} |")
    lines.append(f"| (optimal shift-blind student) | {_f(fp['noise_reproduced_ideal_with_shift'])} | |")
    lines += ["", balanced_summary.markdown(bs).rstrip("\n")]
    lines += ["", "### Resolution consistency (`resolution_consistency.json`): spatial cosine, trained student", ""]
    res, parts = rc["resolutions"], rc["partitions"]
    lines.append("| teacher | " + " | ".join(f"{r} ({p})" for r, p in zip(res, parts)) + " |")
    lines.append("|---" * (len(res) + 1) + "|")
    for name, t in rc["teachers"].items():
        lines.append(f"| {name} | " + " | ".join(_f(v) for v in t["spatial"]["after"]) + " |")
        if t["summary"]["after"][0] is not None:
            lines.append(f"| {name} summary | " + " | ".join(_f(v) for v in t["summary"]["after"]) + " |")
    if fs is not None:
        lines += ["", featsharp.markdown(fs).rstrip("\n")]
    if vt is not None:
        lines += ["", vitdet_training.markdown(vt).rstrip("\n")]
    if dr is not None:
        lines += ["", damp_robustness.markdown(dr).rstrip("\n")]
    if sv is not None:
        lines += ["", sam3_views.markdown(sv).rstrip("\n")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every bench/experiments experiment")
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"output folder (default {RESULTS_DIR})")
    parser.add_argument("--smoke", action="store_true", help="the seconds-long CI budget (numbers meaningless)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models, shared CPUs)"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = lambda module: module.Budget.smoke() if args.smoke else module.Budget()
    with Stopwatch() as clock, tempfile.TemporaryDirectory(prefix="radio-exp-") as tmp:
        fp = fixed_pattern.run(out, budget(fixed_pattern))
        bs = balanced_summary.run(out, budget(balanced_summary))
        rc = resolution_consistency.run(out, budget(resolution_consistency), keep_run=Path(tmp) / "run")
        visualise(Path(rc["run_dir"]), out / "viz.png")
        fs = featsharp.run(out, budget(featsharp))
        vt = vitdet_training.run(out, budget(vitdet_training))
        dr = damp_robustness.run(out, budget(damp_robustness))
        sv = sam3_views.run(out, budget(sam3_views))
    text = summary_markdown(fp, bs, rc, fs, vt, dr, sv)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"all experiments: {clock.seconds:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
