"""One writer per run folder: a lock that a training run (rank 0) or a data prep job holds while it writes.

    with RunLock(url, purpose="training", stale_minutes=10):
        ...   # write config.yaml, checkpoints, shards

The lock is the file ``prime_lock.json`` in the folder. It names its holder (host, pid, SLURM job id, command,
start and heartbeat times), so that a refused run can say who holds it.

* On a local or shared POSIX disk it is an ``flock`` on that file, held for as long as the holder's process lives:
  the kernel (or the NFS server) drops it when the process dies however it dies, so a lock left by a killed run is
  simply free, and the next run takes it over with a message naming the dead holder (a clean exit removes the
  file). A lock held by a live
  process refuses the second run, except one with the same SLURM job id (a requeued job whose predecessor SLURM is
  still killing), which waits up to ``stale_minutes`` for it.
* On an object store (``s3://``, ``gs://``...) there is no lock primitive, so it is a lease: the holder's record
  with a heartbeat it rewrites every ``stale_minutes / 4``. A lease is taken over when its holder has the same
  SLURM job id, is a dead pid on this host, or its heartbeat is older than ``stale_minutes``; otherwise the second
  run is refused. Two runs that start within the same second can both find no lease: each writes its own, waits
  ``settle_s``, and reads it back; the one whose record is not there stops.

A refusal is :class:`RunLocked`; the engine and the data prep jobs turn it into exit status 2 before they start
any work (docs/engine.md, "One writer per run folder").
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from typing import Optional

import fsspec

from prime_scale.storage import is_local

LOCK_FILE = "prime_lock.json"


class RunLocked(RuntimeError):
    """Another live run holds the folder."""


def slurm_job_id() -> Optional[str]:
    """The SLURM job this process belongs to (an array task counts as its own job), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def describe(holder: dict) -> str:
    """Who holds a lock, from its record: for a refusal or a take-over message."""
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    seen = f", last heartbeat {time.time() - holder['heartbeat']:.0f} s ago" if holder.get("lease") else ""
    return (f"{holder.get('purpose', 'a run')} by pid {holder.get('pid')} on {holder.get('host')}{job}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}{seen}"
            f" ({' '.join(holder.get('command', []))[:200]})")


