"""Token-sequence WebDataset shards, read and written through fsspec (local dir, memory://, s3://, ...).

Format
------
A split is a set of tar files ``{split}-{index:06d}.tar`` in one directory.  Each sample is a
single tar member ``{key}.tokens.u16`` or ``{key}.tokens.u32`` where ``key = f"{i:09d}"`` is the
sequence's global index within the split (keys continue across shards, so key order = shard order
= the order of the array that was written).  The member's payload is the sequence's tokens as raw
little-endian unsigned integers (``<u2`` when every token < 65536, else ``<u4``), with no header:
the sequence length is ``payload_bytes / itemsize``.

Shards are deterministic byte for byte (mtime 0, uid/gid 0, empty user/group names, mode 0644,
members in key order), so equal inputs give equal sha256 digests.  Each shard is written under a
temporary name and moved into place, so a crash never leaves a partial file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import uuid
from typing import Any, BinaryIO, Iterator

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

MANIFEST_FILENAME = "manifest.json"
_EXT_TO_DTYPE = {"tokens.u16": np.dtype("<u2"), "tokens.u32": np.dtype("<u4")}
_DTYPE_TO_EXT = {v: k for k, v in _EXT_TO_DTYPE.items()}
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this


def _fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def token_dtype(max_token: int) -> np.dtype:
    """The narrowest stored dtype (uint16 or uint32) that holds ``max_token``."""
    if max_token < 0 or max_token >= 2**32:
        raise ValueError(f"token {max_token} does not fit in uint32")
    return np.dtype("<u2") if max_token < 2**16 else np.dtype("<u4")


def _tar_bytes_per_sample(payload_bytes: int) -> int:
    return _BLOCK + -(-payload_bytes // _BLOCK) * _BLOCK


class _HashingWriter:
    """Write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_token_shards(
    sequences: np.ndarray,
    out_url: str,
    split: str,
    shard_size_bytes: int,
    dtype: np.dtype | str | None = None,
) -> list[dict[str, Any]]:
    """Write (N, L) integer tokens as ``{split}-NNNNNN.tar`` shards under ``out_url``.

    ``shard_size_bytes`` is a target: a shard holds as many whole samples as fit (at least one).
    ``dtype`` forces uint16/uint32 (so every split of a dataset shares a format); None picks the
    narrowest from the data.  Shards of this split left over from an earlier, larger write are
    removed afterwards so a reader never mixes old and new data.  Returns per-shard
    ``{name, num_sequences, bytes, sha256}``.
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be (num_sequences, seq_len), got shape {sequences.shape}")
    if not np.issubdtype(sequences.dtype, np.integer):
        raise ValueError(f"sequences must be integers, got {sequences.dtype}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split must be alphanumeric/underscore, got {split!r}")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be > 0, got {shard_size_bytes}")
    num, seq_len = sequences.shape
    if sequences.size and sequences.min() < 0:
        raise ValueError("tokens must be non-negative")
    max_token = int(sequences.max()) if sequences.size else 0
    store = token_dtype(max_token) if dtype is None else np.dtype(dtype).newbyteorder("<")
    if store not in _DTYPE_TO_EXT:
        raise ValueError(f"dtype must be uint16 or uint32, got {store}")
    if max_token >= 2 ** (8 * store.itemsize):
        raise ValueError(f"token {max_token} does not fit in {store}")
    ext = _DTYPE_TO_EXT[store]

    payload = seq_len * store.itemsize
    per_shard = max(1, (shard_size_bytes - 2 * _BLOCK) // _tar_bytes_per_sample(payload))
    fs, root = _fs_path(out_url)
    fs.makedirs(root, exist_ok=True)

    infos: list[dict[str, Any]] = []
    for index, start in enumerate(range(0, num, per_shard)):
        name = f"{split}-{index:06d}.tar"
        final = posixpath.join(root, name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        chunk = sequences[start : start + per_shard].astype(store, copy=False)
        with fs.open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            # Stream mode ("w|") only ever calls write(), so it works on non-seekable remote files.
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for offset, row in enumerate(chunk):
                    data = row.tobytes()
                    tar.addfile(_tar_info(f"{start + offset:09d}.{ext}", len(data)), io.BytesIO(data))
        fs.mv(tmp, final)
        infos.append(
            {"name": name, "num_sequences": len(chunk), "bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}
        )

    written = {info["name"] for info in infos}
    for stale in list_shards(out_url, split):
        if posixpath.basename(stale) not in written:
            fs.rm(stale)
    return infos


def list_shards(url: str, split: str) -> list[str]:
    """Paths (without protocol) of the split's shards, sorted by index."""
    fs, root = _fs_path(url)
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    if not fs.exists(root):
        return []
    paths = [p for p in fs.ls(root, detail=False) if pattern.fullmatch(posixpath.basename(p))]
    return sorted(paths, key=posixpath.basename)


def _open_streams(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with fs.open(path, "rb") as stream:
            yield {"url": fs.unstrip_protocol(path), "stream": stream}


def iter_token_samples(url: str, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` per sample in shard order, decoded with numpy (int64)."""
    fs, _ = _fs_path(url)
    paths = list_shards(url, split)
    for sample in group_by_keys(tar_file_expander(_open_streams(fs, paths))):
        exts = [e for e in _EXT_TO_DTYPE if e in sample]
        if len(exts) != 1:
            raise ValueError(f"sample {sample['__key__']} in {sample['__url__']} has no single tokens.* entry")
        tokens = np.frombuffer(sample[exts[0]], dtype=_EXT_TO_DTYPE[exts[0]]).astype(np.int64)
        yield sample["__key__"], tokens


def read_token_shards(url: str, split: str) -> np.ndarray:
    """All sequences of a split as an int64 (num_sequences, seq_len) array in key order."""
    samples = list(iter_token_samples(url, split))
    if not samples:
        raise FileNotFoundError(f"no {split}-*.tar shards (or no samples) under {url}")
    samples.sort(key=lambda kv: kv[0])
    lengths = {len(tokens) for _, tokens in samples}
    if len(lengths) != 1:
        raise ValueError(f"{split} sequences have differing lengths {sorted(lengths)}")
    return np.stack([tokens for _, tokens in samples])


def write_manifest(url: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` under ``url`` atomically (temp name, then move)."""
    fs, root = _fs_path(url)
    fs.makedirs(root, exist_ok=True)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write_bytes(fs, posixpath.join(root, MANIFEST_FILENAME), data)


def read_manifest(url: str) -> dict[str, Any]:
    """Read ``manifest.json`` under ``url``; FileNotFoundError if there is none."""
    fs, root = _fs_path(url)
    with fs.open(posixpath.join(root, MANIFEST_FILENAME), "rb") as f:
        return json.loads(f.read().decode())
