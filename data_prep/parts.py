"""From work-unit parts to final shards: a job's ``finalize`` promotes the parts its units wrote under the work
area to ``{split}-{index:06d}.tar`` shards, in dataset order, and removes shards of an earlier, larger dataset.
"""

from __future__ import annotations

import posixpath
from typing import Iterable

from data_prep.job import Output
from prime_scale.data.errors import DataPrepFailure
from prime_scale.data.shards import ShardWriter, iter_tar_samples, list_shards
from prime_scale.storage import durable_replace, is_local


def promote_parts(
    out: Output, split: str, parts: list[dict], target_bytes: int, tail: Iterable[tuple[str, dict]] = ()
) -> list[dict]:
    """Turn unit parts (under the work area, in dataset order) into ``{split}-{index:06d}.tar`` shards.

    A part of at least half the target size is moved as it is (no copy); runs of smaller parts, such as each
    unit's last part or a small validation split's parts, are merged sample by sample into shards of the target
    size. ``tail`` samples (made at finalize) follow the last part. Parts stay in the work area until the manifest
    is written, so an interrupted finalize can run again and give the same shards.
    """
    shards: list[dict] = []
    small: list[dict] = []

    def merge_small(extra: Iterable[tuple[str, dict]] = ()) -> None:
        base = len(shards)
        writer = ShardWriter(out.url, lambda k: f"{split}-{base + k:06d}.tar", target_bytes)
        with writer:
            for part in small:
                for key, members in iter_tar_samples(out.fs, out.work("parts", part["name"])):
                    writer.write(key, members)
            for key, members in extra:
                writer.write(key, members)
        shards.extend(writer.shards)
        small.clear()

    for part in parts:
        if part["bytes"] < target_bytes // 2:
            small.append(part)
            continue
        merge_small()
        final = f"{split}-{len(shards):06d}.tar"
        src, dst = out.work("parts", part["name"]), out.path(final)
        if out.fs.exists(src):  # local: a rename, durable (fsync'd) before the manifest names it
            out.fs.copy(src, dst) if not is_local(out.fs) else durable_replace(src, dst)
        if not (out.fs.exists(dst) and out.fs.size(dst) == part["bytes"]):
            raise DataPrepFailure(f"shard part {part['name']} is missing from {out.url}; run with --overwrite")
        shards.append({**part, "name": final})
    merge_small(tail)
    return shards


def remove_stale_shards(out: Output, split: str, keep: int) -> None:
    """Remove ``{split}-*.tar`` with an index >= keep, left by an earlier, larger dataset in the same folder."""
    for path in list_shards(out.url, split):
        if int(posixpath.basename(path)[len(split) + 1 : -4]) >= keep:
            out.fs.rm(path)
