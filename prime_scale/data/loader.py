"""Training batches from token shards, as a pure function of (seed, step, rank): resuming is a seek, not a replay.

Epoch e of a split, for rank r:
1. the shards are put in a seeded order (a permutation; in ``resampled`` mode a draw with replacement), and rank r
   takes every world_size-th shard of it, from the r-th on (ranks read disjoint shards);
2. each of the rank's shards is cut into ``shard_chunks`` chunks (contiguous runs of its samples), and the rank's
   chunks are put in an order seeded by (seed, epoch, rank);
3. runs of ``shuffle_shards * shard_chunks`` consecutive chunks make the groups: a group holds ``shuffle_shards``
   shards' worth of samples drawn from up to ``shuffle_shards * shard_chunks`` shards, so a batch mixes that many
   documents' sources even when the shards follow sorted input files. The samples of a group are permuted by a
   seed of (seed, epoch, rank, group);
4. the rank's stream, its groups one after the other, is cut into local batches. Every rank computes, from the
   shard sizes alone, the same number of steps per epoch (the smallest rank's share), so unevenly divided shards
   never make one rank wait for a batch that another will not send; the surplus samples of larger shares sit that
   epoch out.
With ``shard_chunks=1`` the groups are whole shards in the rank's shard order (the loader before chunks).

The batch of micro-step k therefore depends only on the manifest, the seed, the world size, the rank and k, and
after a restart at k the loader yields exactly the batches k, k+1, ... of an uninterrupted run.

Reading. The unit of work is a group. DataLoader workers (``engine.num_workers``) take turns over the groups that
the steps from ``start_step`` on need, in order (worker w of W reads the w-th, (w+W)-th, ... of them), so each
group is read once, by one worker; the main process cuts the batches out of the groups as they arrive (a batch may
span two), so steps arrive in order and do not depend on the number of workers. A resumed run starts with the
group that holds its first sample (the samples of that group before it are read, not yielded). A chunk is one
ranged read of its shard (``shards.read_records``: every sample is a record of the same size) and goes straight
into the group's one array, in the group's permuted order and the shards' dtype (uint16/uint32 tokens, uint8
pixels); a worker allocates that array in shared memory, so handing it to the main process copies nothing. Only
the batch is int64. Memory per rank: num_workers + 1 groups (each ``shuffle_shards`` shards), in shared memory.

Changing the world size changes which rank reads which shard; a run resumed on another number of ranks continues
from the same epoch and fraction of it, not from the very same samples.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prime_scale.data.shards import probe_layout, read_manifest, read_records, split_shards

Chunk = tuple[int, int, int]  # (shard, first sample, end sample)
_TORCH_DTYPES = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32}


@dataclass(frozen=True)
class StreamPlan:
    """Where every sample of every step comes from, for one rank. Pure arithmetic on the shard sizes."""

    shard_samples: tuple[int, ...]
    world_size: int
    rank: int
    batch_size: int  # per rank, per micro-step
    seed: int
    shuffle_shards: int = 4
    resampled: bool = False
    shard_chunks: int = 8

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.batch_size < 1 or self.shuffle_shards < 1 or self.shard_chunks < 1:
            raise ValueError(f"batch_size ({self.batch_size}), shuffle_shards ({self.shuffle_shards}) and "
                             f"shard_chunks ({self.shard_chunks}) must be at least 1")
        if len(self.shard_samples) < self.world_size:
            raise ValueError(
                f"{len(self.shard_samples)} shards cannot feed {self.world_size} ranks (each rank reads its own "
                "shards): prepare the data with a smaller data.shard_size_mb, or train on fewer ranks"
            )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the smallest rank's share of the shards cannot fill one batch of {self.batch_size} samples: "
                "lower the batch size or use fewer ranks"
            )

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.shard_samples)
        rng = self._rng(epoch)
        return rng.integers(0, n, n) if self.resampled else rng.permutation(n)

    def rank_shards(self, epoch: int, rank: Optional[int] = None) -> np.ndarray:
        return self.shard_order(epoch)[self.rank if rank is None else rank :: self.world_size]

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        if self.resampled:  # shard draws vary by epoch: use the expected share, a fixed number for all epochs
            return int(sum(self.shard_samples) // self.world_size // self.batch_size)
        sizes = np.asarray(self.shard_samples)
        return int(min(sizes[self.rank_shards(0, r)].sum() for r in range(self.world_size)) // self.batch_size)

    def chunks(self, epoch: int) -> list[Chunk]:
        """The rank's chunks of an epoch, in their seeded order (whole shards in shard order when shard_chunks=1)."""
        k, sizes = self.shard_chunks, self.shard_samples
        chunks = [(int(s), c * sizes[s] // k, (c + 1) * sizes[s] // k) for s in self.rank_shards(epoch)
                  for c in range(k)]
        chunks = [c for c in chunks if c[2] > c[1]]  # a shard of fewer than k samples has empty chunks
        if k == 1:  # the shard order is already a seeded one
            return chunks
        return [chunks[i] for i in self._rng(epoch, self.rank, 2).permutation(len(chunks))]

    @functools.lru_cache(maxsize=4)
    def groups(self, epoch: int) -> tuple[tuple[Chunk, ...], ...]:
        """The chunks of each of the epoch's groups."""
        chunks, per = self.chunks(epoch), self.shuffle_shards * self.shard_chunks
        return tuple(tuple(chunks[i : i + per]) for i in range(0, len(chunks), per))

    @functools.lru_cache(maxsize=4)
    def group_bounds(self, epoch: int) -> np.ndarray:
        """Where each group starts in the epoch's stream of samples (and, last, the stream's length)."""
        return np.cumsum([0] + [sum(b - a for _, a, b in g) for g in self.groups(epoch)])

    def group_permutation(self, epoch: int, group: int, size: int) -> np.ndarray:
        """Row i of the group, as read, is sample ``permutation[i]`` of its chunks one after the other."""
        return self._rng(epoch, self.rank, group, 1).permutation(size)

    def _runs(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(group, first row, end row) runs of the positions [start, stop) of the epoch's stream. Resampled epochs can
        hold fewer samples than the expected share; their positions wrap around."""
        bounds = self.group_bounds(epoch)
        runs = []
        while start < stop:
            at = start % int(bounds[-1])
            group = int(np.searchsorted(bounds, at, side="right")) - 1
            n = min(stop - start, int(bounds[group + 1]) - at)
            runs.append((group, at - int(bounds[group]), at - int(bounds[group]) + n))
            start += n
        return runs

    def segments(self, step: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(epoch, [(group, first row, end row), ...]): the rows of the groups that make the batch of a micro-step."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return epoch, self._runs(epoch, j * self.batch_size, (j + 1) * self.batch_size)

    def group_sequence(self, start_step: int, stop_step: Optional[int] = None) -> Iterator[tuple[int, int]]:
        """(epoch, group) of the groups the steps [start_step, stop_step) read, in the order they first need them."""
        last, step, per = None, start_step, self.steps_per_epoch
        while stop_step is None or step < stop_step:
            epoch, j = divmod(step, per)
            end = per if stop_step is None else min(per, stop_step - epoch * per)
            for group, _, _ in self._runs(epoch, j * self.batch_size, end * self.batch_size):
                if (epoch, group) != last:
                    last = (epoch, group)
                    yield last
            step = epoch * per + end


class GroupReader:
    """Reads a group (its chunks, ranged reads of regular shards) into one (samples, seq_len) tensor in the shards'
    dtype, in the group's permuted order; in shared memory when asked (a DataLoader worker)."""

    def __init__(self, url: str, names: list[str], seq_len: int):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.paths = [posixpath.join(root.rstrip("/"), n) for n in names]
        self.layout = probe_layout(self.fs, self.paths[0])  # every shard's every record is checked against it
        if self.layout.seq_len != seq_len:
            raise ValueError(f"the training samples of {url} hold {self.layout.seq_len} tokens (the first of "
                             f"{self.paths[0]}), but data.seq_len={seq_len}: train with data.seq_len="
                             f"{self.layout.seq_len}, or prepare the data again with data.seq_len={seq_len}")

    def nbytes(self, samples: int) -> int:
        return samples * self.layout.seq_len * self.layout.dtype.itemsize

    def read(self, chunks: tuple[Chunk, ...], permutation: np.ndarray, shared: bool = False) -> torch.Tensor:
        out = torch.empty((len(permutation), self.layout.seq_len), dtype=_TORCH_DTYPES[self.layout.dtype.itemsize])
        if shared:
            out.share_memory_()  # before writing: empty shared pages, not a copy
        rows, where = out.numpy(), np.empty_like(permutation)
        where[permutation] = np.arange(len(permutation))  # sample q of the chunks goes to row where[q]
        q = 0
        for shard, start, stop in chunks:
            tokens, _ = read_records(self.fs, self.paths[shard], self.layout, start, stop)
            rows[where[q : q + stop - start]] = tokens
            q += stop - start
        return out


class GroupStream(IterableDataset):
    """(epoch, group, samples) of the groups that micro-steps [start_step, max_steps) need, in order; DataLoader
    worker w of W reads the w-th, (w+W)-th, ... of them, and the DataLoader's round robin returns them in order."""

    def __init__(self, plan: StreamPlan, reader: GroupReader, start_step: int, max_steps: Optional[int]):
        self.plan, self.reader = plan, reader
        self.start_step, self.max_steps = start_step, max_steps

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, (epoch, group) in enumerate(self.plan.group_sequence(self.start_step, self.max_steps)):
            if i % workers == worker:
                chunks = self.plan.groups(epoch)[group]
                size = sum(b - a for _, a, b in chunks)
                yield epoch, group, self.reader.read(chunks, self.plan.group_permutation(epoch, group, size),
                                                     shared=info is not None)


class TrainBatches:
    """Iterable of (micro-step, tokens (batch_size, seq_len) int64) for steps start_step, start_step + 1, ...,
    cut in order from the groups that ``groups`` (a DataLoader over a GroupStream) delivers."""

    def __init__(self, plan: StreamPlan, groups: DataLoader, seq_len: int, start_step: int,
                 max_steps: Optional[int], pin_memory: bool):
        self.plan, self.groups, self.seq_len = plan, groups, seq_len
        self.start_step, self.max_steps, self.pin_memory = start_step, max_steps, pin_memory

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        groups = iter(self.groups)
        held, rows = None, None
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            epoch, segments = self.plan.segments(step)
            batch = torch.empty((self.plan.batch_size, self.seq_len), dtype=torch.int64, pin_memory=self.pin_memory)
            out, filled = batch.numpy(), 0
            for group, start, stop in segments:
                if held != (epoch, group):
                    rows = None  # let the finished group go before the next arrives
                    got_epoch, got_group, tensor = next(groups)
                    if (got_epoch, got_group) != (epoch, group):
                        raise RuntimeError(f"the loader read group {got_group} of epoch {got_epoch} where group "
                                           f"{group} of epoch {epoch} was due (micro-step {step})")
                    held, rows = (epoch, group), tensor.numpy()
                    del tensor
                out[filled : filled + stop - start] = rows[start:stop]
                filled += stop - start
            yield step, batch
            step += 1


def shared_memory_check(reader: GroupReader, plan: StreamPlan, num_workers: int, start_step: int,
                        folder: str = "/dev/shm") -> None:
    """Refuse to start workers whose groups cannot fit in shared memory (they would die of SIGBUS mid-run)."""
    if not num_workers or not os.path.isdir(folder):
        return
    epoch = start_step // plan.steps_per_epoch
    group = reader.nbytes(int(np.diff(plan.group_bounds(epoch)).max()))
    need, stat = (num_workers + 1) * group, os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise ValueError(f"engine.num_workers={num_workers} keeps up to {num_workers + 1} groups of "
                         f"{group / 2**20:.0f} MiB ({need / 2**20:.0f} MiB) in shared memory, but {folder} has "
                         f"{free / 2**20:.0f} MiB free: lower engine.num_workers (0 reads in the main process) or "
                         "engine.shuffle_shards, or give the machine more shared memory (docker run --shm-size)")


def train_loader(
    url: str, split: str, seq_len: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
    start_step: int = 0, max_steps: Optional[int] = None, num_workers: int = 0, shuffle_shards: int = 4,
    resampled: bool = False, manifest: Optional[dict] = None, shard_chunks: int = 8,
) -> tuple[TrainBatches, StreamPlan]:
    """An iterable of (micro-step, tokens (batch_size, seq_len) int64) for this rank, from micro-step
    ``start_step`` on (to ``max_steps``, or forever), and its plan. ``num_workers`` DataLoader processes read the
    groups ahead (one group each); with 0 the main process reads each group when its first step comes."""
    manifest = manifest if manifest is not None else read_manifest(url)
    shards = split_shards(manifest, split)
    plan = StreamPlan(tuple(n for _, n in shards), world_size, rank, batch_size, seed, shuffle_shards, resampled,
                      shard_chunks)
    reader = GroupReader(url, [name for name, _ in shards], seq_len)
    shared_memory_check(reader, plan, num_workers, start_step)
    groups = DataLoader(GroupStream(plan, reader, start_step, max_steps), batch_size=None, num_workers=num_workers,
                        prefetch_factor=1 if num_workers else None, persistent_workers=False)
    return TrainBatches(plan, groups, seq_len, start_step, max_steps, torch.cuda.is_available()), plan
