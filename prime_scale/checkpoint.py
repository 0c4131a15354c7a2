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
complete checkpoint, a power loss or node crash too: on a local disk every rank fsyncs the files it wrote and their
folders before the barrier after which rank 0 writes the manifest, and the manifest and ``latest.json`` are each
written durably (temporary file, fsync, rename, fsync of the folder: ``prime_scale.storage``), so the pointer
never names bytes that are not on the disk (bench/checkpoint.py measures what the fsyncs cost). On remote URLs
each rank saves into a local staging folder and uploads its files (a finished PUT is durable); loading
downloads the tag folder first. Every file is loaded without running code from it: ``safe_load`` and
``verify_folder`` below (docs/engine.md, "Trust"). A universal conversion is complete once its own
``prime_manifest.json`` is written, after its files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import posixpath
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Optional, Union

import fsspec
import torch
import torch.distributed as dist

from prime_scale.storage import fsync_dir, fsync_tree, is_local, write_json

LATEST = "latest.json"
MANIFEST = "prime_manifest.json"
UNIVERSAL = "universal"  # DeepSpeed universal conversions of checkpoints, for loading on another world size
_TAG = re.compile(r"step_(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run (missing, partial, other world size or model shape)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle asks for a type or function outside the allowlist (see ``safe_load``)."""


# ---------------------------------------------------------------------------------------------- loading safely
# A .pt file is a pickle, and a pickle can call any function while it is loaded. Every checkpoint file is loaded
# with torch.load(weights_only=True): torch's restricted unpickler (tensors, containers, numbers) plus the few
# DeepSpeed types of deepspeed_types(). Where DeepSpeed reads files itself (engine.load_checkpoint, its universal
# loader, ds_to_universal, zero_to_fp32: all weights_only=False), verify_folder first parses every file it will read
# with the restricted unpickler, and weights_only_engine switches the engine's own loads to it.


def deepspeed_types() -> list:
    """The non-torch types DeepSpeed 0.19's checkpoint files hold, found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` over ZeRO 0-3, fp32 and bf16, with EMA, and their
    universal conversions: the loss scaler (its state only: no code of its own runs when it is rebuilt), the
    ZeRO stage enum and the namedtuple that addresses a parameter's slice of a flat partition."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates on stdout; a CLI's stdout is for its report
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(f: Union[str, os.PathLike, BinaryIO], map_location: Any = "cpu", mmap: bool = False,
              name: str = "") -> Any:
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's own types allowed besides torch's.
    ``name`` says which file it is in the error (default: the path)."""
    name = name or str(f)
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message names the global the file wanted ("... unsupported GLOBAL posix.system ...") among advice
        # to allow it, which is for files one trusts: only that sentence is kept
        wanted = next((part.strip().rstrip(".") for part in str(e).split("\n\n") if "global" in part.lower()),
                      "an unknown type")
        raise UnsafeCheckpointError(
            f"refused to load {name}: its pickle asks for something other than tensors and DeepSpeed's checkpoint "
            f"types, so loading it could run code: {wanted[:300]}. Use checkpoints only from where you trust, and "
            "never allow such a file by hand") from None


def verify_folder(folder: str) -> int:
    """Parse every ``.pt`` file under ``folder`` with the restricted unpickler (tensor data memory-mapped, not
    read) before anything loads them unrestricted; UnsafeCheckpointError on the first that asks for more.
    Returns the number of files checked."""
    checked = 0
    for root, _, files in os.walk(folder):
        for file in sorted(files):
            if not file.endswith(".pt"):
                continue
            path = os.path.join(root, file)
            try:
                safe_load(path, mmap=True)
            except RuntimeError as e:
                if isinstance(e, UnsafeCheckpointError) or "mmap" not in str(e):
                    raise
                safe_load(path)  # a file in torch's legacy (non-zip) format cannot be memory-mapped
            checked += 1
    return checked


def weights_only_engine(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with :func:`safe_load` (its TorchCheckpointEngine loads with
    ``weights_only=False``): only the ``load`` method of the engine's own checkpoint engine object changes."""
    ckpt_engine = engine.checkpoint_engine
    ckpt_engine.load = lambda path, map_location=None: safe_load(path, map_location=map_location)


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
        own = os.path.join(staging, tag, f"rank_{self.rank:05d}.pt")
        # The files this rank writes: DeepSpeed writes every shard through its checkpoint engine's save(state_dict,
        # path), which is wrapped for the call to note the paths (an instance attribute over the method, removed after)
        written = [own]
        writer = getattr(engine, "checkpoint_engine", None) if self.local else None
        shadowed = writer.__dict__.get("save") if writer is not None else None
        if writer is not None:
            def noting_save(state_dict, path, _save=writer.save):
                written.append(path)
                return _save(state_dict, path)

            writer.save = noting_save
        try:
            with _without_crc32():
                engine.save_checkpoint(staging, tag=tag, client_state=shared, save_latest=False)
                torch.save(per_rank, own)
        finally:
            if writer is not None:
                if shadowed is None:
                    del writer.save
                else:
                    writer.save = shadowed
        if self.local:
            # On the disk before the barrier after which rank 0 commits the manifest: this rank's own files (on a
            # shared filesystem fsync flushes only what this node wrote; an engine without a checkpoint engine to
            # note them: the whole tag folder), their folders, and the tag folder's entry in the store's folder
            fsync_tree(self._path(tag), files=written if writer is not None else None)
            fsync_dir(self.root)
        else:  # each file is one PUT, durable once it returns
            self._upload(os.path.join(staging, tag), tag)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()  # every rank's shards are in place, and on the disk
        if self.rank == 0:
            manifest = {"tag": tag, "step": step, "world_size": self.world_size,
                        "zero_stage": engine.zero_optimization_stage(), "saved_at": time.time(),
                        "save_seconds": time.perf_counter() - started, "config": shared.get("config")}
            self._write_json(self._path(tag, MANIFEST), manifest)  # durable before the pointer names it
            self._write_json(self._path(LATEST), {"tag": tag})
            self._retain(tag)
        _barrier()
        return tag

    def _write_json(self, path: str, data: dict) -> None:
        """Atomic everywhere; durable on a local disk (fsync of the file, rename, fsync of its folder)."""
        write_json(self.fs, path, data)

    def _upload(self, local_dir: str, target: str) -> None:
        """Copy a local folder to ``target`` of the store: one PUT per file on an object store (durable once it
        returns); on a local disk the copies and their folders are fsync'd afterwards."""
        for folder, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(folder, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                self.fs.makedirs(posixpath.dirname(self._path(target, rel)), exist_ok=True)
                self.fs.put_file(src, self._path(target, rel))
        if self.local:
            fsync_tree(self._path(target))
            fsync_dir(posixpath.dirname(self._path(target)))

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
        """A local folder holding ``rel`` of the store: the store itself on a local disk, else a downloaded copy.
        Every .pt file under ``rel`` is verified first (verify_folder): whatever reads the folder then, DeepSpeed
        included, meets no pickle that could run code."""
        if self.local:
            verify_folder(self._path(rel))
            yield self.root
            return
        staging = tempfile.mkdtemp(prefix="prime_ckpt_")
        try:
            self.fs.get(self._path(rel), os.path.join(staging, rel), recursive=True)
            verify_folder(os.path.join(staging, rel))
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
            weights_only_engine(engine)
            path, shared = engine.load_checkpoint(load_dir, tag=tag)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {self.url}/{folder}")
            own = None if universal else safe_load(os.path.join(local, tag, f"rank_{self.rank:05d}.pt"))
        return shared, own

    def rank_state(self, tag: str, rank: int) -> Optional[dict]:
        """Another rank's own state file (rank 0's holds the whole-tensor EMA), or None."""
        try:
            with self.fs.open(self._path(tag, f"rank_{rank:05d}.pt"), "rb") as f:
                return safe_load(io.BytesIO(f.read()), name=f"{self.url}/{tag}/rank_{rank:05d}.pt")
        except FileNotFoundError:
            return None

    def to_universal(self, tag: str) -> None:
        """Convert ``tag`` with DeepSpeed's ds_to_universal into ``universal/{tag}`` (once; rank 0 only). The
        conversion is complete when its own manifest, written last, is there: an interrupted one is made again."""
        target = posixpath.join(UNIVERSAL, tag)
        if self.fs.exists(self._path(target, MANIFEST)):
            return
        from deepspeed.checkpoint import ds_to_universal

        with self._local(tag) as local:
            out = tempfile.mkdtemp(prefix="prime_universal_")
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it converts
                    ds_to_universal.main(universal_arguments(os.path.join(local, tag), os.path.join(out, tag)))
                self._upload(os.path.join(out, tag), target)
                self._write_json(self._path(target, MANIFEST), {"tag": tag, "universal_of": self._path(tag)})
            finally:
                shutil.rmtree(out, ignore_errors=True)


def universal_arguments(input_folder: str, output_folder: str) -> argparse.Namespace:
    """What DeepSpeed's ``ds_to_universal.main`` reads from its command line (a script's ``main``, not an API:
    tests/test_private_apis.py checks these names against its parser at the pinned version). One worker each: the
    conversion runs on rank 0 while the others wait, and the models here have no tensor-parallel slices to merge."""
    return argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)


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
