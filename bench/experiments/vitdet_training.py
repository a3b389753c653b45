"""Experiment 4: does ViTDet-mode training make windowed inference faithful?

C-RADIOv4 brings back windowed (ViTDet) inference, trained as an augmentation: some training passes run
the student's non-global blocks inside windows, prefix tokens replicated per window. Here two students
of the trainer's tiny default, made windowed-heavy (blocks 0-2 windowed in ViTDet mode, block 3 global;
no LayerScale, so every block weighs fully) are trained alike
except ``student.vitdet_train.prob`` (0: global only; 0.5: half the micro-batches windowed, windows of
2 tokens, "replicate"), then measured on held-out crops of 128 px (8 x 8 tokens: 16 windows of 2 x 2)
in global and in windowed inference ("replicate", and "skip", the official inference convention)::

    spatial_t = mean cos(adaptor_t features, PHI-S_t(teacher_t))   over held-out cells (radio.train.fidelity)

and the numbers are averaged over the three teachers and reported per seed.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import RESULTS_DIR, Stopwatch, write_json
from .trained import fidelity, heldout_batches, load_trained, train_tiny

__all__ = ["Budget", "markdown", "run"]

ARMS = {"global training": 0.0, "ViTDet-mode training": 0.5}
STUDENT = {"global_blocks": [3], "layer_scale": None}
INFERENCE = {"global": None, "windowed replicate": (2, "replicate"), "windowed skip": (2, "skip")}


@dataclass
class Budget:
    steps: int = 150
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    resolution: int = 128
    window: int = 2
    crops_per_image: int = 4

    @classmethod
    def smoke(cls) -> Budget:
        return cls(steps=2, seeds=[0], crops_per_image=1)


def _mean_spatial(scores: dict) -> float:
    values = [t["spatial"] for t in scores.values()]
    return sum(values) / len(values)


def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    budget = budget or Budget()
    inference = {k: (None if v is None else (budget.window, v[1])) for k, v in INFERENCE.items()}
    per_seed: dict = {arm: {k: [] for k in inference} for arm in ARMS}
    per_teacher: dict = {arm: {} for arm in ARMS}
    with Stopwatch() as clock, tempfile.TemporaryDirectory(prefix="radio-exp4-") as tmp:
        for seed in budget.seeds:
            for arm, prob in ARMS.items():
                vitdet = {"prob": prob, "window_sizes": [budget.window], "prefix_mode": "replicate"}
                sections = {"student.vitdet_train": vitdet, "student": {"model": dict(STUDENT)}}
                cfg = train_tiny(Path(tmp) / f"{arm}-{seed}", budget.steps, seed, **sections)
                models, slots = load_trained(cfg)
                student = {"after": models["after"]}
                plans, batches = heldout_batches(
                    cfg, slots, models["after"].patch_size, budget.resolution, budget.crops_per_image
                )
                for mode, window in inference.items():
                    scores = fidelity(student, slots, plans, batches, window=window)["after"]
                    per_seed[arm][mode].append(_mean_spatial(scores))
                    for name, t in scores.items():
                        per_teacher[arm].setdefault(mode, {}).setdefault(name, []).append(t["spatial"])
                log(
                    f"vitdet_training: seed {seed} {arm}: "
                    + ", ".join(f"{m} {v[-1]:.3f}" for m, v in per_seed[arm].items())
                )
    mean = {arm: {m: sum(v) / len(v) for m, v in modes.items()} for arm, modes in per_seed.items()}
    result = {
        "mean_spatial": mean,
        "per_seed": per_seed,
        "per_teacher_mean": {
            arm: {m: {n: sum(v) / len(v) for n, v in t.items()} for m, t in modes.items()}
            for arm, modes in per_teacher.items()
        },
        "windowed_gap": {arm: mean[arm]["global"] - mean[arm]["windowed replicate"] for arm in ARMS},
        "seeds_windowed_better_with_vitdet_training": sum(
            a > b
            for a, b in zip(
                per_seed["ViTDet-mode training"]["windowed replicate"],
                per_seed["global training"]["windowed replicate"],
            )
        ),
        "metric": "spatial cosine to the PHI-S-normalised teacher on held-out crops, mean over the 3 teachers",
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, Path(out_dir) / "vitdet_training.json")
    return result


def markdown(result: dict) -> str:
    modes = list(INFERENCE)
    b = result["budget"]
    lines = [
        f"### ViTDet-mode training (`vitdet_training.json`): {b['resolution']} px, windows of {b['window']}, "
        f"{b['steps']} steps, seeds {b['seeds']}",
        "",
        "| student | " + " | ".join(f"{m} inference" for m in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for arm, values in result["mean_spatial"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{values[m]:.3f}" for m in modes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--steps", type=int, default=Budget.steps)
    args = parser.parse_args(argv)
    result = run(args.out, Budget(steps=args.steps))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
