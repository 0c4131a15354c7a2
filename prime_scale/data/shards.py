"""WebDataset tar shards, written and read through fsspec (local dir, memory://, s3://, gs://, ...).

Format
------
A split is a set of tar files ``{split}-{index:06d}.tar`` in one directory. A sample is a group of tar members
sharing a key (the WebDataset convention); keys sort in dataset order. Token samples hold one member
``{key}.tokens.u16`` or ``{key}.tokens.u32``: the tokens as raw little-endian unsigned integers (``<u2`` when
every token < 65536, else ``<u4``), no header, so the length is ``payload_bytes / itemsize``. Image samples hold
``{key}.pixels.u8`` (H x W x 3 raw bytes, the shape in the manifest) and ``{key}.cls`` (the label in ASCII).

Shards are deterministic byte for byte (mtime 0, uid/gid 0, empty user/group names, mode 0644, members in
write order), so equal inputs give equal sha256 digests. We write tars with the standard library rather than
``webdataset.ShardWriter``, which cannot write to fsspec URLs and leaves file objects given through ``opener=``
open. Each shard is built in a local file and then moved into place in one step (a rename on a local disk, a
single PUT on an object store), and the manifest is written under a temporary name and moved likewise
(``prime_scale.storage``: ``atomic_upload``, ``write_json``), so a crash never leaves a partial file under a final
name and, on a local disk, a manifest never names bytes that a power loss took back.

Reading
-------
Whole tars are read with WebDataset's tar reader (``iter_samples``; ``iter_token_samples`` and
``iter_image_samples`` decode the samples). The training loader and ``read_split`` use ranged reads instead: every
sample of a split takes the same number of bytes in its shard (``RecordLayout``: plain 512-byte headers, payloads
padded to 512), so samples [a, b) of a shard are one byte range, read with one ``fs.cat_file`` and checked header
by header (``read_records``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional

import fsspec
import numpy as np

from prime_scale.storage import atomic_upload, write_json

MANIFEST_FILENAME = "manifest.json"
_EXT_TO_DTYPE = {"tokens.u16": np.dtype("<u2"), "tokens.u32": np.dtype("<u4")}
_DTYPE_TO_EXT = {v: k for k, v in _EXT_TO_DTYPE.items()}
# Members a model reads as token ids: token blocks, and image pixels (each channel value 0..255 is a token, in
# row-major HWC order, so C = 256 and a 32x32 RGB image is a sequence of 3072 tokens).
TOKEN_MEMBERS = {**_EXT_TO_DTYPE, "pixels.u8": np.dtype("u1")}


def sample_tokens(key: str, members: dict[str, bytes]) -> np.ndarray:
    """The token ids of one sample (int64), from its tokens.u16/u32 or pixels.u8 member."""
    exts = [e for e in TOKEN_MEMBERS if e in members]
    if len(exts) != 1:
        raise ValueError(f"sample {key} holds no single tokens.u16, tokens.u32 or pixels.u8 member "
                         f"(it has {', '.join(sorted(members))})")
    return np.frombuffer(members[exts[0]], dtype=TOKEN_MEMBERS[exts[0]]).astype(np.int64)


_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this


def _fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


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


class ShardWriter:
    """Writes samples (``key``, {extension: bytes}) into tar shards of about ``target_bytes`` under ``url``.

    A shard holds as many whole samples as fit in ``target_bytes`` (at least one). ``name(index)`` gives
    each shard's file name. Each shard is written to a local temporary file, hashed as it is written, and
    moved into place when full (``atomic_upload``). ``shards`` lists ``{name, samples, bytes, sha256}``.
    """

    def __init__(self, url: str, name: Callable[[int], str], target_bytes: int, tmp_dir: str | None = None):
        if target_bytes <= 0:
            raise ValueError(f"target shard size must be > 0 bytes, got {target_bytes}")
        self.fs, self.root = _fs_path(url)
        self.name = name
        self.target_bytes = target_bytes
        self.tmp_dir = tmp_dir
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file: BinaryIO | None = None
        self._hash: _HashingWriter | None = None
        self._local = ""
        self._samples = 0
        self._size = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits names there)")
        size = sum(_tar_bytes_per_sample(len(data)) for data in members.values())
        if self._tar is not None and self._samples and self._size + size + 2 * _BLOCK > self.target_bytes:
            self._finish()
        if self._tar is None:
            fd, self._local = tempfile.mkstemp(suffix=".tar", dir=self.tmp_dir)
            self._file = os.fdopen(fd, "wb")
            self._hash = _HashingWriter(self._file)
            # Stream mode ("w|") only ever calls write(): no seeks, so the hash sees every byte once.
            self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.USTAR_FORMAT)
            self._samples, self._size = 0, 0
        for ext, data in members.items():
            self._tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._samples += 1
        self._size += size

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._hash is not None
        self._tar.close()
        self._file.close()
        name = self.name(len(self.shards))
        atomic_upload(self._local, self.fs, posixpath.join(self.root, name))
        self.shards.append(
            {"name": name, "samples": self._samples, "bytes": self._hash.bytes, "sha256": self._hash.sha256.hexdigest()}
        )
        self._tar = self._file = self._hash = None

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (after an error): nothing partial is moved into place."""
        if self._tar is not None:
            self._file.close()
            os.remove(self._local)
            self._tar = self._file = self._hash = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
    ``{name, samples, bytes, sha256}`` (the shard entries of every dataset manifest).
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

    fs, root = _fs_path(out_url)
    fs.makedirs(root, exist_ok=True)
    writer = ShardWriter(out_url, lambda index: f"{split}-{index:06d}.tar", shard_size_bytes)
    with writer:
        for i, row in enumerate(sequences.astype(store, copy=False)):
            writer.write(f"{i:09d}", {ext: row.tobytes()})
    infos = writer.shards

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


