"""Durable, atomic writes on any fsspec filesystem (a local disk, memory://, s3://, gs://, ...).

Every commit point of the project (dataset shards and manifests, data prep's plan and unit markers, a checkpoint's
manifest and ``latest.json``, the sweep's markers and results, the Markov chain file, the FID statistics cache) is
written through here, with one guarantee: a reader never sees a partial file. A file is written under a temporary name beside its final
one and then moved there in one step, so its name holds either the old bytes or all of the new ones; a crash in
between leaves the final name as it was (and at worst a stray ``*.tmp-*`` file beside it, which no reader opens).

On a local disk the write is also durable across a power loss. A rename is atomic but not durable: after a power
loss or a node crash the new name can be on the disk while the bytes it names are not (the page cache had not
written them back), so a manifest or pointer could name data that never reached the disk. Each commit is
therefore: temporary file, fsync of it, rename, fsync of the folder that holds the name (``atomic_write_bytes``,
``atomic_upload``, ``move_into_place`` and so ``write_json``); ``fsync_file``, ``fsync_dir`` and ``fsync_tree`` are
the one place for it.

On an object store the commit is a single PUT (``atomic_upload``) or move (``fs.mv``): an object appears whole or
not at all, and a finished PUT is already durable, so the fsync helpers do nothing there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import uuid
from typing import Any, Optional

import fsspec


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def fsync_file(path: str, fs: Optional[fsspec.AbstractFileSystem] = None) -> None:
    """Flush a file's bytes and size to the disk. ``fs``: the filesystem ``path`` is on (None: the local one);
    a no-op on any other (an object store's finished PUT is durable)."""
    if fs is not None and not is_local(fs):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str, fs: Optional[fsspec.AbstractFileSystem] = None) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to the disk; a no-op off local disks."""
    if fs is not None and not is_local(fs):
        return
    fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # a few filesystems cannot fsync a folder at all (as PostgreSQL's fsync_fname allows)
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str, fs: Optional[fsspec.AbstractFileSystem] = None,
               files: Optional[list[str]] = None) -> None:
    """Flush a folder tree: every file under ``root`` (or only ``files``, paths under it), then every folder that
    holds one of them, deepest first, up to and including ``root``; a no-op off local disks."""
    if fs is not None and not is_local(fs):
        return
    root = os.path.normpath(root)
    if files is None:
        files, folders = [], [root]
        for folder, subfolders, names in os.walk(root):
            files += [os.path.join(folder, n) for n in sorted(names)]
            folders += [os.path.join(folder, d) for d in sorted(subfolders)]
    else:
        files = [os.path.normpath(f) for f in files]
        folders = {root}
        for f in files:
            folder = os.path.dirname(f)
            while folder.startswith(root + os.sep):
                folders.add(folder)
                folder = os.path.dirname(folder)
    for f in files:
        fsync_file(f)
    for folder in sorted(folders, key=lambda d: (-d.count(os.sep), d)):
        fsync_dir(folder)


def durable_replace(src: str, dst: str) -> None:
    """``os.replace(src, dst)`` on a local disk that survives a power loss: fsync ``src``, rename, fsync the folder
    of ``dst`` (and the folder ``src`` left, when it is another)."""
    fsync_file(src)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(dst))
    if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
        fsync_dir(os.path.dirname(src))


def move_into_place(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a finished file to its final name on ``fs``: ``durable_replace`` on a local disk, ``fs.mv`` elsewhere."""
    if is_local(fs):
        durable_replace(fs._strip_protocol(src), fs._strip_protocol(dst))
    else:
        fs.mv(src, dst)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` never names a partial file (temporary name, then move); on a local disk also
    durably (fsync of the temporary file, rename, fsync of the folder)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    if not is_local(fs):
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
        return
    path = fs._strip_protocol(path)  # an OS path (a "file://" URL too)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def atomic_upload(local_path: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Move a finished local file to ``path`` on ``fs`` so that ``path`` never names a partial file; on a local
    disk also durably (the file is fsync'd under its temporary name, renamed, then its folder is fsync'd)."""
    if is_local(fs):
        os.chmod(local_path, 0o644)  # mkstemp makes 0600 files; shards are read by other users and jobs
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            os.replace(local_path, tmp)  # same disk: a rename; else os.replace fails and we copy
        except OSError:
            fs.put_file(local_path, tmp)
            os.remove(local_path)
        durable_replace(tmp, path)
    else:  # an object store PUT is atomic: the object appears whole or not at all
        fs.put_file(local_path, path)
        os.remove(local_path)


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: Any) -> None:
    """Write JSON so that ``path`` never holds a partial document (temp name, then move; durable on a local disk:
    ``atomic_write_bytes``)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    atomic_write_bytes(fs, path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
