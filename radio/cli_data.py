"""``radio data pack IMAGE_DIR --out DIR --shard-size N``: write an image folder as webdataset shards.

Registered into the ``radio`` command's subcommand registry (radio.cli) on import; imports nothing
heavy (the work is in radio.data.pack).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radio.cli import register_subcommand


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="write an image folder as webdataset tar shards")
    pack.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (recursive: jpg, jpeg, png, webp)")
    pack.add_argument("--out", required=True, metavar="DIR", help="folder for the shards (new or empty)")
    pack.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="images per shard (default 10000)")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    from radio.data.pack import pack_images

    shards = pack_images(args.image_dir, args.out, args.shard_size, progress=not args.no_progress)
    last = len(shards) - 1
    pattern = str(Path(args.out) / f"shard-{{000000..{last:06d}}}.tar")
    print(f"wrote {len(shards)} shard(s) to {args.out}; train on them with --set data.shards={args.out!r}")
    print(f"  (or the brace pattern data.shards='{pattern}')")
    return 0


register_subcommand("data", "prepare training data: `radio data pack` writes webdataset shards", _arguments, _run)
