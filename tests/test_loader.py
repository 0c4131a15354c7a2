"""Training batches as a pure function of (seed, step, rank): seeks, rank splits, workers, uneven shards."""

from __future__ import annotations

import numpy as np
import pytest

from prime_scale.data.loader import StreamPlan, train_loader
from prime_scale.data.shards import write_manifest, write_token_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """700 sequences whose first token is their row id, in shards of uneven sizes (the last one short)."""
    url = str(tmp_path_factory.mktemp("loader"))
    rows = np.arange(700)[:, None] * np.ones((1, 16), dtype=np.int64)
    shards = write_token_shards(rows, url, "train", shard_size_bytes=37 * 1024)
    write_manifest(url, {"splits": {"train": {"shards": shards}}})
    return url, [s["num_sequences"] for s in shards]


def batches(url, start, count, **kw):
    loader, plan = train_loader(url, "train", 16, 8, seed=5, start_step=start, max_steps=start + count, **kw)
    out = [(step, tokens[:, 0].tolist()) for step, tokens in loader]
    assert [s for s, _ in out] == list(range(start, start + count))
    return [ids for _, ids in out], plan


def test_resume_is_a_seek_and_workers_do_not_change_the_order(dataset):
    url, _ = dataset
    full, plan = batches(url, 0, 200)  # past an epoch boundary
    assert plan.steps_per_epoch < 200
    assert batches(url, 137, 63)[0] == full[137:]
    assert batches(url, 0, 200, num_workers=2)[0] == full
    assert batches(url, 41, 50, num_workers=2)[0] == full[41:91]


def test_an_epoch_sees_each_sample_at_most_once_and_epochs_differ(dataset):
    url, sizes = dataset
    full, plan = batches(url, 0, 2 * 87)
    n = plan.steps_per_epoch
    first = [i for b in full[:n] for i in b]
    second = [i for b in full[n : 2 * n] for i in b]
    assert len(set(first)) == len(first) == n * 8 and n * 8 > 0.95 * sum(sizes)
    assert len(set(second)) == len(second) and first != second  # a new order every epoch
    # shuffling mixes shards inside a batch: consecutive ids would mean reading in order
    assert np.mean([np.ptp(b) for b in full[:n]]) > 100


def test_ranks_read_disjoint_shards_and_agree_on_the_epoch_length_when_shards_divide_unevenly(dataset):
    url, sizes = dataset
    plans = [StreamPlan(tuple(sizes), 3, r, 8, seed=5) for r in range(3)]
    assert len(sizes) % 3 != 0 or len(set(sizes)) > 1  # uneven on purpose
    assert len({p.steps_per_epoch for p in plans}) == 1
    shards = [set(p.rank_shards(0).tolist()) for p in plans]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set().union(*shards) == set(range(len(sizes)))
    ids = [set(i for b in batches(url, 0, plans[0].steps_per_epoch, world_size=3, rank=r)[0] for i in b)
           for r in range(3)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_resampled_mode_and_clear_errors(dataset):
    url, sizes = dataset
    resampled, plan = batches(url, 0, 30, resampled=True)
    assert batches(url, 10, 20, resampled=True)[0] == resampled[10:]
    with pytest.raises(ValueError, match="cannot feed 64 ranks"):
        StreamPlan(tuple(sizes), 64, 0, 8, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        StreamPlan(tuple(sizes), 2, 0, 10_000, seed=0)
