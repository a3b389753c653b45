"""Webdataset tar shards: shard lists, per-shard sample reading, and resumable shuffled streams.

The format is the one img2dataset, DataComp and LAION ship: plain ``.tar`` files whose members are
grouped into samples by key, ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``) beside optional
``KEY.json`` / ``KEY.txt``; the key is the member path up to the first ``.`` of its file name, and a
sample is a run of consecutive members sharing a key. Only the image is read (captions are not used).

A **stream** is an infinite, deterministic sequence of samples read from its own shards only::

    epoch e:   P_e = permutation(number of shards, seed (seed, e))      the same on every rank
    stream s:  reads shards P_e[s], P_e[s + S], P_e[s + 2S], ... (S = number of streams), then epoch e + 1
    shuffle:   the raw samples are cut into chunks of ``buffer`` consecutive samples (chunks run on over
               shard and epoch ends); chunk c is emitted in the order permutation(len, seed (seed, s, c))
    filter:    samples without a decodable image of at least ``min_side`` pixels are skipped and
               reported by name ("shard.tar/KEY"), never a crash

Memory: one open shard and one chunk (``buffer`` encoded images) per stream, plus one shard
permutation per epoch in use (int64 per shard): nothing grows with the number of images.

Exact position: ``StreamState`` (epoch, index of the shard in the stream's epoch list, sample
ordinal in that shard, chunk number, samples of the chunk already consumed) says where the chunk
that is being emitted starts and how far it got. Refilling that chunk from there and skipping the
consumed samples continues the stream exactly: this is what a checkpoint stores per stream.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ShardOrder", "ShardStream", "StreamState", "expand_shards", "read_samples", "split_key"]

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Entropy tags (independent of radio.train.data's): the per-epoch shard order, the chunk shuffles.
_TAG_SHARDS, _TAG_CHUNK = 0x5AD001, 0x5AD002

_BRACE = re.compile(r"\{([^{}]*)\}")


# ----------------------------------------------------------------------------------------------
# shard lists
# ----------------------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> [a-000.tar, a-001.tar, a-002.tar]; ``{x,y}`` lists; several braces multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise ValueError(f"data.shards: empty range {{{body}}} in {pattern!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"data.shards: {{{body}}} in {pattern!r} is neither {{LO..HI}} nor {{a,b,...}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for c in choices for out in _expand_braces(head + c + tail)]


def expand_shards(spec: str) -> list[str]:
    """The shard files of ``data.shards``: a folder (its ``*.tar``, sorted), one ``.tar`` file, or a
    brace pattern ``prefix-{000000..000999}.tar``. Every listed shard must exist (ValueError naming it)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data.shards must be a folder, a .tar file or a brace pattern, got {spec!r}")
    if os.path.isdir(spec):
        shards = sorted(str(p) for p in Path(spec).glob("*.tar") if p.is_file())
        if not shards:
            raise ValueError(f"data.shards: folder {spec!r} holds no .tar shards")
        return shards
    shards = _expand_braces(spec)
    for path in shards:
        if not os.path.isfile(path):
            raise ValueError(f"data.shards: shard {path!r} does not exist (from {spec!r})")
    return shards


# ----------------------------------------------------------------------------------------------
# one shard
# ----------------------------------------------------------------------------------------------


def split_key(member: str) -> tuple[str, str]:
    """(key, extension) of a member path: ``dir/abc.001.jpg`` -> ("dir/abc", "001.jpg")."""
    slash = member.rfind("/") + 1
    dot = member.find(".", slash)
    if dot < 0:
        return member, ""
    return member[:dot], member[dot + 1 :].lower()


def read_samples(path: str, start: int = 0) -> Iterator[tuple[int, str, bytes | None]]:
    """(ordinal, key, image bytes or None) of each sample of a shard, from sample ``start`` on.

    Samples before ``start`` are passed over without reading their data. A shard that cannot be read
    (missing, truncated, not a tar) ends with one (ordinal, "#unreadable", None) item: the rest of it
    counts as one skipped sample.
    """
    ordinal, key, image = -1, None, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # the tar module keeps every header it read: keep none
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None and ordinal >= start:
                        yield ordinal, key, image
                    ordinal, key, image = ordinal + 1, k, None
                if ordinal >= start and image is None and ext in SHARD_IMAGE_EXTENSIONS:
                    image = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError):
        if key is not None and ordinal >= start:
            yield ordinal, key, image
        if ordinal + 1 >= start:  # the same place whether earlier samples were read or passed over
            yield ordinal + 1, "#unreadable", None
        return
    if key is not None and ordinal >= start:
        yield ordinal, key, image


def decode_image(data: bytes | None, min_side: int) -> np.ndarray:
    """HxWx3 uint8 from encoded bytes; raises ValueError if absent, undecodable or below ``min_side``."""
    if data is None:
        raise ValueError("sample has no image")
    with Image.open(io.BytesIO(data)) as im:
        image = np.asarray(im.convert("RGB"))
    if min(image.shape[:2]) < min_side:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, below min_image_side={min_side}")
    return image


