"""``radio viz IMAGE [--model DIR] [--teachers ...] --out FILE.png``: PCA pictures of feature maps.

Registered into the ``radio`` command's subcommand registry (radio.cli) on import. One panel per
feature map, side by side: the input, the student backbone, each of its adaptors, each teacher;
every map gets its own 3-component PCA (radio.viz.pca_rgb), as in the paper's Figure 2.

``--teachers`` items: ``KIND`` (a randomly initialised tiny teacher of that family, seed 0, which is
what the tiny demo trains against) or ``KIND=NAME_OR_PATH`` (a checkpoint, ``load_teacher``).
"""

from __future__ import annotations

import argparse
import os

from radio.cli import register_subcommand

__all__ = ["parse_teacher_spec"]

KINDS = ("siglip2", "dinov3", "sam3")
# Each network sees the image at about --size on its long side; beyond this, global attention over
# (size / patch)^2 tokens needs tens of GB (100000 px would ask for ~80 GB).
MAX_SIZE = 2048


def parse_teacher_spec(item: str) -> tuple[str, str | None]:
    """``"dinov3"`` -> ("dinov3", None); ``"dinov3=facebook/..."`` -> ("dinov3", "facebook/...")."""
    kind, _, path = item.partition("=")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"--teachers: {item!r} must be KIND or KIND=NAME_OR_PATH with KIND one of {list(KINDS)}")
    if "=" in item and not path.strip():
        raise ValueError(f"--teachers: {item!r} has an empty NAME_OR_PATH")
    return kind, (path.strip() or None)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="image file (jpg, png, ...)")
    p.add_argument("--model", metavar="DIR", help="student folder (RadioModel.save_pretrained / radio export)")
    p.add_argument(
        "--teachers",
        nargs="+",
        default=[],
        metavar="KIND[=PATH]",
        help="teachers to show: siglip2, dinov3, sam3 (tiny, random) or KIND=NAME_OR_PATH (checkpoint)",
    )
    p.add_argument(
        "--size", type=int, default=256, help=f"long side in pixels each network sees (default 256, at most {MAX_SIZE})"
    )
    p.add_argument("--columns", type=int, default=4, help="panels per row (default 4)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture")


def _run(args: argparse.Namespace) -> int:
    from radio.model import RadioModel
    from radio.teachers import load_teacher, tiny_teacher
    from radio.viz import feature_panels, load_image, save_panels

    if args.size <= 0 or args.columns <= 0:
        raise ValueError(f"--size and --columns must be positive, got {args.size} and {args.columns}")
    if args.size > MAX_SIZE:
        raise ValueError(f"--size must be at most {MAX_SIZE} (pixels on the long side), got {args.size}")
    if os.path.isdir(args.out) or not os.path.splitext(args.out)[1]:
        raise ValueError(f"--out must be an image file name such as picture.png, got {args.out!r}")
    specs = [parse_teacher_spec(item) for item in args.teachers]
    if args.model is None and not specs:
        raise ValueError("nothing to show: give --model DIR, --teachers ..., or both")
    image = load_image(args.image)
    model = RadioModel.from_pretrained(args.model) if args.model else None
    teachers = {}
    for kind, path in specs:
        label = kind if path is None else f"{kind} ({path.rstrip('/').split('/')[-1]})"
        if label in teachers:
            raise ValueError(f"--teachers: {label!r} given twice")
        teachers[label] = tiny_teacher(kind) if path is None else load_teacher(kind, path)
    panels = feature_panels(image, model, teachers, long_side=args.size)
    save_panels(panels, args.out, columns=args.columns)
    print(f"wrote {args.out} ({len(panels) - 1} feature maps)")
    return 0


register_subcommand("viz", "PCA-to-RGB pictures of student, adaptor and teacher feature maps", _arguments, _run)