def _samples(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    # imported here: webdataset pulls in torch (a second per process), which writers and data-prep workers never need
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for sample in group_by_keys(tar_file_expander(_open_streams(fs, paths))):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def iter_tar_samples(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for every sample of one tar file, in file order."""
    yield from _samples(fs, [path])


def iter_samples(url: str, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for every sample of a split, in shard order."""
    fs, _ = _fs_path(url)
    yield from _samples(fs, list_shards(url, split))


def iter_token_samples(url: str, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` per sample in shard order, decoded with numpy (int64); image samples yield their
    pixels as tokens."""
    for key, members in iter_samples(url, split):
        try:
            yield key, sample_tokens(key, members)
        except ValueError as e:
            raise ValueError(f"split {split!r} at {url}: {e}") from None


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


def iter_image_samples(url: str, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield ``(key, pixels uint8 (H, W, 3), label)`` per sample of a split, in shard (= dataset) order."""
    for key, members in iter_samples(url, split):
        raw, cls = members.get("pixels.u8"), members.get("cls")
        if raw is None or cls is None:
            raise ValueError(f"sample {key} of split {split!r} at {url} lacks pixels.u8 or cls")
        side = math.isqrt(len(raw) // 3)
        if side * side * 3 != len(raw):
            raise ValueError(f"sample {key} of split {split!r} at {url}: {len(raw)} bytes is no square RGB image")
        yield key, np.frombuffer(raw, dtype=np.uint8).reshape(side, side, 3), int(cls)


def read_image_shards(url: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split as uint8 (N, H, W, 3) and their labels as int64 (N,), in dataset order."""
    images, labels = [], []
    for _, pixels, label in iter_image_samples(url, split):
        images.append(pixels)
        labels.append(label)
    if not images:
        try:
            manifest = read_manifest(url)
        except FileNotFoundError:
            manifest = {}
        if split not in manifest.get("splits", {}):
            raise FileNotFoundError(f"no {split}-*.tar shards (or no samples) under {url}")
        side = manifest["image_size"]
        return np.zeros((0, side, side, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ ranged reads
# ShardWriter writes each member as a 512-byte header and its payload padded to 512 bytes. When every sample of a
# split has the same members of the same padded sizes (token blocks of one seq_len; pixels of one image size and a
# short label), sample i of a shard is the byte range [i * stride, (i + 1) * stride) of its tar, so any run of
# samples is one ranged read. Every header of a run is parsed (tarfile, which checks its checksum) and compared
# with the layout, so a shard laid out otherwise fails loudly instead of being read at the wrong offsets.

_FORMAT_FIX = ("the loader reads shards as prime_scale's data prep writes them (plain tar members, every sample "
               "of the same size): prepare the data again, or compare the file with the sha256 in its manifest")


class ShardFormatError(ValueError):
    """A shard whose samples do not lie in records of one fixed layout (or that is damaged)."""


def split_shards(manifest: dict, split: str) -> list[tuple[str, int]]:
    """(file name, samples) of each shard of a split, in manifest order."""
    if split not in manifest.get("splits", {}):
        raise ValueError(f"the dataset has no split {split!r} (it has {', '.join(manifest.get('splits', {}))})")
    return [(s["name"], int(s["samples"])) for s in manifest["splits"][split]["shards"]]


@dataclass(frozen=True)
class RecordLayout:
    """One sample's record in a regular shard: ``members`` (extension, payload bytes) in write order; ``token``
    indexes the member a model reads (tokens.u16/u32 or pixels.u8)."""

    members: tuple[tuple[str, int], ...]
    token: int

    @property
    def stride(self) -> int:
        """Bytes per sample in the tar: each member's header and padded payload."""
        return sum(_tar_bytes_per_sample(size) for _, size in self.members)

    @property
    def dtype(self) -> np.dtype:
        return TOKEN_MEMBERS[self.members[self.token][0]]

    @property
    def seq_len(self) -> int:
        return self.members[self.token][1] // self.dtype.itemsize

    @property
    def token_offset(self) -> int:
        """Where the token payload starts in the record."""
        return sum(_tar_bytes_per_sample(size) for _, size in self.members[: self.token]) + _BLOCK

    def fits(self, member: int, size: int) -> bool:
        """Whether a payload of ``size`` bytes fits member ``member``'s place: exactly the token member's size; any
        size of the same padded length for the others (a label of 1 or 2 digits)."""
        want = self.members[member][1]
        return size == want if member == self.token else _tar_bytes_per_sample(size) == _tar_bytes_per_sample(want)


def _header(block: bytes, path: str, offset: int) -> tarfile.TarInfo:
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise ShardFormatError(f"{path}: no valid tar header at byte {offset} ({e}): {_FORMAT_FIX}") from None
    if not info.isreg() or "." not in info.name:
        raise ShardFormatError(f"{path}: the member at byte {offset} ({info.name!r}, tar type {info.type!r}) is not "
                               f"a plain file named KEY.EXTENSION: {_FORMAT_FIX}")
    return info


def probe_layout(fs: fsspec.AbstractFileSystem, path: str) -> RecordLayout:
    """The record layout of a shard, from the headers of its first sample (a 512-byte read per member, and one
    more to see the next sample begin)."""
    members: list[tuple[str, int]] = []
    key, offset = None, 0
    while True:
        block = fs.cat_file(path, offset, offset + _BLOCK)
        if len(block) < _BLOCK or not block.strip(b"\0"):  # the end of the archive: a shard of one sample
            break
        info = _header(block, path, offset)
        name_key, ext = info.name.split(".", 1)
        if key is not None and name_key != key:
            break
        key = name_key
        members.append((ext, info.size))
        offset += _tar_bytes_per_sample(info.size)
    tokens = [i for i, (ext, _) in enumerate(members) if ext in TOKEN_MEMBERS]
    if len(tokens) != 1:
        raise ShardFormatError(f"the first sample of {path} ({key}) holds no single tokens.u16, tokens.u32 or "
                               f"pixels.u8 member (it has {', '.join(e for e, _ in members) or 'nothing'})")
    layout = RecordLayout(tuple(members), tokens[0])
    if members[layout.token][1] % layout.dtype.itemsize:
        raise ShardFormatError(f"sample {key} of {path}: {members[layout.token][1]} bytes of "
                               f"{members[layout.token][0]} is no whole number of tokens")
    return layout


def read_records(fs: fsspec.AbstractFileSystem, path: str, layout: RecordLayout, start: int, stop: int
                 ) -> tuple[np.ndarray, list[str]]:
    """Samples [start, stop) of a regular shard, in one ranged read: their tokens, a read-only (stop - start,
    seq_len) view of the bytes read in the shard's dtype, and their keys. Every header is checked against
    ``layout``; a sample of another length is an error naming it and both lengths."""
    stride, n = layout.stride, stop - start
    data = fs.cat_file(path, start * stride, stop * stride)
    if len(data) != n * stride:
        raise ShardFormatError(f"{path} ends at byte {start * stride + len(data)}, before sample {stop} (byte "
                               f"{stop * stride}) that its manifest entry promises: the file is truncated or the "
                               "manifest is stale; prepare the data again")
    keys = []
    try:
        for at in range(0, n * stride, stride):
            key = None
            for member, (ext, size) in enumerate(layout.members):
                info = _header(data[at : at + _BLOCK], path, start * stride + at)
                name_key, _, name_ext = info.name.partition(".")
                if name_ext != ext or not layout.fits(member, info.size) or key not in (None, name_key):
                    raise ShardFormatError(f"{path}: member {info.name!r} ({info.size} bytes) at byte "
                                           f"{start * stride + at} where a .{ext} member of {size} bytes of sample "
                                           f"{key or name_key} was due: {_FORMAT_FIX}")
                key = name_key
                at += _tar_bytes_per_sample(size)
            keys.append(key)
    except ShardFormatError as e:
        raise ShardFormatError(_first_departure(fs, path, layout) or str(e)) from None
    rows = np.frombuffer(data, np.uint8).reshape(n, stride)
    offset = layout.token_offset
    return rows[:, offset : offset + layout.seq_len * layout.dtype.itemsize].view(layout.dtype), keys


def _first_departure(fs: fsspec.AbstractFileSystem, path: str, layout: RecordLayout) -> Optional[str]:
    """What first departs from ``layout`` in a shard, read member by member with tarfile (only on the error path:
    a sample of another size shifts every record after it, so the header that failed to parse is not the cause).
    None when tarfile finds nothing before the first header it cannot read."""
    width = len(layout.members)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for j, info in enumerate(tar):
                member = j % width
                ext, size = layout.members[member]
                key, _, name_ext = info.name.partition(".")
                if not info.isreg() or name_ext != ext:
                    return (f"{path}: member {info.name!r} (tar type {info.type!r}) where the .{ext} member of "
                            f"sample {j // width} was due: {_FORMAT_FIX}")
                if layout.fits(member, info.size):
                    continue
                if member == layout.token:
                    tokens = info.size / layout.dtype.itemsize
                    return (f"sample {key} of {path} holds {tokens:g} tokens where the split's samples hold "
                            f"{layout.seq_len} (data.seq_len): every training sample must hold exactly "
                            "data.seq_len tokens; prepare the data again with one seq_len and prep.packing=concat "
                            "or wrap")
                return (f"{path}: member {info.name!r} holds {info.size} bytes, too many or too few for the place "
                        f"of a {size}-byte one: {_FORMAT_FIX}")
    except tarfile.TarError:
        pass
    return None


def read_split(url: str, split: str, seq_len: int = 0, limit: int = 0, manifest: Optional[dict] = None
               ) -> np.ndarray:
    """The first ``limit`` samples of a split (0 = all), as a (samples, seq_len) array in the shards' dtype
    (uint16/uint32 tokens, uint8 pixels) in key order.

    Reads the shards in manifest order only until ``limit`` samples are had, each with one ranged read of just the
    samples it contributes, straight into one preallocated array. ``seq_len``: the length every sample must have
    (0 = whatever the split's first sample holds); a sample of another length is an error naming the shard and both
    lengths. ``manifest``: the dataset's manifest.json, if already read. Make int64 where a model needs it:
    ``torch.from_numpy(read_split(...)).long()``.
    """
    manifest = manifest if manifest is not None else read_manifest(url)
    shards = [(name, n) for name, n in split_shards(manifest, split) if n > 0]
    if not shards:
        raise FileNotFoundError(f"the {split} split of {url} holds no samples")
    fs, root = _fs_path(url)
    paths = [posixpath.join(root, name) for name, _ in shards]
    layout = probe_layout(fs, paths[0])
    if seq_len and layout.seq_len != seq_len:
        raise ValueError(f"the {split} samples of {url} hold {layout.seq_len} tokens, but seq_len={seq_len} was "
                         f"asked for: use seq_len={layout.seq_len}, or prepare the data again with that seq_len")
    total = sum(n for _, n in shards)
    want = min(limit, total) if limit else total
    out = np.empty((want, layout.seq_len), dtype=layout.dtype.newbyteorder("="))
    done, last = 0, ""
    for path, (_, n) in zip(paths, shards):
        take = min(n, want - done)
        if take == 0:
            break
        tokens, keys = read_records(fs, path, layout, 0, take)
        disorder = next(((a, b) for a, b in zip([last, *keys], keys) if a >= b), None)
        if disorder:
            raise ValueError(f"{path}: key {disorder[1]!r} follows {disorder[0]!r}; read_split reads shards in "
                             "manifest order and samples in file order, which must be key order (as data prep "
                             "writes them)")
        out[done : done + take] = tokens
        done, last = done + take, keys[-1]
    return out



def read_blocks(url: str, split: str, seq_len: int, vocab_size: int, limit: int = 0,
                manifest: Optional[dict] = None) -> np.ndarray:
    """``read_split`` for a model: exactly ``seq_len`` tokens per sample (another length is an error, never a
    cut) and every token id below ``vocab_size``; the first ``limit`` samples (0 = all), in the shards' dtype."""
    blocks = read_split(url, split, seq_len, limit, manifest)
    top = int(blocks.max()) if blocks.size else 0
    if top >= vocab_size:
        raise ValueError(f"the {split} split of {url} holds token id {top} >= vocab_size={vocab_size}: the data was "
                         "prepared for a larger vocabulary; prepare it again or set data.vocab_size to match")
    return blocks


def write_manifest(url: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` under ``url`` atomically (temp name, then move) and, on a local disk, durably."""
    fs, root = _fs_path(url)
    write_json(fs, posixpath.join(root, MANIFEST_FILENAME), manifest)


def read_manifest(url: str) -> dict[str, Any]:
    """Read ``manifest.json`` under ``url``; FileNotFoundError if there is none."""
    fs, root = _fs_path(url)
    with fs.open(posixpath.join(root, MANIFEST_FILENAME), "rb") as f:
        return json.loads(f.read().decode())
