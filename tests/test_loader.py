"""Training batches as a pure function of (seed, step, rank): seeks, rank splits, workers, uneven shards, mixing
shards by chunks, each byte read once, samples checked, validation read only as far as it is used."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from prime_scale.config import ConfigError, load_config
from prime_scale.data import loader as loader_module
from prime_scale.data.loader import StreamPlan, train_loader
from prime_scale.data.shards import (
    ShardFormatError, ShardWriter, read_manifest, read_split, read_token_shards, write_manifest, write_token_shards,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.data_path import counting_url, reads  # noqa: E402

SEED, BATCH, SEQ = 5, 8, 16
# three workers on a two-core machine are the point of some tests, not a mistake
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create .* worker processes")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """700 train sequences whose first token is their row id, in shards of uneven sizes (the last one short), and
    a val split of 100 (ids 1000 on)."""
    url = str(tmp_path_factory.mktemp("loader"))
    rows = np.arange(700)[:, None] * np.ones((1, SEQ), dtype=np.int64)
    shards = write_token_shards(rows, url, "train", shard_size_bytes=37 * 1024)
    val = write_token_shards(rows[:100] + 1000, url, "val", shard_size_bytes=37 * 1024)
    write_manifest(url, {"splits": {"train": {"shards": shards}, "val": {"shards": val}}})
    return url, [s["samples"] for s in shards]


def batches(url, start, count, **kw):
    kw = {"seed": SEED, **kw}
    loader, plan = train_loader(url, "train", SEQ, BATCH, start_step=start, max_steps=start + count, **kw)
    out = [(step, tokens) for step, tokens in loader]
    assert [s for s, _ in out] == list(range(start, start + count))
    assert all(t.dtype == torch.int64 and t.shape == (BATCH, SEQ) for _, t in out)
    return [t[:, 0].tolist() for _, t in out], plan


@pytest.fixture(scope="module")
def reference(dataset):
    """200 steps (past an epoch boundary) read in the main process."""
    full, plan = batches(dataset[0], 0, 200)
    assert plan.steps_per_epoch < 200
    return full


def shard_of(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)  # row id -> shard (rows are written in order)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_and_the_start_step_change_nothing(dataset, reference, workers):
    url, _ = dataset
    assert batches(url, 0, 200, num_workers=workers)[0] == reference
    start = 41 + 37 * workers  # mid-group; for 3 workers in the second epoch
    assert batches(url, start, 200 - start, num_workers=workers)[0] == reference[start:]


def test_resume_in_the_main_process_is_a_seek(dataset, reference):
    assert batches(dataset[0], 137, 63)[0] == reference[137:]


def test_an_epoch_sees_each_sample_at_most_once_and_epochs_differ(dataset, reference):
    url, sizes = dataset
    n = StreamPlan(tuple(sizes), 1, 0, BATCH, SEED).steps_per_epoch
    first = [i for b in reference[:n] for i in b]
    second = [i for b in reference[n : 2 * n] for i in b]
    assert len(set(first)) == len(first) == n * BATCH and n * BATCH > 0.95 * sum(sizes)
    assert len(set(second)) == len(second) and first != second  # a new order every epoch
    plan = StreamPlan(tuple(sizes), 1, 0, BATCH, SEED)
    for epoch in (0, 1):  # the chunks cut every shard into disjoint runs that cover it
        covered = sorted((s, a, b) for s, a, b in plan.chunks(epoch))
        for shard, size in enumerate(sizes):
            runs = [(a, b) for s, a, b in covered if s == shard]
            assert runs[0][0] == 0 and runs[-1][1] == size and all(x[1] == y[0] for x, y in zip(runs, runs[1:]))


def test_ranks_read_disjoint_shards_and_agree_on_the_epoch_length_when_shards_divide_unevenly(dataset):
    url, sizes = dataset
    plans = [StreamPlan(tuple(sizes), 3, r, BATCH, seed=SEED) for r in range(3)]
    assert len(sizes) % 3 != 0 or len(set(sizes)) > 1  # uneven on purpose
    assert len({p.steps_per_epoch for p in plans}) == 1
    shards = [set(p.rank_shards(0).tolist()) for p in plans]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set().union(*shards) == set(range(len(sizes)))
    ids = [set(i for b in batches(url, 0, plans[0].steps_per_epoch, world_size=3, rank=r)[0] for i in b)
           for r in range(3)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    which = shard_of(sizes)
    assert all({int(which[i]) for i in rank_ids} <= rank_shards for rank_ids, rank_shards in zip(ids, shards))


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_whole_shards_reproduce_the_grouping_before_chunks(dataset, world_size, rank):
    """shard_chunks=1: groups of shuffle_shards whole shards in the rank's shard order, each permuted, then cut."""
    url, sizes = dataset
    starts = np.cumsum([0] + sizes)
    steps = min(sum(sizes[s] for s in np.random.default_rng([SEED, 0]).permutation(len(sizes))[r::world_size])
                for r in range(world_size)) // BATCH
    expected = []
    for epoch in (0, 1):
        mine = np.random.default_rng([SEED, epoch]).permutation(len(sizes))[rank::world_size]
        stream = []
        for g, i in enumerate(range(0, len(mine), 4)):
            ids = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in mine[i : i + 4]])
            stream += ids[np.random.default_rng([SEED, epoch, rank, g, 1]).permutation(len(ids))].tolist()
        expected += [stream[j * BATCH : (j + 1) * BATCH] for j in range(steps)]
    got, plan = batches(url, 0, 2 * steps, shard_chunks=1, world_size=world_size, rank=rank)
    assert plan.steps_per_epoch == steps and got == expected


