"""Webdataset shards: shard lists, the tar reader, resumable streams, the step-indexed loader, packing,
and training from shards (one process; 2 gloo ranks resumed by one process)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radio.cli import main as cli_main
from radio.data.loader import ShardLoader, ShardViews, num_streams, shard_loader, streams_of_rank
from radio.data.pack import pack_images
from radio.data.shards import ShardOrder, ShardStream, StreamState, expand_shards, read_samples, split_key
from radio.train.data import BUNDLED_IMAGES, StepSampler, ViewGeometry, _load_bundled

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_cfg  # noqa: E402


def _png(side=40, value=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _synthetic_shards(folder, shards=6, per_shard=5, corrupt=(), truncate=None) -> list[str]:
    """Small shards of distinct flat images; ``corrupt``: (shard, sample) pairs whose image is garbage;
    ``truncate``: a shard cut in the middle of its data."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(shards):
        members = []
        for i in range(per_shard):
            key = f"s{n:02d}_{i:03d}"
            image = b"not an image" if (n, i) in corrupt else _png(40, 10 * n + i)
            members += [(f"{key}.png", image), (f"{key}.json", b"{}")]
        paths.append(_write_tar(folder / f"shard-{n:06d}.tar", members))
    if truncate is not None:  # cut inside the image data of the shard's next-to-last sample
        with tarfile.open(paths[truncate]) as tar:
            cut = tar.getmember(f"s{truncate:02d}_{per_shard - 2:03d}.png").offset_data + 20
        Path(paths[truncate]).write_bytes(Path(paths[truncate]).read_bytes()[:cut])
    return paths


# ----------------------------------------------------------------------------------------------
# shard lists and the tar reader
# ----------------------------------------------------------------------------------------------


