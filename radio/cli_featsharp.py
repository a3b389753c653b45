"""``radio featsharp train ...``: train a FeatSharp upsampler for one teacher (radio.teachers.featsharp).

Registered into the ``radio`` command's subcommand registry (radio.cli) on import.
"""

from __future__ import annotations

import argparse

from radio.cli import register_subcommand

__all__ = ["featsharp_train_command"]


def featsharp_train_command(
    teacher: str,
    name_or_path: str | None,
    factor: int | str,
    out: str,
    dtype: str = "float32",
    image_dir: str | None = None,
) -> str:
    """The command line that trains the upsampler a config's ``teachers.<name>.featsharp`` points to."""
    parts = ["radio featsharp train", f"--teacher {teacher}"]
    parts += [f"--name-or-path {name_or_path}"] if name_or_path else []
    parts += [f"--dtype {dtype}"] if dtype != "float32" else []
    parts += [f"--factor {factor}"]
    parts += [f"--image-dir {image_dir}"] if image_dir else []
    return " ".join([*parts, f"--out {out}"])


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="featsharp_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train an upsampler (multi-view consistency; tiny teacher + bundled images by default)",
        description="Train a FeatSharp upsampler for one frozen teacher; writes OUT/featsharp.pt, "
        "OUT/checkpoints/, OUT/metrics.jsonl and OUT/loss.png.",
    )
    t.add_argument("--teacher", default="siglip2", choices=["siglip2", "dinov3"], help="teacher kind")
    t.add_argument("--name-or-path", default=None, help="checkpoint (default: the tiny random teacher)")
    t.add_argument("--teacher-seed", type=int, default=0, help="seed of the tiny teacher (default 0, as radio train)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="teacher dtype")
    t.add_argument("--factor", type=int, default=3, help="integer upsampling factor (default 3: 384 -> 1152 px)")
    t.add_argument("--steps", type=int, default=None, help="total steps (default 300; with --resume: the run's)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--image-dir", default=None, help="images (default: the ones bundled with scikit-image)")
    t.add_argument("--holdout", type=int, default=3, help="images kept out of training")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default; 1 suits tiny)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--out", default="runs/featsharp", help="output folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings; --steps)")
    t.add_argument("--stop-after", type=int, default=None, help="end after this step with a checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    from radio.teachers.featsharp.training import FeatSharpTrainConfig, train_featsharp

    cfg = FeatSharpTrainConfig(
        teacher=args.teacher,
        name_or_path=args.name_or_path,
        teacher_seed=args.teacher_seed,
        dtype=args.dtype,
        factor=args.factor,
        steps=300 if args.steps is None else args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        image_dir=args.image_dir,
        holdout=args.holdout,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        out=args.out,
    )
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    train_featsharp(
        cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress, steps=args.steps
    )
    return 0


_EXAMPLES = """examples:
  radio featsharp train --out runs/featsharp          tiny SigLIP2, factor 3, bundled images (CPU, minutes)
  radio featsharp train --teacher siglip2 --name-or-path google/siglip2-giant-opt-patch16-384 \\
      --dtype bfloat16 --factor 3 --steps 9000 --image-dir /data/images --out featsharp/siglip2-g-384-3x
  radio featsharp train --resume --steps 600 --out runs/featsharp
then: radio train --set teachers.siglip2.high_res_mode=featsharp --set teachers.siglip2.featsharp=runs/featsharp
"""

register_subcommand(
    "featsharp", "train a FeatSharp feature upsampler for a teacher (arXiv 2502.16025)", _arguments, _run, _EXAMPLES
)
