"""Experiment 6: a SAM3 view larger than half its fixed canvas: pad it, or resize it to the canvas?

SAM3 takes one input size (1008 px). A student view of 768 or 1024 px is a 672 / 896 px teacher
view, more than half the canvas, so the mosaic runs it alone: placed at the canvas's top-left corner,
the rest filled with the mean colour (``high_res_mode = "auto"``, "mosaic"). SAM3's global-attention
blocks then also attend to that padding. The alternative (``"resize"``) scales the view up to the
whole canvas and resamples the teacher's features back onto the view's grid.

Reference: the same weights run on the view alone at its own size (a SAM3 built for that input side,
so no padding token exists; windowed blocks pad to whole windows inside, as the real model does).
Measured on held-out crops with the tiny SAM3 (112 px canvas = 8 x 8 tokens of 14 px, windows of 4,
one global block), for views of 5, 6 and 7 tokens per side (0.63, 0.75, 0.88 of the canvas; the
real cases are 0.67 and 0.89)::

    error = ||f - f_ref||^2 / mean ||f_ref||^2     per token, averaged over the view's border ring
                                                  (where padding is nearest) and over its interior
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

from radio.teachers import tiny_teacher
from radio.teachers.mosaic import mosaic_features
from radio.teachers.sam3 import Sam3Teacher

from .common import RESULTS_DIR, ImagePool, Stopwatch, write_json

__all__ = ["Budget", "markdown", "run"]


@dataclass
class Budget:
    view_tokens: list[int] = field(default_factory=lambda: [5, 6, 7])
    crops: int = 16
    seed: int = 0

    @classmethod
    def smoke(cls) -> Budget:
        return cls(view_tokens=[6], crops=2)


def _teacher_at(teacher: Sam3Teacher, side: int) -> Sam3Teacher:
    """The same SAM3 weights, built for inputs of ``side`` pixels (no canvas, no padding tokens)."""
    config = teacher.model.config.__class__(**{**teacher.model.config.to_dict(), "image_size": side})
    model = Sam3ViTModel(config)
    model.load_state_dict(teacher.model.state_dict())
    return Sam3Teacher(model.eval(), name=f"{teacher.name}@{side}", mean=teacher.mean, std=teacher.std)


def _errors(features: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(border-ring, interior) mean of the per-token relative squared error; (g, g, C) each."""
    g = reference.shape[0]
    err = (features - reference).square().sum(-1) / reference.square().sum(-1).mean()
    border = torch.ones(g, g, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return float(err[border].mean()), float(err[~border].mean())


@torch.no_grad()
def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    budget = budget or Budget()
    teacher = tiny_teacher("sam3", seed=budget.seed)
    canvas, patch = teacher.fixed_size, teacher.patch_size
    pool = ImagePool("heldout")
    results = {}
    with Stopwatch() as clock:
        for g in budget.view_tokens:
            side = g * patch
            alone = _teacher_at(teacher, side)
            views = pool.canvases(budget.crops, side, torch.Generator().manual_seed(budget.seed + g))
            errors = {"padded": [], "resized": []}
            for view in views:
                reference = alone(view[None]).features[0]
                padded = mosaic_features(teacher, [view])[0]
                big = F.interpolate(view[None], size=(canvas, canvas), mode="bilinear", antialias=True)
                grid = teacher(big).features.permute(0, 3, 1, 2)
                resized = F.interpolate(grid, size=(g, g), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
                errors["padded"].append(_errors(padded, reference))
                errors["resized"].append(_errors(resized, reference))
            results[str(g)] = {
                "view_px": side,
                "fraction_of_canvas": g * patch / canvas,
                **{
                    mode: {"border": sum(e[0] for e in es) / len(es), "interior": sum(e[1] for e in es) / len(es)}
                    for mode, es in errors.items()
                },
            }
            pad, res = results[str(g)]["padded"], results[str(g)]["resized"]
            log(
                f"sam3 views: {side} px of {canvas}: padded {pad['border']:.2e} / {pad['interior']:.2e}, "
                f"resized {res['border']:.2e} / {res['interior']:.2e} (border / interior)"
            )
    result = {
        "views": results,
        "better": "padded"
        if all(r["padded"]["border"] < r["resized"]["border"] for r in results.values())
        else "resized",
        "metric": "per-token ||f - f_alone||^2 / mean ||f_alone||^2 on held-out crops, border ring and interior",
        "canvas_px": canvas,
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, Path(out_dir) / "sam3_views.json")
    return result


def markdown(result: dict) -> str:
    lines = [
        f"### SAM3 views larger than half the canvas (`sam3_views.json`): tiny SAM3, {result['canvas_px']} px canvas",
        "",
        "error to the view run alone at its own size (relative squared, per token)",
        "",
        "| view | of canvas | padded: border | padded: interior | resized: border | resized: interior |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["views"].values():
        lines.append(
            f"| {r['view_px']} px | {r['fraction_of_canvas']:.2f} | {r['padded']['border']:.2e} | "
            f"{r['padded']['interior']:.2e} | {r['resized']['border']:.2e} | {r['resized']['interior']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    print(markdown(run(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
