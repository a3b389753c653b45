"""Experiment 1: whole-patch shifts stop a student from copying a teacher's fixed-pattern noise.

A ViT teacher's features carry an input-independent term tied to token positions, g(E_pos)
(METHOD.md §4). We give a tiny teacher an explicit one: a fixed random pattern g (T, T, C), one
vector per token position, added to every output::

    y(x) = f(x) + g                        f: tiny DINOv3 features, g ~ N(0, (noise_scale * std_c(f))^2)
    target = PHI-S(y)                      normaliser fitted once on noisy features, then frozen

Two students, same seed, same images, same budget, differ only in the teacher's view: without
shifts the teacher sees the student's crop; with shifts it sees the crop moved by
``p * clip(round(N(0, shift_std)), +-max_shift)`` pixels per axis (the recipe's distribution), and
the spatial loss is ``radio_kernels.shifted_mse`` on the overlap. The student cannot see the shift, so
the best it can do at cell u is the shift-average of the pattern (a blurred g), not g itself.

Measurement on held-out images (unshifted, teacher and student on the same crop)::

    G = PHI-S(f + g) - PHI-S(f)                  the pattern in target space (input independent)
    D(x) = student(x) - PHI-S(f(x))              what the student adds beyond the clean teacher
    noise_reproduced = mean_x <D(x), G> / <G, G> projection coefficient: 1 = the whole pattern
                                                 (its full energy <G, G>), 0 = none of it

``noise_reproduced_ideal_with_shift`` is that coefficient for the optimal shift-blind student, the
blurred pattern B_u = E[G_{u+s} | u+s on the grid] under the shift distribution; ``clean_fidelity_*``
(mean cosine to PHI-S(f), the image-dependent part) shows the shifted student did learn the teacher.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from radio.model import AdaptorSpec
from radio.normalize import PHISNormalizer
from radio.teachers import tiny_teacher
from radio_kernels import shifted_mse

from .common import RESULTS_DIR, ImagePool, Stopwatch, cosine_adamw, tiny_student, write_json

__all__ = ["Budget", "run", "shift_probabilities", "blurred_pattern"]

TEACHER = "teacher"


@dataclass
class Budget:
    steps: int = 400
    batch_size: int = 16
    resolution: int = 96  # 6 x 6 tokens
    eval_crops: int = 64
    noise_scale: float = 1.0  # pattern std / the teacher's per-channel feature std
    shift_std: float = 0.5
    max_shift: int = 2
    lr: float = 2e-3
    seed: int = 0

    @classmethod
    def smoke(cls) -> Budget:
        return cls(steps=3, batch_size=4, eval_crops=4)


def shift_probabilities(shift_std: float, max_shift: int) -> torch.Tensor:
    """P(d) for d = -max_shift..max_shift, d = clip(round(N(0, shift_std)), +-max_shift) (float64)."""
    if shift_std == 0:
        p = torch.zeros(2 * max_shift + 1, dtype=torch.float64)
        p[max_shift] = 1.0
        return p
    edges = torch.arange(-max_shift, max_shift + 2, dtype=torch.float64) - 0.5
    cdf = 0.5 * (1 + torch.erf(edges / (shift_std * math.sqrt(2))))
    cdf[0], cdf[-1] = 0.0, 1.0  # the clip puts both tails on +-max_shift
    return cdf[1:] - cdf[:-1]


def blurred_pattern(pattern: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """B_u = sum_s P(s) [u+s on grid] G_{u+s} / sum_s P(s) [u+s on grid], per axis (axes independent).

    pattern: (T, T, C); probs: P(s) for s = -m..m. The minimiser of the expected shifted MSE at cell u
    for a student that cannot see the shift (the loss only counts cells on the overlap).
    """
    t, m = pattern.shape[0], (probs.numel() - 1) // 2
    weights = torch.zeros(t, t, dtype=torch.float64)  # weights[u, v]: P(target row v | student row u)
    for u in range(t):
        for k, s in enumerate(range(-m, m + 1)):
            if 0 <= u + s < t:
                weights[u, u + s] += probs[k]
    weights = weights / weights.sum(1, keepdim=True)
    g = pattern.double()
    return torch.einsum("uv,xy,vyc->uxc", weights, weights, g).to(pattern.dtype)


def _draw_shifts(n: int, budget: Budget, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) per-axis shifts in patches, clip(round(N(0, shift_std)), +-max_shift)."""
    d = torch.round(torch.randn(n, 2, generator=generator) * budget.shift_std)
    return d.clamp(-budget.max_shift, budget.max_shift).long()


def _crop(canvases: torch.Tensor, origins: torch.Tensor, side: int) -> torch.Tensor:
    return torch.stack([c[:, y : y + side, x : x + side] for c, (y, x) in zip(canvases, origins.tolist())])


class NoisyTeacher:
    """The tiny teacher plus the fixed pattern, and its frozen PHI-S normaliser."""

    def __init__(self, budget: Budget, calibration: torch.Tensor):
        self.teacher = tiny_teacher("dinov3", seed=budget.seed)
        clean = self.teacher(calibration).features  # (B, T, T, C)
        t, c = clean.shape[1], clean.shape[-1]
        gen = torch.Generator().manual_seed(budget.seed + 101)
        std = clean.reshape(-1, c).std(0)
        self.pattern = torch.randn(t, t, c, generator=gen) * std * budget.noise_scale
        self.normalizer = PHISNormalizer(c, freeze_after=1)
        self.normalizer.update(clean + self.pattern)  # fit once and freeze

    @torch.no_grad()
    def targets(self, images: torch.Tensor, noisy: bool = True) -> torch.Tensor:
        f = self.teacher(images).features
        return self.normalizer(f + self.pattern if noisy else f)

    @torch.no_grad()
    def pattern_in_target_space(self) -> torch.Tensor:
        """G = PHI-S(f + g) - PHI-S(f) = g M: the normaliser is affine, so this is input independent."""
        return self.normalizer(self.pattern + self.normalizer.mean.float()) - self.normalizer(
            self.normalizer.mean.float()[None]
        )


