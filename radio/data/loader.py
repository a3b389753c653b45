"""Step-indexed training batches from webdataset shards: the trainer's loader for ``data.shards``.

The global batch of micro-step m has B = ``data.batch_size`` positions q; ``data.shard_streams`` = S
streams (radio.data.shards), each serving b = B / S consecutive positions::

    sample (m, q) = element m * b + (q mod b) of stream s = q // b           (accum counts micro-steps)

which depends on neither the number of ranks W nor of DataLoader workers. Rank r owns streams
[r S/W, (r+1) S/W) (the positions [r B/W, (r+1) B/W) it trains on, as with the image folder), and a
DataLoader worker w of n takes every n-th of them: each rank and worker opens only its own shards.
Everything random about a sample besides which image it is (resolution per micro-step, crop, shifts,
CPE uniforms) is the same pure function of (seed, m, q) as for the image folder
(``radio.train.data``), so DDP equals one process where it does for image folders.

Resume is exact: every batch carries its streams' ``StreamState``; the checkpoint stores all S states
(gathered over ranks) and a resumed run -- with any W that divides S, any number of workers -- feeds
every later micro-step the very samples, at the same positions and with the same randomness, that the
uninterrupted run fed it. Corrupt samples are skipped inside their stream (the next sample of that
stream takes the place) and reported by name in ``Batch.skipped``.

Held out for the fidelity measurement: the first ``data.holdout`` samples of the first shard (in
sorted order), never trained on.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from radio.train.data import (
    _TAG_SAMPLE,
    Batch,
    ImageSource,
    StepSampler,
    ViewGeometry,
    cpe_uniforms,
    make_views,
)

from .shards import ShardOrder, ShardStream, StreamState, decode_image, expand_shards, read_samples

__all__ = [
    "HeldOutImages",
    "ShardLoader",
    "ShardViews",
    "expand_shards",
    "held_out_images",
    "num_streams",
    "shard_loader",
    "streams_of_rank",
]


def num_streams(batch_size: int, shard_streams: int) -> int:
    """S: ``data.shard_streams``, or one stream per position of the global batch when it is 0."""
    s = shard_streams or batch_size
    if batch_size % s:
        raise ValueError(f"data.shard_streams={s} must divide data.batch_size={batch_size}")
    return s


def streams_of_rank(streams: int, rank: int, world_size: int) -> list[int]:
    if streams % world_size:
        raise ValueError(
            f"data.shard_streams={streams} must be divisible by the number of ranks {world_size} "
            "(each rank reads whole streams)"
        )
    per = streams // world_size
    return list(range(rank * per, (rank + 1) * per))


class HeldOutImages(ImageSource):
    """A few decoded images kept in memory (the held-out samples of a shard set)."""

    def __init__(self, names: list[str], images: list[np.ndarray]):
        super().__init__(names, bundled=False)
        self.images = images

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def subset(self, indices) -> HeldOutImages:
        return HeldOutImages([self.items[i] for i in indices], [self.images[i] for i in indices])


def held_out_images(shards: list[str], holdout: int, min_side: int) -> tuple[HeldOutImages, frozenset]:
    """(the readable ones among the first ``holdout`` samples of ``shards[0]``, their (0, ordinal) keys)."""
    names, images, keys = [], [], set()
    if holdout:
        for ordinal, key, data in read_samples(shards[0]):
            if ordinal >= holdout:
                break
            keys.add((0, ordinal))
            try:
                images.append(decode_image(data, min_side))
                names.append(f"{shards[0]}/{key}")
            except Exception:
                pass
    return HeldOutImages(names, images), frozenset(keys)


def _identity(item):
    return item


class ShardViews(IterableDataset):
    """Yields, per micro-step in [start, stop), this worker's samples: (m, resolution, partition,
    [(q, name, views, origins, cpe uniforms)], {stream: StreamState dict}, [skipped names])."""

    def __init__(
        self,
        shards: list[str],
        streams: list[int],
        total_streams: int,
        sampler: StepSampler,
        geometry: dict[tuple[str, int], dict[str, ViewGeometry]],
        patch: int,
        crop_scale,
        shift_std: float,
        max_shift: int,
        min_image_side: int,
        buffer: int,
        states: dict[int, dict] | None = None,
        exclude: frozenset = frozenset(),
    ):
        if len(shards) < total_streams:
            raise ValueError(
                f"data.shards: {len(shards)} shard(s) for data.shard_streams={total_streams} streams; "
                "each stream needs at least one shard (lower data.shard_streams or write more, smaller shards)"
            )
        self.shards, self.streams, self.total_streams = shards, streams, total_streams
        self.sampler, self.geometry, self.patch = sampler, geometry, patch
        self.crop_scale, self.shift_std, self.max_shift = tuple(crop_scale), shift_std, max_shift
        self.min_image_side, self.buffer = min_image_side, buffer
        self.states, self.exclude = dict(states or {}), exclude
        self.per_stream = sampler.batch_size // total_streams

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.streams[worker::workers]
        order = ShardOrder(self.shards, self.sampler.seed)
        seed = self.sampler.seed
        streams = {
            s: ShardStream(
                order, s, self.total_streams, seed, self.buffer, self.min_image_side, self.states.get(s), self.exclude
            )
            for s in mine
        }
        for m in range(self.sampler.start, self.sampler.stop):
            resolution, partition = self.sampler.resolution(m)
            geometry = self.geometry[(partition, resolution)]
            samples, skipped = [], []
            for s in mine:
                for t in range(self.per_stream):
                    name, image = streams[s].next_image(skipped)
                    q = s * self.per_stream + t
                    rng = np.random.default_rng([seed, m, q, _TAG_SAMPLE])
                    crops, origins = make_views(
                        image, geometry, self.patch, rng, self.crop_scale, self.shift_std, self.max_shift
                    )
                    views = {k: torch.from_numpy(np.array(v, copy=True)).permute(2, 0, 1) for k, v in crops.items()}
                    samples.append((q, name, views, origins, cpe_uniforms(seed, m, q)))
            states = {s: streams[s].state().to_dict() for s in mine}
            yield m, resolution, partition, samples, states, skipped


class ShardLoader:
    """Iterates ``Batch``es of this rank's positions, merging its workers' parts in order.

    ``state_dict()``: {stream: StreamState dict} of this rank's streams after the last batch taken.
    ``Batch.indices`` holds global batch positions q (a shard sample has no index in a list).
    """

    def __init__(self, dataset: ShardViews, num_workers: int):
        self.dataset = dataset
        self.workers = min(num_workers, len(dataset.streams))
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            generator=torch.Generator(),  # leaves the global torch RNG untouched
            persistent_workers=False,
            prefetch_factor=4 if self.workers > 0 else None,
        )
        self.states = {s: StreamState(**dataset.states.get(s, {})).to_dict() for s in dataset.streams}

    def state_dict(self) -> dict[int, dict]:
        return {s: dict(v) for s, v in self.states.items()}

    def __len__(self) -> int:
        return len(self.dataset.sampler)

    def __iter__(self):
        parts = max(1, self.workers)
        items = iter(self.loader)
        while True:
            chunk = list(itertools.islice(items, parts))
            if not chunk:
                return
            m, resolution, partition = chunk[0][:3]
            if len(chunk) != parts or any(c[0] != m for c in chunk):
                raise RuntimeError(f"data workers out of step at micro-step {m}")
            samples = sorted((s for c in chunk for s in c[3]), key=lambda s: s[0])
            for c in chunk:
                self.states.update(c[4])
            names = list(samples[0][2])
            yield Batch(
                micro_step=m,
                resolution=resolution,
                partition=partition,
                views={k: torch.stack([s[2][k] for s in samples]) for k in names},
                origins={k: torch.tensor([s[3][k] for s in samples], dtype=torch.long) for k in names},
                indices=torch.tensor([s[0] for s in samples], dtype=torch.long),
                cpe_uniforms=torch.from_numpy(np.stack([s[4] for s in samples])),
                skipped=sorted({n for c in chunk for n in c[5]}),
            )


def shard_loader(
    cfg_data,
    seed: int,
    geometry,
    patch: int,
    start: int,
    stop: int,
    rank: int,
    world_size: int,
    states: dict | None,
    exclude: frozenset,
    shards: list[str],
) -> ShardLoader:
    """The trainer's loader for ``data.shards`` over micro-steps [start, stop) (``states``: from a checkpoint)."""
    d = cfg_data
    total = num_streams(d.batch_size, d.shard_streams)
    mine = streams_of_rank(total, rank, world_size)
    sampler = StepSampler(
        1, d.batch_size, d.low_resolutions, d.high_resolutions, d.high_prob, seed, start, stop, rank, world_size
    )
    states = {int(k): v for k, v in (states or {}).items()}
    missing = [s for s in mine if states and s not in states]
    if missing:
        raise ValueError(f"the checkpoint has no data state for stream(s) {missing} (data.shard_streams changed?)")
    dataset = ShardViews(
        shards,
        mine,
        total,
        sampler,
        geometry,
        patch,
        d.crop_scale,
        d.shift_std,
        d.max_shift,
        d.min_image_side,
        d.shuffle_buffer,
        {s: states[s] for s in mine if s in states},
        exclude,
    )
    return ShardLoader(dataset, d.num_workers)