def test_chunks_mix_many_shards_into_every_batch(dataset, reference):
    url, sizes = dataset
    which = shard_of(sizes)
    whole, plan = batches(url, 0, 87, shard_chunks=1)
    per_batch = {k: np.mean([len({int(which[i]) for i in b}) for b in run])
                 for k, run in (("chunks", reference[:87]), ("whole", whole))}
    per_group = [len({s for s, _, _ in g}) for g in StreamPlan(tuple(sizes), 1, 0, BATCH, SEED).groups(0)]
    # 20 shards: 5 groups of 4 whole shards; with 8 chunks a shard, a group draws its 32 chunks from 15-18 shards
    assert [len({s for s, _, _ in g}) for g in plan.groups(0)] == [4, 4, 4, 4, 4]
    assert min(per_group[:-1]) >= 12, per_group
    assert per_batch["chunks"] > 6 and per_batch["whole"] < 4, per_batch  # of the 8 samples of a batch


def test_resampled_mode_resumes_exactly_with_workers(dataset):
    url, _ = dataset
    resampled, plan = batches(url, 0, 100, resampled=True)
    assert plan.steps_per_epoch < 100
    assert batches(url, 10, 90, resampled=True)[0] == resampled[10:]
    assert batches(url, 53, 47, resampled=True, num_workers=2)[0] == resampled[53:]
    epoch = [i for b in resampled[: plan.steps_per_epoch] for i in b]
    assert len(set(epoch)) < len(epoch)  # shards drawn with replacement


def test_clear_errors_for_plans(dataset):
    _, sizes = dataset
    with pytest.raises(ValueError, match="cannot feed 64 ranks"):
        StreamPlan(tuple(sizes), 64, 0, 8, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        StreamPlan(tuple(sizes), 2, 0, 10_000, seed=0)
    with pytest.raises(ValueError, match=r"shard_chunks \(0\) must be at least 1"):
        StreamPlan(tuple(sizes), 1, 0, 8, seed=0, shard_chunks=0)
    with pytest.raises(ConfigError, match=r"engine.shard_chunks must be at least 1 \(1 = whole shards\), got 0"):
        load_config(["config=tiny", "engine.shard_chunks=0"])


def test_workers_read_each_shard_byte_once_per_epoch(dataset, tmp_path):
    url, sizes = dataset
    steps = StreamPlan(tuple(sizes), 1, 0, BATCH, SEED).steps_per_epoch
    counted = counting_url(url, str(tmp_path))
    batches(counted, 0, steps, num_workers=3, manifest=read_manifest(url))
    log = reads(str(tmp_path))
    workers = {pid for pid, *_ in log if pid != os.getpid()}
    assert len(workers) == 3  # each read some groups...
    main = [n for pid, _, _, n in log if pid == os.getpid()]
    assert main == [512, 512]  # ...and the main process only the first sample's and the next header
    stride = 1024  # a 512-byte header and 32 bytes of tokens padded to 512
    for shard, size in enumerate(sizes):  # the workers' reads tile every shard's samples exactly once
        path = os.path.join(url, f"train-{shard:06d}.tar")
        runs = sorted((at, at + n) for pid, p, at, n in log if p == path and pid != os.getpid())
        assert runs[0][0] == 0 and runs[-1][1] == size * stride, runs
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])), runs
    total = sum(n for *_, n in log)
    assert total <= sum(os.path.getsize(os.path.join(url, f"train-{s:06d}.tar")) for s in range(len(sizes)))


