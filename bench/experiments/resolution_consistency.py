"""Experiment 3: one student matches every teacher at every resolution (no "mode switching").

C-RADIOv4 samples each step's resolution from a low and a high partition and matches every teacher
at every resolution (SigLIP2 through FeatSharp tiles and SAM3 through mosaics on the high one), so the
student's features stay faithful across resolutions instead of switching behaviour between them.
Here the real trainer (``radio.train.train``) trains its tiny default (three tiny teachers, low
partition {64, 80, 96}, high partition {112, 128}), and we then measure, at every resolution of both
partitions, the trainer's own fidelity on held-out crops (radio.train.fidelity)::

    spatial_t(R) = mean cos(adaptor_t features, PHI-S_t(teacher_t view at R))   over held-out cells
    summary_t(R) = mean cos(adaptor_t summary, teacher_t summary)                (SigLIP2, DINOv3)

for the initial student ("before"), the trained one ("after") and its EMA. Teacher views at R are
those of training (plain / tiled / mosaic per partition), normalisers as saved in the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radio.train import TrainConfig, train
from radio.train.checkpoint import load_checkpoint
from radio.train.data import ImageSource, split_holdout
from radio.train.fidelity import fidelity_batches, measure_fidelity
from radio.train.loop import INITIAL_WEIGHTS
from radio.train.teaching import plan_for

from .common import RESULTS_DIR, Stopwatch, write_json
from .trained import load_trained

__all__ = ["Budget", "run", "train_config"]

MODELS = ("before", "after", "ema")


@dataclass
class Budget:
    steps: int = 240
    batch_size: int = 8
    crops_per_image: int = 4
    seed: int = 0

    @classmethod
    def smoke(cls) -> Budget:
        return cls(steps=2, batch_size=2, crops_per_image=1)


def train_config(budget: Budget, out: str) -> TrainConfig:
    """The trainer's tiny default with this budget (single process, no loader workers)."""
    cfg = TrainConfig()
    cfg.run.steps = budget.steps
    cfg.run.seed = budget.seed
    cfg.run.out = out
    cfg.run.device = "cpu"
    cfg.run.checkpoint_every = max(budget.steps, 1)
    cfg.run.keep_last = 1
    cfg.data.batch_size = budget.batch_size
    cfg.data.num_workers = 0
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(budget.steps // 4, 1))
    cfg.validate()
    return cfg


@torch.no_grad()
def measure_all_resolutions(cfg: TrainConfig, run_dir: Path, budget: Budget) -> dict:
    """{(partition, resolution): {model: {teacher: {"spatial", "summary"}}}} on held-out crops."""
    device = torch.device("cpu")
    trained, slots = load_trained(cfg, run_dir)
    after, ema = trained["after"], trained["ema"]
    before = copy.deepcopy(after)
    before.load_state_dict(load_checkpoint(run_dir / "checkpoints" / INITIAL_WEIGHTS, map_location="cpu"))
    models = {"before": before, "after": after, "ema": ema}
    _, held = split_holdout(ImageSource.from_config(cfg.data.image_dir), cfg.data.holdout)
    patch = after.patch_size
    scores = {}
    for partition, resolutions in (("low", cfg.data.low_resolutions), ("high", cfg.data.high_resolutions)):
        for res in resolutions:
            plans = {n: plan_for(s.teacher, s.cfg, res, patch, high=partition == "high") for n, s in slots.items()}
            batches = fidelity_batches(
                held,
                plans,
                res,
                patch,
                budget.crops_per_image,
                cfg.fidelity.seed,
                cfg.data.crop_scale,
                cfg.data.min_image_side,
            )
            scores[(partition, res)] = {
                "modes": {n: p.mode for n, p in plans.items()},
                "scores": measure_fidelity(models, slots, plans, batches, device),
            }
    return {"scores": scores, "held_out_images": [held.name(i) for i in range(len(held))], "teachers": list(slots)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["resolutions"]
    high = [r for r, p in zip(res, result["partitions"]) if p == "high"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes, ("spatial", "summary")):
        for colour, (name, t) in zip(colours, result["teachers"].items()):
            if t[kind]["after"][0] is None:
                continue
            ax.plot(res, t[kind]["after"], "o-", color=colour, label=f"{name} trained")
            ax.plot(res, t[kind]["before"], "x:", color=colour, alpha=0.6, label=f"{name} initial")
        if high:
            ax.axvspan(min(high) - 4, max(high) + 4, color="0.9", zorder=0, label="high partition")
        ax.set_xticks(res)
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("mean cosine to teacher (held-out)")
        ax.set_title(f"{kind} fidelity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"one student, every teacher, every resolution ({result['budget']['steps']} steps)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print, keep_run: str | Path | None = None
) -> dict:
    """Train with the trainer, measure every resolution, write resolution_consistency.{json,png}.

    ``keep_run``: keep the run directory there (the caller may export and visualise the student);
    by default it is a temporary directory, removed afterwards.
    """
    budget = budget or Budget()
    out_dir = Path(out_dir)
    with Stopwatch() as clock, tempfile.TemporaryDirectory(prefix="radio-exp3-") as tmp:
        run_dir = Path(keep_run) if keep_run is not None else Path(tmp) / "run"
        cfg = train_config(budget, str(run_dir))
        trained = train(cfg, progress=False, log=lambda *a: None)
        run_dir = Path(trained["run_dir"])
        measured = measure_all_resolutions(cfg, run_dir, budget)
    keys = list(measured["scores"])
    teachers = {}
    for name in measured["teachers"]:
        teachers[name] = {
            kind: {m: [measured["scores"][k]["scores"][m][name][kind] for k in keys] for m in MODELS}
            for kind in ("spatial", "summary")
        }
        teachers[name]["view_mode"] = [measured["scores"][k]["modes"][name] for k in keys]
    result = {
        "resolutions": [r for _, r in keys],
        "partitions": [p for p, _ in keys],
        "teachers": teachers,
        "spatial_range_after": {
            n: max(t["spatial"]["after"]) - min(t["spatial"]["after"]) for n, t in teachers.items()
        },
        "min_spatial_gain": min(
            a - b for t in teachers.values() for a, b in zip(t["spatial"]["after"], t["spatial"]["before"])
        ),
        "metric": "mean cosine similarity to the PHI-S-normalised teacher on held-out crops (radio.train.fidelity)",
        "held_out_images": measured["held_out_images"],
        "run_dir": str(run_dir) if keep_run is not None else None,
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, out_dir / "resolution_consistency.json")
    plot(result, out_dir / "resolution_consistency.png")
    for name, t in teachers.items():
        log(f"resolution_consistency: {name} spatial after {[round(v, 3) for v in t['spatial']['after']]}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--steps", type=int, default=Budget.steps)
    args = parser.parse_args(argv)
    run(args.out, Budget(steps=args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
