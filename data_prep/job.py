"""What a data-prep job is: the ``Job`` interface a job implements, the ``Output`` folder it writes into, and how
one of its work units runs and is marked done (``run_one_unit``: the same in this process, a pool worker or a SLURM
array task). ``data_prep.batch.run_job`` plans the units and runs them; docs/data_prep.md tells the whole story.
"""

from __future__ import annotations

import abc
import json
import posixpath
from typing import Any, Callable, Optional

import fsspec

from prime_scale.config import Config
from prime_scale.storage import write_json

WORK_DIR = "_work"

Progress = Callable[..., None]  # progress(advance=..., **counters): called by a unit as it goes


class Output:
    """The output folder of a job on any fsspec filesystem, with JSON helpers and the work area."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def work(self, *parts: str) -> str:
        return self.path(WORK_DIR, *parts)

    def uri(self, path: str) -> str:
        """A URL that fsspec and other processes understand for a path on this filesystem."""
        return self.fs.unstrip_protocol(path)

    def read_json(self, path: str) -> Optional[dict]:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None

    def write_json(self, path: str, data: Any) -> None:
        write_json(self.fs, path, data)


class Job(abc.ABC):
    """A data-prep job. Must pickle (it travels to pool workers and SLURM tasks), so it holds plain config."""

    #: the progress bar's main unit ("B" for input bytes, "img", ...) and its counters shown as rates
    progress_unit = "B"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out_url = cfg.data.path

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """Everything that determines the output bytes (no paths of the output, no worker counts)."""

    def prepare(self, out: Output, previous: Optional[dict], units: list[dict]) -> dict:
        """Work that must precede the units (e.g. training a tokenizer); returns JSON-able facts the units get.

        ``previous`` holds the facts of an interrupted run of this very job (same fingerprint), to be reused."""
        return {}

    @abc.abstractmethod
    def plan(self) -> list[dict]:
        """The work units: JSON-able specs, a pure function of the input and the config. Fails on a bad input."""

    @property
    def shard_bytes(self) -> int:
        """The target shard size, data.shard_size_mb in bytes."""
        return max(1, int(self.cfg.data.shard_size_mb * 2**20))

    def unit_size(self, spec: dict) -> int:
        """The unit's share of the progress bar's total (bytes of input by default)."""
        return int(spec.get("bytes", 1))

    @abc.abstractmethod
    def run_unit(self, index: int, spec: dict, out: Output, facts: dict, progress: Progress) -> dict:
        """Process one unit; write its parts under ``out.work()``; return its JSON-able result."""

    @abc.abstractmethod
    def finalize(self, out: Output, facts: dict, results: list[dict]) -> dict:
        """Promote the parts to final shards and return the manifest body: the keys of
        ``prime_scale.data.manifest.DatasetManifest`` (kind, vocab_size, seq_len, dtype, splits, ...) and the job's
        own facts beside them. The runner checks it against that schema and writes it."""


def marker_path(out: Output, index: int) -> str:
    return out.work("units", f"{index:06d}.json")


def run_one_unit(job: Job, index: int, spec: dict, facts: dict, events=None) -> int:
    """Run a unit and write its marker (the last thing it writes). Module-level so pools and submitit can call it."""
    out = Output(job.out_url)
    if events is None:
        def progress(advance: int = 0, **counters: int) -> None:
            pass
    else:
        def progress(advance: int = 0, **counters: int) -> None:
            events.put((advance, counters))
    result = job.run_unit(index, spec, out, facts, progress)
    out.write_json(marker_path(out, index), {"index": index, "result": result})  # the spec is in plan.json
    return index
