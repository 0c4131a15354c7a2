"""Training batches from token shards, as a pure function of (seed, step, rank): resuming is a seek, not a replay.

Epoch e of a split:
1. the shards are put in a seeded order (a permutation; in ``resampled`` mode a draw with replacement);
2. rank r takes every world_size-th shard of that order, from the r-th on (ranks read disjoint shards);
3. the rank's shards are read in groups of ``shuffle_shards``; the samples of a group are permuted by a seed made
   of (seed, epoch, rank, group), which mixes documents from several shards inside every batch;
4. the rank's stream of samples is cut into local batches. Every rank computes, from the shard sizes alone, the
   same number of steps per epoch (the smallest rank's share), so unevenly divided shards never make one rank
   wait for a batch that another will not send; the surplus samples of larger shares sit that epoch out.

The batch of micro-step k therefore depends only on the manifest, the seed, the world size, the rank and k, and
after a restart at k the loader yields exactly the batches k, k+1, ... of an uninterrupted run. Loader workers
take turns over steps (worker w of W makes steps start+w, start+w+W, ...) and each loads the groups it needs, so
the DataLoader's round-robin gives back the steps in order.

Changing the world size changes which rank reads which shard; a run resumed on another number of ranks continues
from the same epoch and fraction of it, not from the very same samples.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prime_scale.data.shards import iter_tar_samples, read_manifest, sample_tokens


def split_shards(manifest: dict, split: str) -> list[tuple[str, int]]:
    """(file name, samples) of each shard of a split, in manifest order."""
    if split not in manifest.get("splits", {}):
        raise ValueError(f"the dataset has no split {split!r} (it has {', '.join(manifest.get('splits', {}))})")
    # synthetic (Markov) manifests say num_sequences, batch-job manifests say samples
    return [(s["name"], int(s.get("samples", s.get("num_sequences", 0)))) for s in manifest["splits"][split]["shards"]]


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

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.batch_size < 1 or self.shuffle_shards < 1:
            raise ValueError("batch_size and shuffle_shards must be at least 1")
        if len(self.shard_samples) < self.world_size:
            raise ValueError(
                f"{len(self.shard_samples)} shards cannot feed {self.world_size} ranks (each rank reads its own "
                "shards): prepare the data with a smaller data.shard_size_mb, or train on fewer ranks"
            )
        steps = self.steps_per_epoch
        if steps < 1:
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

    @property
    def steps_per_epoch(self) -> int:
        if self.resampled:  # shard draws vary by epoch: use the expected share, a fixed number for all epochs
            return int(sum(self.shard_samples) // self.world_size // self.batch_size)
        sizes = np.asarray(self.shard_samples)
        return int(min(sizes[self.rank_shards(0, r)].sum() for r in range(self.world_size)) // self.batch_size)

    def groups(self, epoch: int) -> list[np.ndarray]:
        shards = self.rank_shards(epoch)
        return [shards[i : i + self.shuffle_shards] for i in range(0, len(shards), self.shuffle_shards)]

    def group_permutation(self, epoch: int, group: int, size: int) -> np.ndarray:
        return self._rng(epoch, self.rank, group, 1).permutation(size)

    def locate(self, step: int) -> tuple[int, list[tuple[int, int]]]:
        """(epoch, [(group, offset in the group's permuted order), ...]) of the samples of a micro-step."""
        epoch, j = divmod(step, self.steps_per_epoch)
        sizes = np.asarray(self.shard_samples)
        group_sizes = [int(sizes[g].sum()) for g in self.groups(epoch)]
        bounds = np.cumsum([0] + group_sizes)
        positions = np.arange(j * self.batch_size, (j + 1) * self.batch_size)
        if positions[-1] >= bounds[-1]:  # resampled epochs can hold fewer samples than the expected share
            positions = positions % bounds[-1]
        group = np.searchsorted(bounds, positions, side="right") - 1
        return epoch, list(zip(group.tolist(), (positions - bounds[group]).tolist()))


class ShardReader:
    """Reads whole shards of token samples (tokens.u16/u32, or image pixels.u8) into (samples, seq_len) int64."""

    def __init__(self, url: str, names: list[str], seq_len: int):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.paths = [posixpath.join(root.rstrip("/"), n) for n in names]
        self.seq_len = seq_len

    def read(self, shard: int) -> np.ndarray:
        rows = []
        for key, members in iter_tar_samples(self.fs, self.paths[shard]):
            tokens = sample_tokens(f"{key} of {self.paths[shard]}", members)
            if len(tokens) < self.seq_len:
                raise ValueError(f"sample {key} of {self.paths[shard]} holds {len(tokens)} tokens, fewer than "
                                 f"data.seq_len={self.seq_len}")
            rows.append(tokens[: self.seq_len])
        return np.stack(rows)


class TokenBatches(IterableDataset):
    """Yields (step, tokens (B, seq_len) int64) for micro-steps start, start+1, ... (workers take turns)."""

    def __init__(self, plan: StreamPlan, reader: ShardReader, start_step: int = 0, max_steps: Optional[int] = None):
        self.plan, self.reader = plan, reader
        self.start_step, self.max_steps = start_step, max_steps

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cached: tuple[tuple[int, int], np.ndarray] | None = None
        step = self.start_step + worker
        while self.max_steps is None or step < self.max_steps:
            epoch, where = self.plan.locate(step)
            rows = []
            for group, offset in where:
                if cached is None or cached[0] != (epoch, group):
                    shards = self.plan.groups(epoch)[group]
                    samples = np.concatenate([self.reader.read(int(s)) for s in shards])
                    cached = ((epoch, group), samples[self.plan.group_permutation(epoch, group, len(samples))])
                rows.append(cached[1][offset])
            yield step, torch.from_numpy(np.stack(rows))
            step += workers


def train_loader(
    url: str, split: str, seq_len: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
    start_step: int = 0, max_steps: Optional[int] = None, num_workers: int = 0, shuffle_shards: int = 4,
    resampled: bool = False, manifest: Optional[dict] = None,
) -> tuple[DataLoader, StreamPlan]:
    """A DataLoader of (step, tokens) for this rank, starting at micro-step ``start_step``."""
    manifest = manifest if manifest is not None else read_manifest(url)
    shards = split_shards(manifest, split)
    plan = StreamPlan(tuple(n for _, n in shards), world_size, rank, batch_size, seed, shuffle_shards, resampled)
    dataset = TokenBatches(plan, ShardReader(url, [name for name, _ in shards], seq_len), start_step, max_steps)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)
    return loader, plan