def train_student(teacher: NoisyTeacher, pool: ImagePool, budget: Budget, shifts: bool):
    """Train one student on ``teacher``; identical for both arms except the teacher's shifts."""
    p, r = 16, budget.resolution
    margin = budget.max_shift * p
    student = tiny_student([AdaptorSpec(TEACHER, None, teacher.teacher.feature_dim)], seed=budget.seed)
    student.train()
    # Inference-time CPE in both arms: the random table crops of CPE augmentation would also hide
    # absolute positions from the no-shift student; here only the teacher's shift may differ.
    student.cpe.eval()
    optimizer, scheduler = cosine_adamw(student, budget.steps, lr=budget.lr)
    gen = torch.Generator().manual_seed(budget.seed + 7)  # same images and draws in both arms
    losses = []
    for _ in range(budget.steps):
        canvases = pool.canvases(budget.batch_size, r + 2 * margin, gen)
        d = _draw_shifts(budget.batch_size, budget, gen)
        if not shifts:
            d = torch.zeros_like(d)
        base = torch.full((budget.batch_size, 2), margin)
        x_student = _crop(canvases, base, r)
        x_teacher = _crop(canvases, base + p * d, r)
        y = teacher.targets(x_teacher)
        s = student(x_student, feature_fmt="NHWC")[TEACHER].features
        # Student cell u sees canvas patch base/p + u = teacher cell u - d (radio.train.align convention).
        loss = shifted_mse(s, y, -d)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return student.eval(), losses


@torch.no_grad()
def measure(student, teacher: NoisyTeacher, held: torch.Tensor) -> dict:
    """noise_reproduced, clean fidelity and the mean added map E_x[D(x)] on held-out crops."""
    G = teacher.pattern_in_target_space()
    clean = teacher.targets(held, noisy=False)
    s = student(held, feature_fmt="NHWC")[TEACHER].features
    added = s - clean
    rho = (added * G).sum(dim=(1, 2, 3)).mean() / G.square().sum()
    fidelity = F.cosine_similarity(s, clean, dim=-1).mean()
    return {"noise_reproduced": float(rho), "clean_fidelity": float(fidelity), "mean_added": added.mean(0)}


def plot(maps: dict[str, torch.Tensor], path: Path) -> None:
    """The pattern and each student's mean added map, one joint PCA (one space), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radio.viz import pca_rgb

    rgbs = pca_rgb(list(maps.values()))
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.6))
    for ax, (title, _), rgb in zip(axes, maps.items(), rgbs):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("fixed-pattern noise: teacher pattern vs what each student adds (joint PCA -> RGB)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: str | Path = RESULTS_DIR, budget: Budget | None = None, log=print) -> dict:
    """Train both students, measure, write fixed_pattern.json and fixed_pattern.png into ``out_dir``."""
    budget = budget or Budget()
    out_dir = Path(out_dir)
    with Stopwatch() as clock:
        train_pool, held_pool = ImagePool("train"), ImagePool("heldout")
        calibration = train_pool.canvases(64, budget.resolution, torch.Generator().manual_seed(budget.seed + 3))
        teacher = NoisyTeacher(budget, calibration)
        held = held_pool.canvases(budget.eval_crops, budget.resolution, torch.Generator().manual_seed(1234))
        arms = {}
        for shifts in (False, True):
            student, losses = train_student(teacher, train_pool, budget, shifts)
            arms[shifts] = measure(student, teacher, held) | {"final_loss": sum(losses[-10:]) / len(losses[-10:])}
            log(f"fixed_pattern: shifts={shifts}: noise reproduced {arms[shifts]['noise_reproduced']:.3f}")
        G = teacher.pattern_in_target_space()
        probs = shift_probabilities(budget.shift_std, budget.max_shift)
        ideal = float((blurred_pattern(G, probs) * G).sum() / G.square().sum())
    result = {
        "noise_reproduced_with_shift": arms[True]["noise_reproduced"],
        "noise_reproduced_without_shift": arms[False]["noise_reproduced"],
        "noise_reproduced_ideal_with_shift": ideal,
        "clean_fidelity_with_shift": arms[True]["clean_fidelity"],
        "clean_fidelity_without_shift": arms[False]["clean_fidelity"],
        "final_loss_with_shift": arms[True]["final_loss"],
        "final_loss_without_shift": arms[False]["final_loss"],
        "p_no_shift": float(probs[budget.max_shift] ** 2),
        "held_out_images": held_pool.names,
        "budget": asdict(budget),
        "seconds": clock.seconds,
    }
    write_json(result, out_dir / "fixed_pattern.json")
    plot(
        {
            "teacher pattern G": G,
            f"student, no shifts\nreproduces {result['noise_reproduced_without_shift']:.2f} of G": arms[False][
                "mean_added"
            ],
            f"student, shifts\nreproduces {result['noise_reproduced_with_shift']:.2f} of G": arms[True]["mean_added"],
        },
        out_dir / "fixed_pattern.png",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--steps", type=int, default=Budget.steps)
    args = parser.parse_args(argv)
    print(run(args.out, Budget(steps=args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
