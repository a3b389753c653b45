"""The ``radio`` command line: ``radio train ...``, ``radio export ...`` (and more subcommands).

Subcommands live in a registry: ``register_subcommand(name, help, add_arguments, run)`` adds one
(``add_arguments(parser)`` declares its options, ``run(args) -> int`` executes it). Errors in the
user's input (bad config key, missing folder, unwritable path, ...) print one clear message and exit with status 2;
a run that went wrong (non-finite loss, gradient or weights) or whose directory is locked by
another live run prints why and exits with status 1 (``RADIO_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SUBCOMMANDS", "main", "register_subcommand"]


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    epilog: str | None = None,
) -> None:
    """Add (or replace) the subcommand ``radio <name>`` (``epilog``: text after its --help)."""
    SUBCOMMANDS[name] = Subcommand(help, add_arguments, run, epilog)


# ----------------------------------------------------------------------------------------------
# radio train
# ----------------------------------------------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML config over the defaults (see --list-keys)")
    p.add_argument(
        "--preset",
        choices=["tiny", "c-radiov4"],
        default=None,
        help="start from a preset: tiny (the default demo) or c-radiov4 (real-scale recipe)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=1e-3 --set data.image_dir=/data/images",
    )
    p.add_argument("--steps", type=int, help="schedule length in optimizer steps (run.steps)")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="K",
        help="end after step K as an interruption would (a checkpoint is written)",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (run.out); an existing run gets a -N suffix")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR to its --steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run.device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-keys", action="store_true", help="print every config key --set accepts and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameter counts, per-rank memory (DDP / FSDP) and FLOPs per image, load no weights, and exit",
    )
    p.add_argument(
        "--world-size", type=int, metavar="W", help="ranks to plan for with --dry-run (default: $WORLD_SIZE or 1)"
    )


def _train(args: argparse.Namespace) -> int:
    from radio.train import TrainConfig, apply_overrides, load_config, load_run_config, train, valid_keys
    from radio.train.config import check_runtime, to_toml

    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    if args.resume:
        if args.config or args.preset or args.out:
            raise ValueError("--resume DIR continues that run with its own config; drop --config/--preset/--out")
        cfg = load_run_config(args.resume)
        cfg.run.out = args.resume
    else:
        cfg = TrainConfig.preset(args.preset or "tiny")
        if args.config:
            cfg = load_config(args.config, base=cfg)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.out is not None:
        overrides.append(f"run.out={args.out!r}")
    if args.device is not None:
        overrides.append(f"run.device={args.device!r}")
    cfg = apply_overrides(cfg, overrides)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    if args.dry_run:
        from radio.train.plan import format_plan, plan_run

        world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        print(format_plan(plan_run(cfg, world), cfg))
        return 0
    if args.world_size is not None:
        raise ValueError("--world-size only applies to --dry-run (a run takes its ranks from torchrun)")
    check_runtime(cfg)  # device and kernel backend, before a run directory exists
    result = train(cfg, resume=bool(args.resume), stop_after=args.stop_after, progress=not args.no_progress)
    fidelity = result.get("fidelity")
    if fidelity and not fidelity.get("improved", True):
        print("warning: fidelity did not improve for every teacher", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# radio export
# ----------------------------------------------------------------------------------------------


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run directory written by radio train")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder for RadioModel.from_pretrained")
    p.add_argument("--no-ema", action="store_true", help="export the raw student weights instead of the EMA")
    p.add_argument(
        "--format",
        choices=("radio", "transformers"),
        default="radio",
        help="radio: RadioModel.from_pretrained folder; transformers: a transformers.RadioModel folder "
        "(+ radio_extras.safetensors with the adaptor heads)",
    )


def _export(args: argparse.Namespace) -> int:
    from radio.train import export_run

    path = export_run(args.run, args.out, use_ema=not args.no_ema, format=args.format)
    print(f"exported {'student' if args.no_ema else 'EMA'} weights of {path} to {args.out} ({args.format} format)")
    return 0


# ----------------------------------------------------------------------------------------------
# radio export-onnx
# ----------------------------------------------------------------------------------------------


def _export_onnx_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="a RadioModel.from_pretrained folder")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument(
        "--resolution", required=True, nargs=2, type=int, metavar=("H", "W"), help="input size the graph takes"
    )
    p.add_argument("--batch-size", type=int, default=1, help="example batch traced (default 1)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    p.add_argument("--feature-fmt", default="NLC", choices=("NLC", "NHWC", "NCHW"), help="feature layout")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")


def _export_onnx(args: argparse.Namespace) -> int:
    from radio import RadioModel
    from radio.model.onnx import export_onnx

    model = RadioModel.from_pretrained(args.model)
    try:
        result = export_onnx(
            model,
            args.out,
            *args.resolution,
            batch_size=args.batch_size,
            dynamic_batch=not args.static_batch,
            feature_fmt=args.feature_fmt,
            opset_version=args.opset,
            check=not args.no_check,
        )
    except ImportError as err:  # onnxscript / onnxruntime missing: say which, no traceback
        print(f"radio export-onnx: error: {err} (pip install -e '.[onnx]')", file=sys.stderr)
        return 2
    batch = "B" if not args.static_batch else str(args.batch_size)
    print(
        f"wrote {result.path} (opset {result.opset}): input pixels ({batch}, 3, {args.resolution[0]}, "
        f"{args.resolution[1]}) in [0, 1]"
    )
    for name in result.output_names:
        diff = result.max_abs_diff.get(name)
        print(f"  {name}" + ("" if diff is None else f"   max |onnxruntime - torch| = {diff:.2e}"))
    return 0


_TRAIN_EXAMPLES = """examples:
  radio train                                         the tiny demo (bundled images, tiny teachers, CPU)
  radio train --set data.image_dir=/data/images       your own images (recursive: jpg, png, webp)
  radio train --preset c-radiov4 --set data.image_dir=/data/images
                                                      real teachers (SigLIP2-g, DINOv3-7B, SAM3), 128..1152 px
  radio train --set teachers.dinov3.name_or_path=/ckpt/dinov3 --set teachers.dinov3.dtype=bfloat16
  radio train --steps 1000 --stop-after 200 --out runs/a && radio train --resume runs/a
  torchrun --nproc-per-node 8 -m radio train --preset c-radiov4 --set data.image_dir=/data/images
  radio train --list-keys                             every config key --set accepts
  radio train --preset c-radiov4 --dry-run --world-size 64
                                                      memory per rank and FLOPs, from configs only
  radio data pack /data/images --out /data/shards --shard-size 10000 && radio train --set data.shards=/data/shards
