"""Experiment 5: does DAMP make the student's features robust to corrupted inputs?

DAMP (Trinh et al., NeurIPS 2024) multiplies every weight by its own Gaussian noise during training,
W * (1 + sigma * eps), and is reported to improve robustness to input corruptions. Here students of the
trainer's tiny default are trained alike except ``damp.sigma`` (cosine-annealed, noise per micro-batch),
for several seeds, then measured on held-out crops (96 px) whose *student* view is corrupted while the
teachers see the clean crop::

    spatial_t(c) = mean cos(adaptor_t features(corrupt_c(x)), PHI-S_t(teacher_t(x)))

for c in clean, Gaussian noise (std 0.25), Gaussian blur (radius 3 px) and JPEG (quality 5), averaged
over the three teachers (radio.train.fidelity, the raw student in eval mode: no noise at inference).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import RESULTS_DIR, Stopwatch, write_json
from .trained import CORRUPTIONS, fidelity, heldout_batches, load_trained, train_tiny

__all__ = ["Budget", "markdown", "run"]


@dataclass
class Budget:
    steps: int = 100
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    resolution: int = 96
    crops_per_image: int = 4

    @classmethod
    def smoke(cls) -> Budget:
        return cls(steps=2, sigmas=[0.0, 0.1], seeds=[0], crops_per_image=1)


def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    budget = budget or Budget()
    per_seed = {str(s): {c: [] for c in CORRUPTIONS} for s in budget.sigmas}
    with Stopwatch() as clock, tempfile.TemporaryDirectory(prefix="radio-exp5-") as tmp:
        for seed in budget.seeds:
            for sigma in budget.sigmas:
                cfg = train_tiny(Path(tmp) / f"{sigma}-{seed}", budget.steps, seed, damp={"sigma": sigma})
                models, slots = load_trained(cfg)
                student = {"after": models["after"]}
                plans, batches = heldout_batches(
                    cfg, slots, models["after"].patch_size, budget.resolution, budget.crops_per_image
                )
                for c in CORRUPTIONS:
                    scores = fidelity(student, slots, plans, batches, corruption=c)["after"]
                    per_seed[str(sigma)][c].append(sum(t["spatial"] for t in scores.values()) / len(scores))
                log(
                    f"damp: seed {seed} sigma {sigma}: "
                    + ", ".join(f"{c} {v[-1]:.3f}" for c, v in per_seed[str(sigma)].items())
                )
    mean = {s: {c: sum(v) / len(v) for c, v in cs.items()} for s, cs in per_seed.items()}
    base = str(budget.sigmas[0])
    result = {
        "mean_spatial": mean,
        "per_seed": per_seed,
        "gain_over_sigma0": {s: {c: mean[s][c] - mean[base][c] for c in CORRUPTIONS} for s in per_seed if s != base},
        "seeds_better_than_sigma0": {
            s: {c: sum(a > b for a, b in zip(per_seed[s][c], per_seed[base][c])) for c in CORRUPTIONS}
            for s in per_seed
            if s != base
        },
        "metric": "spatial cosine to the PHI-S-normalised teacher (clean view) on held-out crops, student view "
        "corrupted, mean over the 3 teachers",
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, Path(out_dir) / "damp_robustness.json")
    return result


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"### DAMP (`damp_robustness.json`): {b['resolution']} px, {b['steps']} steps, seeds {b['seeds']}",
        "",
        "| damp.sigma | " + " | ".join(CORRUPTIONS) + " |",
        "|---" * (len(CORRUPTIONS) + 1) + "|",
    ]
    for sigma, values in result["mean_spatial"].items():
        better = result["seeds_better_than_sigma0"].get(sigma)
        cells = [
            f"{values[c]:.4f}" + ("" if better is None else f" ({better[c]}/{len(b['seeds'])})") for c in CORRUPTIONS
        ]
        lines.append(f"| {sigma} | " + " | ".join(cells) + " |")
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