def test_read_split_reads_only_what_it_returns(dataset, tmp_path):
    url, _ = dataset
    everything = read_token_shards(url, "val")
    first = read_split(counting_url(url, str(tmp_path)), "val", SEQ, limit=50, manifest=read_manifest(url))
    assert first.dtype == np.uint16 and first.shape == (50, SEQ)
    np.testing.assert_array_equal(first, everything[:50])
    log = reads(str(tmp_path))
    assert sum(n for *_, n in log) == 2 * 512 + 50 * 1024  # the layout probe, then just the 50 records
    assert {os.path.basename(p) for _, p, _, n in log} == {"val-000000.tar", "val-000001.tar"}
    np.testing.assert_array_equal(read_split(url, "val"), everything)
    np.testing.assert_array_equal(read_split(url, "val", limit=10_000), everything)
    with pytest.raises(ValueError, match="hold 16 tokens, but seq_len=12"):
        read_split(url, "val", 12)


def test_the_sample_length_must_be_seq_len(dataset):
    url, _ = dataset
    with pytest.raises(ValueError, match=r"hold 16 tokens .* but data.seq_len=12: train with data.seq_len=16"):
        train_loader(url, "train", 12, BATCH, seed=0)


def shards_with(tmp_path, rows, name="train-000000.tar"):
    """A one-shard dataset of the given samples (arrays of any length), written by the data-prep writer."""
    url = str(tmp_path)
    with ShardWriter(url, lambda i: name, 1 << 30) as writer:
        for i, row in enumerate(rows):
            writer.write(f"{i:09d}", {"tokens.u16": np.asarray(row, dtype="<u2").tobytes()})
    write_manifest(url, {"splits": {"train": {"shards": writer.shards}}})
    return url, os.path.join(url, name)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_of_another_length_fails_naming_it(tmp_path, workers):
    rows = [np.full(SEQ, i) for i in range(40)]
    rows[23] = np.full(SEQ + 1, 23)  # shifts every record after it
    url, path = shards_with(tmp_path, rows)
    loader, _ = train_loader(url, "train", SEQ, BATCH, seed=0, max_steps=2, num_workers=workers)
    with pytest.raises(ShardFormatError, match=f"sample 000000023 of {path} holds 17 tokens where the split's "
                                               "samples hold 16 \\(data.seq_len\\)") as failed:
        list(loader)
    # The traceback's frames hold the DataLoader's iterator, in a reference cycle with the test's frame: let it go
    # now. Shut down later by the garbage collector, its worker is not told and takes 5 s to notice.
    traceback.clear_frames(failed.tb)


def test_a_garbled_shard_fails_naming_it(dataset, tmp_path):
    url, sizes = dataset
    garbled = str(tmp_path / "garbled")
    shutil.copytree(url, garbled)
    path = os.path.join(garbled, "train-000003.tar")
    with open(path, "r+b") as f:  # one byte of the name of sample 5's header
        f.seek(5 * 1024 + 3)
        f.write(b"#")
    loader, _ = train_loader(garbled, "train", SEQ, BATCH, seed=0, max_steps=87, shard_chunks=1)
    with pytest.raises(ShardFormatError, match=f"{path}: no valid tar header at byte {5 * 1024} \\(bad checksum\\)"):
        list(loader)


def test_workers_that_would_not_fit_in_shared_memory_are_refused(dataset, monkeypatch, tmp_path):
    url, _ = dataset

    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(loader_module.os, "statvfs", lambda _: Full())
    monkeypatch.setattr(loader_module.os.path, "isdir", lambda _: True)
    with pytest.raises(ValueError, match=r"engine.num_workers=2 keeps up to 3 groups .* 0 MiB free"):
        train_loader(url, "train", SEQ, BATCH, seed=0, num_workers=2)
    train_loader(url, "train", SEQ, BATCH, seed=0, num_workers=0)  # the main process needs none


def test_image_samples_read_alike_whatever_their_label_length(tmp_path):
    """pixels.u8 + a 1- or 2-digit cls: records of one size (payloads pad to 512 bytes), the pixels read as tokens."""
    pixels = np.random.default_rng(0).integers(0, 256, (50, 4 * 4 * 3), dtype=np.uint8)
    url = str(tmp_path)
    with ShardWriter(url, lambda i: f"train-{i:06d}.tar", 20_000) as writer:
        for i, p in enumerate(pixels):
            writer.write(f"{i:09d}", {"pixels.u8": p.tobytes(), "cls": str(i % 13).encode()})
    write_manifest(url, {"splits": {"train": {"shards": writer.shards}}})
    assert len(writer.shards) > 1
    back = read_split(url, "train", 48)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)
    loader, plan = train_loader(url, "train", 48, 4, seed=0, max_steps=12)
    seen = np.concatenate([tokens.numpy() for _, tokens in loader])
    index = {row.tobytes(): i for i, row in enumerate(pixels.astype(np.int64))}
    assert len({index[row.tobytes()] for row in seen}) == len(seen) == 48
