"""What a training process holds while it trains, and gives back when it stops.

``RunContext`` owns what is per process: the device, the process group, the rendezvous variables, the stop-signal
handlers and the run folder's locks. Entered, it sets up what is missing; left, it puts back what it changed:

- the process group: under torchrun or SLURM the launcher gives the rendezvous and the group lives as long as the
  process (a gloo/NCCL group cannot be made again over the same rendezvous); alone, the context makes a one-rank
  group on localhost, and destroys it (with DeepSpeed's copy of it) when it is left;
- the rendezvous variables (RANK, WORLD_SIZE, ...) and DS_ACCELERATOR it set are removed again;
- the signal handlers ``install_stop_handlers`` replaced are restored, and torch's thread count (train.num_threads);
- the run folder's locks are released.

So a training run called from Python (the local launcher's ``--nproc 1``, a notebook, a test) leaves no trace: an
export, evaluation or sampling after it still stops on Ctrl-C or ``kill``, and a second training in the same
process starts from scratch.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
from typing import Optional

import torch
import torch.distributed as dist

from prime_scale.config import Config, ConfigError
from prime_scale.run_paths import RunPaths
from prime_scale.runlock import RunLock, RunLocked

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class StopFlag:
    """Signal handlers only set a flag; ranks agree on it at step boundaries (a collective is no signal work).
    A second SIGINT (Ctrl-C twice) stops at once, without the save."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)  # installed twice: the first replaced handler is the one to keep
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt
        self.signum = self.signum or signum  # another signal during the save changes nothing

    def previous(self, signum: int):
        """The handler this flag replaced (e.g. submitit's requeue handler), to hand the signal on after a save."""
        return self._previous.get(signum)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, handler)


def use_cuda(device: str) -> bool:
    """train.device: cuda, or auto on a machine with CUDA."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def destroy_process_group() -> None:
    """Destroy this process's group, and DeepSpeed's clone of it: DeepSpeed keeps a clone of the world group for
    the life of the process (``deepspeed.utils.groups._WORLD_GROUP``, a private attribute that
    tests/test_private_apis.py checks is still there); after the group is destroyed that clone names a dead group
    and the next ``deepspeed.initialize`` fails on it."""
    from deepspeed.utils import groups

    dist.destroy_process_group()
    groups._WORLD_GROUP = None


class RunContext:
    """See the module docstring. ``device``: train.device (auto, cpu, cuda); ``timeout_minutes``: how long a rank
    waits in one collective before it fails (engine.collective_timeout_minutes); ``stop``: the signal flag to
    install (a SLURM job passes its own to read the replaced handlers afterwards); ``num_threads``: torch's
    intra-op threads while the context is open (train.num_threads; 0 = leave them)."""

    @classmethod
    def of(cls, cfg: Config, stop: Optional[StopFlag] = None) -> "RunContext":
        return cls(cfg.train.device, cfg.engine.collective_timeout_minutes, stop, cfg.train.num_threads)

    def __init__(self, device: str = "auto", timeout_minutes: float = 30.0, stop: Optional[StopFlag] = None,
                 num_threads: int = 0):
        self.device_choice, self.timeout_minutes, self.num_threads = device, timeout_minutes, num_threads
        self.stop = stop or StopFlag()
        self.rank = self.world_size = self.local_rank = 0
        self.device = torch.device("cpu")
        self._set_variables: list[str] = []
        self._owns_group = False
        self._locks: list[RunLock] = []
        self._handlers_installed = False
        self._threads_before = 0

    def __enter__(self) -> "RunContext":
        try:
            if self.num_threads:
                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(self.num_threads)
            self._init_distributed()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close(clean=exc[0] is None)

    def _set(self, **variables: str) -> None:
        for key, value in variables.items():
            if key not in os.environ:
                os.environ[key] = value
                self._set_variables.append(key)

    def _init_distributed(self) -> None:
        if self.device_choice == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        if self.device_choice == "cpu":
            self._set(DS_ACCELERATOR="cpu")  # DeepSpeed picks its accelerator when first imported
        import deepspeed

        if "RANK" not in os.environ:  # alone: a one-rank group on localhost
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self._set(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cuda = use_cuda(self.device_choice)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                       timeout=datetime.timedelta(minutes=self.timeout_minutes))
            self._owns_group = "RANK" in self._set_variables
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)  # before the first collective, so NCCL binds the rank's GPU

    def lock_run_folders(self, paths: RunPaths, stale_minutes: float) -> None:
        """Rank 0 locks the run folder, and ckpt.dir when it lies elsewhere (prime_scale.runlock); every rank learns
        whether it could, and all stop with RunLocked (exit 2) if not, before DeepSpeed starts."""
        refusal = ""
        if self.rank == 0:
            try:
                for folder in paths.lock_folders():
                    self._locks.append(RunLock(folder, "training", stale_minutes).acquire())
            except RunLocked as e:
                self._release_locks()
                refusal = str(e)
        if agree_max([float(bool(refusal))], self.device)[0]:
            raise RunLocked(refusal or "rank 0 could not lock the run folder (its message says who holds it)")

    def install_stop_handlers(self) -> StopFlag:
        """From here until the context is left, SIGINT/TERM/USR1/USR2 set ``stop.signum`` (the trainer saves and
        stops at the next step boundary). Installed when the loop starts: a signal during the set-up meets the
        handlers that were there before (submitit's requeue handler under SLURM, the default elsewhere)."""
        self.stop.install()
        self._handlers_installed = True
        return self.stop

    def _release_locks(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    def close(self, clean: bool = True) -> None:
        """Release the locks, tear down the one-rank group this context made, restore the signal handlers and the
        thread count, and remove the variables it set. ``clean``: the run ended without an exception (then a multi-rank run's
        ranks wait for each other before any of them leaves)."""
        # The DeepSpeed engine sits in reference cycles which hold gloo work objects (ZeRO-3's gathers). Freed at
        # interpreter exit instead, they need the GIL while Python is torn down and can abort the process
        # ("terminate called without an active exception", pytorch/pytorch#179291): free them now.
        gc.collect()
        try:
            if clean and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # no rank leaves while another still has collectives in flight
        finally:
            self._release_locks()
            if self._owns_group and dist.is_initialized():
                destroy_process_group()
            self._owns_group = False
            if self._handlers_installed:
                self.stop.restore()
                self._handlers_installed = False
            if self._threads_before:
                torch.set_num_threads(self._threads_before)
                self._threads_before = 0
            for key in self._set_variables:
                os.environ.pop(key, None)
            self._set_variables = []


def agree_max(values: list, device) -> list[float]:
    """Element-wise max over ranks (stop flags, save-now flags, non-finite losses; floats or 0-d tensors on the
    device): one small all-reduce."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def agree_sum(values: list, device) -> list[float]:
    """Element-wise sum over ranks (the logged loss, batch checksums): one small all-reduce."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def _all_reduce(values: list, device, op) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()