def test_shard_lists_from_a_folder_and_brace_patterns(tmp_path):
    paths = _synthetic_shards(tmp_path / "s", shards=3, per_shard=1)
    assert expand_shards(str(tmp_path / "s")) == paths
    assert expand_shards(str(tmp_path / "s" / "shard-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path / "s" / "shard-00000{0,2}.tar")) == [paths[0], paths[2]]
    assert expand_shards(paths[1]) == [paths[1]]
    with pytest.raises(ValueError, match="does not exist"):
        expand_shards(str(tmp_path / "s" / "shard-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="neither"):
        expand_shards(str(tmp_path / "s" / "shard-{abc}.tar"))
    with pytest.raises(ValueError, match="no .tar shards"):
        expand_shards(str(tmp_path))
    assert split_key("a/b.c/x.y.JPG") == ("a/b.c/x", "y.jpg")


def test_reader_groups_by_key_and_reports_broken_shards(tmp_path):
    path = _write_tar(
        tmp_path / "a.tar",
        [("k1.json", b"{}"), ("k1.jpg", b"J1"), ("k2.txt", b"caption"), ("k3.webp", b"W3"), ("k3.png", b"P3")],
    )
    assert list(read_samples(path)) == [(0, "k1", b"J1"), (1, "k2", None), (2, "k3", b"W3")]
    assert list(read_samples(path, start=2)) == [(2, "k3", b"W3")]
    # a truncated shard ends with one "#unreadable" item, at the same place when resumed past it
    paths = _synthetic_shards(tmp_path / "t", shards=1, per_shard=6, truncate=0)
    items = list(read_samples(paths[0]))
    assert items[-1][1] == "#unreadable" and 0 < len(items) < 7
    last = items[-1][0]
    assert list(read_samples(paths[0], start=last)) == [(last, "#unreadable", None)]
    assert list(read_samples(paths[0], start=last + 1)) == []
    assert list(read_samples(str(tmp_path / "missing.tar"))) == [(0, "#unreadable", None)]


# ----------------------------------------------------------------------------------------------
# streams
# ----------------------------------------------------------------------------------------------


def _take(stream, n):
    skipped = []
    names = [stream.next_image(skipped)[0] for _ in range(n)]
    return names, skipped


def test_a_stream_reads_its_own_shards_once_per_epoch_shuffled(tmp_path):
    paths = _synthetic_shards(tmp_path, shards=6, per_shard=5)
    order = ShardOrder(paths, seed=3)
    streams = [ShardStream(order, s, 2, seed=3, buffer=5, min_side=8) for s in range(2)]  # 3 chunks an epoch
    epoch = [_take(s, 15)[0] for s in streams]  # 3 shards x 5 samples each
    for s, names in enumerate(epoch):
        own = {os.path.basename(paths[g]) for g in order.stream_shards(0, s, 2)}
        assert {n.split("/")[0] for n in names} == own  # only its own shards
        assert len(set(names)) == 15
    assert set(epoch[0]) | set(epoch[1]) == {f"shard-{n:06d}.tar/s{n:02d}_{i:03d}" for n in range(6) for i in range(5)}
    assert epoch[0] != sorted(epoch[0])  # shuffled within the buffer
    assert streams[0].state() == StreamState(epoch=0, shard=2, sample=5, chunk=3, consumed=0)  # after its 3rd shard


def test_stream_resume_is_exact_from_every_position(tmp_path):
    """A stream rebuilt from ``state()`` after k samples continues exactly, for every k (chunk, shard and
    epoch boundaries, a corrupt sample and a truncated shard included), and memory stays bounded."""
    paths = _synthetic_shards(tmp_path, shards=4, per_shard=5, corrupt={(1, 2)}, truncate=3)
    order = ShardOrder(paths, seed=0, cached_epochs=2)
    reference = ShardStream(order, 1, 2, seed=0, buffer=3, min_side=8)
    states, names, skipped = [], [], []
    for _ in range(40):
        states.append(reference.state())
        names.append(reference.next_image(skipped)[0])
        # bounded: one chunk, and per-epoch shard permutations of a few epochs (never a list of samples)
        assert reference._chunk is None or len(reference._chunk) <= 3
        assert len(order._perms) <= 2
    assert any(n.startswith("shard-000001") for n in names) and any(n.startswith("shard-000003") for n in names)
    assert "shard-000001.tar/s01_002" in skipped and "shard-000003.tar/#unreadable" in skipped
    for k in range(0, 40, 3):
        resumed = ShardStream(ShardOrder(paths, seed=0), 1, 2, seed=0, buffer=3, min_side=8, state=states[k].to_dict())
        assert _take(resumed, 40 - k)[0] == names[k:], k
    with pytest.raises(ValueError, match="at least 5 shards"):
        ShardStream(order, 0, 5, seed=0, buffer=3, min_side=8)


# ----------------------------------------------------------------------------------------------
# the step-indexed loader
# ----------------------------------------------------------------------------------------------

GEOMETRY = {("low", 32): {"student": ViewGeometry(32), "ema": ViewGeometry(32)}}


def _views(paths, streams, total, start, stop, workers, states=None, batch=4):
    sampler = StepSampler(1, batch, [32], [], 0.0, seed=5, start=start, stop=stop)
    dataset = ShardViews(paths, streams, total, sampler, GEOMETRY, 16, (0.5, 1.0), 0.5, 2, 8, 3, states)
    loader = ShardLoader(dataset, workers)
    return loader, list(loader)


def test_loader_positions_do_not_depend_on_ranks_workers_or_resume(tmp_path):
    paths = _synthetic_shards(tmp_path, shards=6, per_shard=4, corrupt={(2, 1)})
    total = num_streams(4, 0)
    assert total == 4 and streams_of_rank(4, 1, 2) == [2, 3]
    _, one = _views(paths, list(range(4)), total, 0, 6, workers=2)
    halves = [_views(paths, streams_of_rank(4, r, 2), total, 0, 6, workers=1)[1] for r in (0, 1)]
    for m, batch in enumerate(one):
        assert batch.micro_step == m and batch.indices.tolist() == [0, 1, 2, 3]
        a, b = halves[0][m], halves[1][m]
        assert torch.equal(torch.cat([a.views["student"], b.views["student"]]), batch.views["student"])
        assert torch.equal(torch.cat([a.origins["ema"], b.origins["ema"]]), batch.origins["ema"])
        assert torch.equal(torch.cat([a.cpe_uniforms, b.cpe_uniforms]), batch.cpe_uniforms)
    assert "shard-000002.tar/s02_001" in {n for b in one for n in b.skipped}
    # stop after micro-step 3, resume from the loader's states with 2 "ranks": the same batches
    first, _ = _views(paths, list(range(4)), total, 0, 3, workers=0)
    states = first.state_dict()
    rest = [_views(paths, streams_of_rank(4, r, 2), total, 3, 6, 0, states)[1] for r in (0, 1)]
    for m in range(3, 6):
        merged = torch.cat([rest[0][m - 3].views["student"], rest[1][m - 3].views["student"]])
        assert torch.equal(merged, one[m].views["student"]), m
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        streams_of_rank(4, 0, 3)
    with pytest.raises(ValueError, match="must divide data.batch_size"):
        num_streams(4, 3)
    with pytest.raises(ValueError, match="each stream needs at least one shard"):
        _views(paths[:3], list(range(4)), total, 0, 1, workers=0)


def test_the_trainer_loader_refuses_a_checkpoint_without_its_streams(tmp_path):
    paths = _synthetic_shards(tmp_path, shards=4, per_shard=2)
    cfg = tiny_cfg(tmp_path / "run", batch_size=4)
    with pytest.raises(ValueError, match="no data state for stream"):
        shard_loader(cfg.data, 0, GEOMETRY, 16, 1, 2, 0, 1, {0: StreamState().to_dict()}, frozenset(), paths)


# ----------------------------------------------------------------------------------------------
# packing and training
# ----------------------------------------------------------------------------------------------


def _image_folder(folder, n=8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(BUNDLED_IMAGES[:n]):
        Image.fromarray(_load_bundled(name)).save(folder / f"{i:02d}_{name}.{'jpg' if i % 2 else 'png'}")
    (folder / "zz_broken.jpg").write_bytes(b"definitely not a jpeg")
    return folder


def test_pack_writes_shards_that_hold_every_image(tmp_path, capsys):
    images = _image_folder(tmp_path / "images", n=5)
    assert cli_main(["data", "pack", str(images), "--out", str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    assert "train on them with --set data.shards=" in capsys.readouterr().out
    paths = expand_shards(str(tmp_path / "shards"))
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = [s for p in paths for s in read_samples(p)]
    files = sorted(images.iterdir())
    assert [key for _, key, _ in samples] == [f"{i:09d}" for i in range(6)]
    assert [data for _, _, data in samples] == [f.read_bytes() for f in files]  # bytes unchanged
    with tarfile.open(paths[0]) as tar:
        assert sorted(tar.getnames()) == ["000000000.json", "000000000.png", "000000001.jpg", "000000001.json"]
    assert cli_main(["data", "pack", str(images), "--out", str(tmp_path / "shards"), "--shard-size", "2"]) == 2
    assert "already holds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard-size"):
        pack_images(images, tmp_path / "other", 0)


def _shard_cfg(out, shards, steps=4):
    cfg = tiny_cfg(out, steps=steps, batch_size=4, num_workers=2)
    cfg.data.shards, cfg.data.holdout, cfg.data.shuffle_buffer = str(shards), 1, 3
    cfg.teachers["sam3"].high_res_mode = "resize"  # one view per canvas: 2 ranks == 1 process
    cfg.fidelity.enabled = False
    return cfg


def _losses(run):
    from radio.train.plots import read_metrics

    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in read_metrics(run / "metrics.jsonl")]


def test_two_gloo_ranks_stopped_then_resumed_by_one_process_equal_one_uninterrupted_run(tmp_path):
    """2 ranks train steps 1-2 from shards and stop; 1 process (0 workers) resumes to step 4: the same
    losses and EMA as one process (2 workers) running 1-4; the corrupt image is skipped and counted."""
    from radio.train import load_run_config, save_config, train
    from radio.train.checkpoint import latest_checkpoint, load_checkpoint

    images = _image_folder(tmp_path / "images", n=8)
    pack_images(images, tmp_path / "shards", 2, progress=False)  # 5 shards; the last holds the broken one
    full = train(_shard_cfg(tmp_path / "full", tmp_path / "shards"), progress=False, log=lambda *a: None)
    assert full["skipped_images"] == 1

    save_config(_shard_cfg(tmp_path / "cfg", tmp_path / "shards"), tmp_path / "cfg.toml")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "radio", "train", "--no-progress",
           "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "part"), "--stop-after", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks 2" in proc.stdout
    assert sorted(load_checkpoint(latest_checkpoint(tmp_path / "part"))["data"]["streams"]) == [0, 1, 2, 3]

    resumed = load_run_config(tmp_path / "part")
    resumed.run.out, resumed.data.num_workers = str(tmp_path / "part"), 0
    result = train(resumed, resume=True, progress=False, log=lambda *a: None)
    assert result["step"] == 4 and result["skipped_images"] == 1

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == len(b) == 4
    for step, (ra, rb) in enumerate(zip(a, b), 1):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (step, k)
    ca = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    cb = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert ca["data"] == cb["data"]  # the same stream positions and skipped names
    assert ca["data"]["skipped"] == ["shard-000004.tar/000000008"]
    for k in ca["ema"]:
        torch.testing.assert_close(cb["ema"][k], ca["ema"][k], rtol=1e-4, atol=1e-5)


def test_shard_config_keys_are_validated(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", batch_size=4)
    cfg.data.shards, cfg.data.image_dir = str(tmp_path), str(tmp_path)
    with pytest.raises(ValueError, match="both set"):
        cfg.validate()
    cfg.data.image_dir, cfg.data.shard_streams = None, 3
    with pytest.raises(ValueError, match="shard_streams must be 0 or divide"):
        cfg.validate()
    cfg.data.shard_streams, cfg.data.shuffle_buffer = 2, 0
    with pytest.raises(ValueError, match="shuffle_buffer must be a positive int"):
        cfg.validate()


def test_held_out_and_empty_shards(tmp_path):
    """One-sample shards, the first held out: the stream never emits it (however often its epoch lists
    only that shard); a stream whose shards hold nothing at all is a clear error, not a hang."""
    from radio.data.loader import held_out_images

    paths = _synthetic_shards(tmp_path / "s", shards=5, per_shard=1)
    held, keys = held_out_images(paths, holdout=1, min_side=8)
    assert held.items == [f"{paths[0]}/s00_000"] and held.load(0).shape == (40, 40, 3) and keys == {(0, 0)}
    stream = ShardStream(ShardOrder(paths, seed=0), 0, 4, seed=0, buffer=64, min_side=8, exclude=keys)
    names, _ = _take(stream, 200)
    assert "shard-000000.tar/s00_000" not in names and len(set(names)) == 4
    no_image = _write_tar(tmp_path / "e.tar", [("k0.json", b"{}")])
    assert list(read_samples(no_image)) == [(0, "k0", None)]  # a sample without an image: skipped later
    with pytest.raises(RuntimeError, match="no shard holds a sample"):
        ShardStream(ShardOrder(paths[:1], seed=0), 0, 1, 0, 4, 8, exclude=keys).next_raw()


def test_reading_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    """tracemalloc peak while a stream reads every sample of 2 vs 6 shards of 250 samples: the same (one
    chunk and one tar header at a time; no list of samples or tar members is ever built)."""
    import tracemalloc

    def shards(n, folder):
        folder.mkdir()
        return [
            _write_tar(folder / f"{k}.tar", [(f"{k}_{i:04d}.jpg", bytes(64)) for i in range(250)]) for k in range(n)
        ]

    peaks = []
    for n in (2, 6):
        paths = shards(n, tmp_path / str(n))
        stream = ShardStream(ShardOrder(paths, seed=0), 0, 1, seed=0, buffer=16, min_side=8)
        tracemalloc.start()
        for _ in range(250 * n):
            stream.next_raw()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert stream.state().epoch == 0 and stream.state().shard == n - 1  # read to the last shard's end
    assert peaks[1] < 1.5 * peaks[0] + 50_000, peaks
    # nor per shard: keeping one shard's 250 tar headers (tarfile's habit) would already peak at ~150 kB
    assert peaks[1] < 100_000, peaks