class RunLock:
    """See the module docstring. ``url``: the folder (local path or fsspec URL); created if missing."""

    def __init__(self, url: str, purpose: str = "training", stale_minutes: float = 10.0, settle_s: float = 2.0):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.path = posixpath.join(root.rstrip("/"), LOCK_FILE)
        self.local = is_local(self.fs)
        self.purpose, self.stale_s, self.settle_s = purpose, 60.0 * stale_minutes, settle_s
        self.record = {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
                       "slurm_job_id": slurm_job_id(), "command": list(sys.argv), "token": uuid.uuid4().hex,
                       "lease": not self.local}
        self.took_over: Optional[dict] = None  # the previous holder's record, when there was one
        self.took_over_because = ""
        self._fd: Optional[int] = None
        self._beat: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------ public

    def acquire(self) -> "RunLock":
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.record["started"] = self.record["heartbeat"] = time.time()
        (self._acquire_flock if self.local else self._acquire_lease)()
        if self.took_over:
            print(f"[prime_scale] {self.url}: took over the lock of {describe(self.took_over)}: "
                  f"{self.took_over_because}", flush=True)
        return self

    def probe(self) -> None:
        """RunLocked if the folder is held now (a launcher's early check before it starts the ranks; the rank that
        then acquires the lock is the authority). Takes nothing and writes nothing."""
        if not self.fs.exists(self.path):
            return
        if self.local:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:  # released (and removed) just now
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                holder = self._read_fd(fd)
                if not self._same_job(holder):
                    raise RunLocked(self._refusal(holder)) from None
            finally:
                os.close(fd)
        else:
            holder = self._read()
            if holder and not self._can_take_over(holder):
                raise RunLocked(self._refusal(holder))

    def release(self) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
        if self._fd is not None:
            os.unlink(self.path)  # while still held (see _acquire_flock): a clean exit leaves nothing behind
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif not self.local and (self._read() or {}).get("token") == self.record["token"]:
            self.fs.rm(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ POSIX: flock

    def _acquire_flock(self) -> None:
        deadline = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_fd(fd)
                os.close(fd)
                if not self._same_job(holder):
                    raise RunLocked(self._refusal(holder)) from None
                if deadline is None:
                    deadline = time.monotonic() + self.stale_s
                    print(f"[prime_scale] {self.url} is held by {describe(holder)}: the same SLURM job, restarted; "
                          f"waiting up to {self.stale_s / 60:g} min for the old step to exit", flush=True)
                if time.monotonic() > deadline:
                    raise RunLocked(self._refusal(holder)) from None
                time.sleep(1.0)
                continue
            # a holder removes the file when it releases: the lock counts only if the name is still this file
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = self._read_fd(fd)
        if previous and previous.get("token"):  # a holder that did not release: its process is gone
            self.took_over, self.took_over_because = previous, "its process has exited without releasing it"
        data = (json.dumps(self.record, indent=2) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _read_fd(fd: int) -> Optional[dict]:
        try:
            return json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
        except (ValueError, OSError):
            return None

    # ------------------------------------------------------------------------------------------ object stores: lease

    def _acquire_lease(self) -> None:
        holder = self._read()
        because = self._can_take_over(holder) if holder else ""
        if holder and not because:
            raise RunLocked(self._refusal(holder))
        self.took_over, self.took_over_because = holder, because
        self._write()
        time.sleep(self.settle_s)  # a run that started in the same moment has written its lease by now
        now = self._read()
        if not now or now.get("token") != self.record["token"]:
            raise RunLocked(self._refusal(now or {}) + " (it started at the same moment as this run)")
        self._beat = threading.Thread(target=self._heartbeat, name="prime-lock-heartbeat", daemon=True)
        self._beat.start()

    def _same_job(self, holder: Optional[dict]) -> bool:
        """The holder is this SLURM job's earlier start (a requeued job whose old step is still being killed)."""
        return bool(holder and holder.get("slurm_job_id") and holder["slurm_job_id"] == self.record["slurm_job_id"])

    def _can_take_over(self, holder: dict) -> str:
        """Why a lease may be taken over ("" if it may not)."""
        if self._same_job(holder):
            return "it is this SLURM job's earlier start (requeued)"
        if holder.get("host") == self.record["host"] and not _pid_alive(int(holder.get("pid", 0))):
            return "its process is no longer running on this host"
        silent = time.time() - holder.get("heartbeat", 0)
        return f"no heartbeat for {silent / 60:.1f} min" if silent > self.stale_s else ""

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            current = self._read()
            if current and current.get("token") != self.record["token"]:
                print(f"[prime_scale] warning: the lease on {self.url} was taken over by {describe(current)}; "
                      "two runs may now write this folder", file=sys.stderr, flush=True)
                return
            self.record["heartbeat"] = time.time()
            self._write()

    def _read(self) -> Optional[dict]:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read().decode() or "null")
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def _write(self) -> None:
        with self.fs.open(self.path, "wb") as f:  # an object PUT: whole or not at all
            f.write((json.dumps(self.record, indent=2) + "\n").encode())

    # ------------------------------------------------------------------------------------------ messages

    def _refusal(self, holder: Optional[dict]) -> str:
        who = describe(holder) if holder else "another process (it has not written its name yet)"
        how = ("wait for it to end or stop it; the lock is free as soon as its process exits" if self.local else
               f"stop it, or wait: a lease whose heartbeat is older than {self.stale_s / 60:g} min "
               "(ckpt.lock_stale_minutes) is taken over")
        return f"{self.url} is in use by {who}. Only one run may write a folder at a time: {how}"
