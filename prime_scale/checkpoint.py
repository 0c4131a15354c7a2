"""Checkpoints of a DeepSpeed run under any fsspec URL, with our own atomic ``latest`` pointer.

Layout under the checkpoint URL::

    latest.json                      {"tag": "step_00001000"}   replaced atomically, only after a complete save
    step_00001000/
        mp_rank_00_model_states.pt   DeepSpeed's own sharded files (model, optimizer, scheduler, client state)
        zero_pp_rank_*_optim_states.pt ...
        rank_00000.pt                our per-rank state: RNG states, EMA shard (torch.save of tensors only)
        prime_manifest.json          written last by rank 0, after every rank finished: the commit marker
    universal/step_00001000/         made on demand when a run resumes on another number of ranks

DeepSpeed's own ``latest`` file is written by rank 0 before the other ranks finish their shards, so we save with
``save_latest=False`` and keep our pointer. A crash at any moment of a save leaves ``latest.json`` on the previous
complete checkpoint. On remote URLs each rank saves into a local staging folder and uploads its files; loading
downloads the tag folder first. Our per-rank files load with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import fsspec
import torch
import torch.distributed as dist

from prime_scale.data.shards import is_local, write_json

LATEST = "latest.json"
MANIFEST = "prime_manifest.json"
UNIVERSAL = "universal"  # DeepSpeed universal conversions of checkpoints, for loading on another world size
_TAG = re.compile(r"step_(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run (missing, partial, other world size or model shape)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@contextlib.contextmanager
def _without_crc32():
    """torch.save spends most of a save computing a CRC32 of every byte (bench/checkpoint.py: 0.57x of a plain
    write with it, 0.86x without), and torch.load never checks it; completeness is what the manifest written last
    guarantees. The global option is restored afterwards."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointStore:
    def __init__(self, url: str, rank: int = 0, world_size: int = 1, keep_last: int = 2, keep_every: int = 0):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every = keep_last, keep_every
        self.local = is_local(self.fs)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # ------------------------------------------------------------------------------------------ reading

    def manifest(self, tag: str) -> Optional[dict]:
        try:
            with self.fs.open(self._path(tag, MANIFEST), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def latest(self) -> Optional[str]:
        """The tag the pointer names, checked to be complete; None when there is no checkpoint yet."""
        try:
            with self.fs.open(self._path(LATEST), "rb") as f:
                tag = json.loads(f.read())["tag"]
        except FileNotFoundError:
            return None
        if self.manifest(tag) is None:
            raise CheckpointError(f"{self.url}/{LATEST} names {tag}, which has no {MANIFEST}: the checkpoint "
                                  "folder was changed by hand; point resume= at a complete checkpoint")
        return tag

    def complete_tags(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        tags = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
        return sorted(t for t in tags if _TAG.fullmatch(t) and self.fs.exists(self._path(t, MANIFEST)))

    # ------------------------------------------------------------------------------------------ saving

    def save(self, engine, step: int, shared: dict, per_rank: dict) -> str:
        """Collective: every rank calls it. ``shared`` goes into DeepSpeed's client state (rank 0's file),
        ``per_rank`` into this rank's own file. Returns the tag."""
        tag = tag_for(step)
        if self.manifest(tag) is not None:
            return tag  # this step is saved already (e.g. a signal right after resuming from it)
        started = time.perf_counter()
        staging = self.root if self.local else tempfile.mkdtemp(prefix="prime_ckpt_")
        if self.rank == 0 and self.local and self.fs.exists(self._path(tag)):
            self.fs.rm(self._path(tag), recursive=True)  # a partial save of this very step, from a crashed run
        _barrier()
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # what ds_to_universal needs to convert it for another world size later (no tensor parallelism here)
        shared = {**shared, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        with _without_crc32():
            engine.save_checkpoint(staging, tag=tag, client_state=shared, save_latest=False)
            torch.save(per_rank, os.path.join(staging, tag, f"rank_{self.rank:05d}.pt"))
        if not self.local:
            self._upload(os.path.join(staging, tag), tag)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()  # every rank's shards are in place
        if self.rank == 0:
            manifest = {"tag": tag, "step": step, "world_size": self.world_size,
                        "zero_stage": engine.zero_optimization_stage(), "saved_at": time.time(),
                        "save_seconds": time.perf_counter() - started, "config": shared.get("config")}
            self._write_json(self._path(tag, MANIFEST), manifest)
            self._write_json(self._path(LATEST), {"tag": tag})
            self._retain(tag)
        _barrier()
        return tag

    def _write_json(self, path: str, data: dict) -> None:
        write_json(self.fs, path, data)

    def _upload(self, local_dir: str, target: str) -> None:
        for folder, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(folder, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                self.fs.makedirs(posixpath.dirname(self._path(target, rel)), exist_ok=True)
                self.fs.put_file(src, self._path(target, rel))

    def _retain(self, newest: str) -> None:
        """Keep the newest ``keep_last`` plus every ``keep_every``-th; drop older ones and stale partial saves."""
        complete = self.complete_tags()
        keep = set(complete[-self.keep_last :]) | {newest}
        if self.keep_every:
            keep |= {t for t in complete if int(_TAG.fullmatch(t).group(1)) % self.keep_every == 0}
        for folder in (self.root, self._path(UNIVERSAL)):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                name = posixpath.basename(path)
                if _TAG.fullmatch(name) and name not in keep:
                    self.fs.rm(path, recursive=True)

    # ------------------------------------------------------------------------------------------ loading

    @contextmanager
    def _local(self, rel: str) -> Iterator[str]:
        """A local folder holding ``rel`` of the store: the store itself on a local disk, else a downloaded copy."""
        if self.local:
            yield self.root
            return
        staging = tempfile.mkdtemp(prefix="prime_ckpt_")
        try:
            self.fs.get(self._path(rel), os.path.join(staging, rel), recursive=True)
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load(self, engine, tag: str, universal: bool = False) -> tuple[dict, Optional[dict]]:
        """Collective. Loads DeepSpeed's state into ``engine``; returns (shared client state, this rank's own
        state). From a universal checkpoint (another world size) there is no own state: RNG streams start anew."""
        manifest = self.manifest(tag)
        if manifest is None:
            raise CheckpointError(f"{self.url}/{tag} is not a complete checkpoint (no {MANIFEST})")
        if not universal and manifest["world_size"] != self.world_size:
            raise CheckpointError(f"{self.url}/{tag} was written by {manifest['world_size']} ranks, this run has "
                                  f"{self.world_size}: load it as a universal checkpoint")
        if manifest["zero_stage"] != engine.zero_optimization_stage():
            raise CheckpointError(f"{self.url}/{tag} was written with ZeRO stage {manifest['zero_stage']}, this run "
                                  f"uses stage {engine.zero_optimization_stage()}: set engine.zero_stage to match")
        folder = posixpath.join(UNIVERSAL, tag) if universal else tag
        with self._local(folder) as local:
            load_dir = os.path.join(local, UNIVERSAL) if universal else local
            path, shared = engine.load_checkpoint(load_dir, tag=tag)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {self.url}/{folder}")
            own = None if universal else torch.load(os.path.join(local, tag, f"rank_{self.rank:05d}.pt"),
                                                    weights_only=True)
        return shared, own

    def rank_state(self, tag: str, rank: int) -> Optional[dict]:
        """Another rank's own state file (rank 0's holds the whole-tensor EMA), or None."""
        try:
            with self.fs.open(self._path(tag, f"rank_{rank:05d}.pt"), "rb") as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None

    def to_universal(self, tag: str) -> None:
        """Convert ``tag`` with DeepSpeed's ds_to_universal into ``universal/{tag}`` (once; rank 0 only)."""
        target = posixpath.join(UNIVERSAL, tag)
        if self.fs.exists(self._path(target, "mp_rank_00_model_states.pt")):
            return
        from deepspeed.checkpoint import ds_to_universal

        with self._local(tag) as local:
            out = tempfile.mkdtemp(prefix="prime_universal_")
            try:
                args = argparse.Namespace(input_folder=os.path.join(local, tag), output_folder=os.path.join(out, tag),
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=False)
                with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it converts
                    ds_to_universal.main(args)
                self._upload(os.path.join(out, tag), target)
            finally:
                shutil.rmtree(out, ignore_errors=True)


def resolve_resume(store: CheckpointStore, resume: str) -> Optional[tuple[CheckpointStore, str]]:
    """Which checkpoint to start from: ``auto`` (the latest, if any), ``never``, or a checkpoint URL
    (``.../step_00001000``, or a checkpoint folder whose latest is taken)."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = store.latest()
        return (store, tag) if tag else None
    url = resume.rstrip("/")
    name = posixpath.basename(url)
    if _TAG.fullmatch(name):
        other = CheckpointStore(posixpath.dirname(url), store.rank, store.world_size, store.keep_last,
                                store.keep_every)
        if other.manifest(name) is None:
            raise CheckpointError(f"resume={resume}: not a complete checkpoint (no {MANIFEST})")
        return other, name
    other = CheckpointStore(url, store.rank, store.world_size, store.keep_last, store.keep_every)
    tag = other.latest()
    if tag is None:
        raise CheckpointError(f"resume={resume}: no checkpoint there (no {LATEST})")
    return other, tag


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