# ----------------------------------------------------------------------------------------------
# streams
# ----------------------------------------------------------------------------------------------


class ShardOrder:
    """Per-epoch shard permutations, shared by the streams of one process (a few epochs cached)."""

    def __init__(self, shards: Sequence[str], seed: int, cached_epochs: int = 4):
        self.shards, self.seed, self.cached_epochs = list(shards), seed, cached_epochs
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.shards)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= self.cached_epochs:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch, _TAG_SHARDS])
            self._perms[epoch] = rng.permutation(len(self.shards))
        return self._perms[epoch]

    def stream_shards(self, epoch: int, stream: int, num_streams: int) -> np.ndarray:
        """Global shard indices stream ``stream`` reads in ``epoch``, in order (a strided view)."""
        return self.permutation(epoch)[stream::num_streams]


@dataclass
class StreamState:
    """Where the chunk being emitted starts (epoch, shard = index in the stream's epoch list, sample =
    ordinal in that shard), its number, and how many of its samples were consumed."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0
    chunk: int = 0
    consumed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class ShardStream:
    """Stream ``stream`` of ``num_streams`` (module docstring); ``next_image`` yields decoded images.

    ``exclude``: (global shard index, sample ordinal) pairs that are never emitted (the held-out set).
    """

    def __init__(
        self,
        order: ShardOrder,
        stream: int,
        num_streams: int,
        seed: int,
        buffer: int,
        min_side: int,
        state: StreamState | dict | None = None,
        exclude: frozenset[tuple[int, int]] = frozenset(),
    ):
        if not 0 <= stream < num_streams <= len(order):
            raise ValueError(f"stream {stream} of {num_streams} needs at least {num_streams} shards, got {len(order)}")
        if buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {buffer}")
        self.order, self.stream, self.num_streams = order, stream, num_streams
        self.seed, self.buffer, self.min_side, self.exclude = seed, buffer, min_side, exclude
        state = StreamState(**state) if isinstance(state, dict) else (state or StreamState())
        self._start = StreamState(**asdict(state))  # start of the current chunk
        self._chunk: list[tuple[str, bytes | None]] | None = None
        self._cursor: tuple[int, int, int] = (0, 0, 0)  # (epoch, shard, sample) after the chunk

    def state(self) -> StreamState:
        return StreamState(**asdict(self._start))

    def _raw_from(
        self, epoch: int, shard: int, sample: int
    ) -> Iterator[tuple[tuple[int, int, int], str, bytes | None]]:
        """Raw samples from (epoch, shard, sample) on, each with the position just after it."""
        barren: set[int] = set()  # shards read since the last sample: all of them = nothing left to read
        for e in itertools.count(epoch):
            shards = self.order.stream_shards(e, self.stream, self.num_streams)
            for i in range(shard if e == epoch else 0, len(shards)):
                g = int(shards[i])
                path = self.order.shards[g]
                first = sample if (e == epoch and i == shard) else 0
                barren.add(g)
                for ordinal, key, data in read_samples(path, first):
                    if (g, ordinal) in self.exclude:
                        continue
                    barren.clear()
                    yield (e, i, ordinal + 1), f"{os.path.basename(path)}/{key}", data
                if len(barren) == len(self.order):
                    raise RuntimeError(f"stream {self.stream}: no shard holds a sample (all empty or held out)")

    def _fill(self) -> None:
        s = self._start
        chunk, cursor = [], (s.epoch, s.shard, s.sample)
        for position, name, data in itertools.islice(self._raw_from(*cursor), self.buffer):
            chunk.append((name, data))
            cursor = position
        rng = np.random.default_rng([self.seed, self.stream, s.chunk, _TAG_CHUNK])
        self._chunk = [chunk[i] for i in rng.permutation(len(chunk))]
        self._cursor = cursor

    def next_raw(self) -> tuple[str, bytes | None]:
        """The next raw sample (name, image bytes or None), advancing the state."""
        if self._chunk is None:
            self._fill()
        s = self._start
        item = self._chunk[s.consumed]
        s.consumed += 1
        if s.consumed == len(self._chunk):  # chunk done: the next starts where this one ended
            e, i, j = self._cursor
            self._start = StreamState(e, i, j, s.chunk + 1, 0)
            self._chunk = None
        return item

    def next_image(self, skipped: list[str]) -> tuple[str, np.ndarray]:
        """(name, HxWx3 uint8) of the next sample with a readable image; the others' names go to ``skipped``."""
        for _ in range(100_000):
            name, data = self.next_raw()
            try:
                return name, decode_image(data, self.min_side)
            except Exception:  # any decoding problem: skip the sample, report it
                skipped.append(name)
        raise RuntimeError(f"stream {self.stream}: 100000 samples in a row were unreadable or too small")