"""

register_subcommand(
    "train", "distil a student from its teachers (METHOD.md §4)", _train_arguments, _train, _TRAIN_EXAMPLES
)
register_subcommand(
    "export", "write a run's EMA student as a RadioModel.from_pretrained folder", _export_arguments, _export
)
register_subcommand(
    "export-onnx",
    "write a saved RadioModel as an ONNX graph at one resolution (checked with onnxruntime)",
    _export_onnx_arguments,
    _export_onnx,
)
import radio.cli_data  # noqa: E402, F401  (registers ``radio data``; imports nothing heavy)
import radio.cli_featsharp  # noqa: E402, F401  (registers ``radio featsharp``)
import radio.cli_viz  # noqa: E402, F401  (registers ``radio viz``; imports nothing heavy)

# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radio", description="C-RADIO-style agglomerative distillation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(
            sub.add_parser(
                name,
                help=command.help,
                description=command.help,
                epilog=command.epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def _run_failures() -> tuple[type[Exception], ...]:
    """Errors of a run that went wrong (imported only when an error is being handled)."""
    from radio.finite import NonFiniteError
    from radio.model.onnx import OnnxCheckError
    from radio.train.runlock import RunLockedError

    return NonFiniteError, OnnxCheckError, RunLockedError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: unwritable or impossible paths, full disks
        if os.environ.get("RADIO_DEBUG"):
            raise
        print(f"radio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except _run_failures() as e:  # a run that went wrong (or is already running)
        if os.environ.get("RADIO_DEBUG"):
            raise
        print(f"radio {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
