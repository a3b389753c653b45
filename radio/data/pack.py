"""``radio data pack IMAGE_DIR --out DIR --shard-size N``: an image folder -> webdataset tar shards.

Each image becomes one sample ``KEY.<ext>`` (its bytes unchanged, no re-encoding) plus ``KEY.json``
holding its path relative to IMAGE_DIR; KEY is the image's number in the sorted file list (9
digits). Shards are ``DIR/shard-000000.tar``, ... with N samples each (the last may hold fewer),
written to a temporary name and renamed, so a shard that exists is complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from radio.train.data import find_images

__all__ = ["pack_images"]


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_images(
    image_dir: str | os.PathLike, out: str | os.PathLike, shard_size: int, progress: bool = True, prefix: str = "shard"
) -> list[Path]:
    """Write the images under ``image_dir`` (recursive; jpg, jpeg, png, webp) as shards in ``out``; returns them."""
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"--shard-size must be a positive int, got {shard_size!r}")
    files = find_images(image_dir)
    out = Path(out)
    if out.is_dir() and any(out.glob(f"{prefix}-*.tar")):
        raise ValueError(f"--out {str(out)!r} already holds {prefix}-*.tar shards; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    root, shards, now = Path(image_dir), [], time.time()
    count = (len(files) + shard_size - 1) // shard_size
    bar = tqdm(total=len(files), disable=not progress, desc="pack", unit="img")
    for n in range(count):
        path = out / f"{prefix}-{n:06d}.tar"
        partial = path.with_name(path.name + ".partial")
        with tarfile.open(partial, "w") as tar:
            for i in range(n * shard_size, min((n + 1) * shard_size, len(files))):
                key = f"{i:09d}"
                _add(tar, f"{key}{files[i].suffix.lower()}", files[i].read_bytes(), now)
                meta = {"path": str(files[i].relative_to(root))}
                _add(tar, f"{key}.json", json.dumps(meta).encode(), now)
                bar.update(1)
        os.replace(partial, path)
        shards.append(path)
    bar.close()
    return shards
