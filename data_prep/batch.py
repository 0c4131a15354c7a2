"""Deterministic, resumable batch execution of a data-prep job: plan -> work units -> finalize.

A job partitions its input into work units as a pure function of the input and the config (never of the number
of workers). Each unit writes its shard parts under ``{out}/_work/`` and then, last, a small JSON *marker* with
its counts; a unit with a marker is done. ``finalize`` promotes the parts, in unit order, to the final
``{split}-{index:06d}.tar`` names and writes ``manifest.json`` last. So:

- the bytes of every shard are the same whatever the number of workers (a unit's output depends on the unit only);
- a job killed midway and run again redoes only the units without a marker, and ends with the same bytes;
- an output folder that holds a *different* dataset (another fingerprint) is refused before any work.

Units run in this process (``workers=1``), in a local process pool, or as a submitit job array on SLURM.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import logging
import multiprocessing
import posixpath
import queue as queue_lib
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable, Optional

import fsspec
from tqdm.auto import tqdm

from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_parser, print_error
from prime_scale.config import Config, ConfigError, load_config
from prime_scale.data.manifest import FORMAT_VERSION, DatasetManifest
from prime_scale.launch.slurm_options import SlurmOptions, add_slurm_options
from prime_scale.runlock import RunLock, RunLocked
from prime_scale.data.shards import (
    MANIFEST_FILENAME,
    ShardWriter,
    durable_replace,
    is_local,
    iter_tar_samples,
    list_shards,
    read_manifest,
    write_json,
    write_manifest,
)

log = logging.getLogger("data_prep")

WORK_DIR = "_work"
PLAN_FILE = "plan.json"
# How many examples of each skip reason a manifest keeps (the counts are always complete).
SKIP_EXAMPLES = 5

Progress = Callable[..., None]  # progress(advance=..., **counters): called by a unit as it goes


class DataPrepError(RuntimeError):
    """A data-prep job that cannot start: a bad input path, an unknown dataset, a tokenizer it cannot use, another
    dataset at data.path, ... (exit status 2: nothing was prepared)."""


class DataPrepFailure(DataPrepError):
    """A job that started and did not finish: a work unit that failed or vanished (exit status 1; the finished
    units stand, and running the same command again redoes the rest)."""


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


class SkipLog:
    """Counts of skipped inputs by reason, with the first few examples of each."""

    def __init__(self, quiet: bool = False) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.quiet = quiet

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < SKIP_EXAMPLES:
            examples.append(where)
            if not self.quiet:
                log.warning("skipped %s: %s", where, reason)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        total = SkipLog()
        for part in parts:
            for reason, n in part["counts"].items():
                total.counts[reason] = total.counts.get(reason, 0) + n
            for reason, examples in part["examples"].items():
                kept = total.examples.setdefault(reason, [])
                kept.extend(examples[: SKIP_EXAMPLES - len(kept)])
        return total.as_dict()


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


# ------------------------------------------------------------------------------------------------ running


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


# Where and how the units run as a SLURM job array (``--slurm``): the SLURM options every submission shares
# (prime_scale/launch/slurm_options.py), with data prep's defaults: small tasks, 16 at once.
SLURM_DEFAULTS = SlurmOptions(timeout_min=240, cpus_per_task=2, mem_gb=8, array_parallelism=16,
                              logs="slurm_logs/data_prep")


def _diff(old: dict, new: dict) -> dict:
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _check_output(out: Output, fingerprint: dict, overwrite: bool) -> Optional[dict]:
    """The finished manifest if this very dataset is already there; refuses a foreign one unless overwrite."""
    try:
        manifest = read_manifest(out.url)
    except FileNotFoundError:
        manifest = None
    plan = out.read_json(out.work(PLAN_FILE))
    for what, doc in (("a dataset", manifest), ("an unfinished data-prep job", plan)):
        if doc is None or overwrite:
            continue
        if doc is manifest and doc.get("format_version") != FORMAT_VERSION:
            raise DataPrepError(
                f"{out.url} holds a dataset written by an older prime_scale (manifest format "
                f"{doc.get('format_version')!r}, this one writes {FORMAT_VERSION}): pass --overwrite to prepare it again")
        if doc.get("fingerprint") != fingerprint:
            old = doc.get("fingerprint") or {}
            raise DataPrepError(
                f"{out.url} already holds {what} made with other settings (field: (existing, requested)): "
                f"{_diff(old, fingerprint)}. Choose another data.path, or pass --overwrite to replace it."
            )
    if overwrite:
        for path in [out.path(MANIFEST_FILENAME), out.work()]:
            if out.fs.exists(path):
                out.fs.rm(path, recursive=True)
        return None
    if manifest is not None and all(
        out.fs.exists(out.path(s["name"])) and out.fs.size(out.path(s["name"])) == s["bytes"]
        for split in manifest["splits"].values() for s in split["shards"]
    ):
        if out.fs.exists(out.work()):  # a run that died between its manifest and the clean-up
            out.fs.rm(out.work(), recursive=True)
        return manifest
    if manifest is not None:  # a shard went missing or changed size: rebuild it
        log.warning("%s: manifest found but shards are missing or changed; preparing again", out.url)
        out.fs.rm(out.path(MANIFEST_FILENAME))
    return None


def _done_units(out: Output, n: int) -> set[int]:
    folder = out.work("units")
    if not out.fs.exists(folder):
        return set()
    done = set()
    for path in out.fs.ls(folder, detail=False):
        name = posixpath.basename(path)
        if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < n:
            done.add(int(name[:-5]))
    return done


class _Bar:
    """One tqdm bar over all units, fed by (advance, counters) events from any process."""

    def __init__(self, total: int, unit: str, enabled: bool):
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc="data prep", disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.counters: dict[str, int] = {}
        self.start = time.perf_counter()

    def __call__(self, advance: int = 0, **counters: int) -> None:
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix({f"{k}/s": f"{v / elapsed:,.0f}" for k, v in self.counters.items()}, refresh=False)
        self.bar.update(advance)

    def close(self) -> None:
        self.bar.close()


def _drain(events, bar: _Bar, stop: threading.Event) -> None:
    while not stop.is_set() or not events.empty():
        try:
            advance, counters = events.get(timeout=0.2)
        except queue_lib.Empty:
            continue
        bar(advance, **counters)


def _run_pool(job: Job, todo: list[tuple[int, dict]], facts: dict, workers: int, bar: _Bar) -> None:
    # spawn, not fork: workers must not inherit the parent's threads (tqdm's monitor, torch's pools).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()
        stop = threading.Event()
        drainer = threading.Thread(target=_drain, args=(events, bar, stop), daemon=True)
        drainer.start()
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(run_one_unit, job, i, spec, facts, events) for i, spec in todo]
                wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    if f.done() and f.exception() is not None:
                        for other in futures:
                            other.cancel()
                        raise f.exception()
        finally:
            stop.set()
            drainer.join()


def _run_slurm(job: Job, todo: list[tuple[int, dict]], facts: dict, opts: SlurmOptions, bar: _Bar) -> None:
    import shutil

    import submitit

    if shutil.which("sbatch") is None:
        raise DataPrepError("--slurm: no 'sbatch' on this machine; run the job locally with --workers N instead")
    logs = opts.logs or SLURM_DEFAULTS.logs
    executor = submitit.AutoExecutor(folder=logs, cluster="slurm")
    # a unit that dies is redone by running the same command again: no save-and-requeue
    executor.update_parameters(**opts.parameters(
        tasks_per_node=1, name=f"data_prep:{posixpath.basename(job.out_url.rstrip('/'))}", requeue=False))
    jobs = executor.map_array(run_one_unit, [job] * len(todo), [i for i, _ in todo], [s for _, s in todo],
                              [facts] * len(todo))
    print(f"[data_prep] submitted {len(jobs)} SLURM array tasks: {jobs[0].job_id.split('_')[0]} "
          f"(logs under {logs})", flush=True)
    sizes = {i: job.unit_size(s) for i, s in todo}
    pending = dict(zip(jobs, [i for i, _ in todo]))
    gone_since: dict[str, float] = {}
    while pending:
        for j in [j for j in pending if j.done()]:
            j.result()  # raises with the task's traceback if it failed
            bar(sizes[pending.pop(j)])
        # submitit learns of an end from sacct or the result file; a task killed without writing one (OOM,
        # node failure) on a cluster without accounting would be waited for forever: watch squeue instead.
        live = _squeue_ids(jobs[0].job_id.split("_")[0]) if pending else set()
        for j in pending:
            if live is None or j.job_id in live:
                gone_since.pop(j.job_id, None)
            elif time.monotonic() - gone_since.setdefault(j.job_id, time.monotonic()) > 60 and not j.done():
                raise DataPrepFailure(f"SLURM task {j.job_id} (work unit {pending[j]}) left the queue without a "
                                    f"result; its log: {j.paths.stderr}. Run the same command again to redo it.")
        if pending:
            time.sleep(2.0)


def _squeue_ids(array_id: str) -> Optional[set[str]]:
    """Task ids of the array still queued or running ("123_4"), or None when squeue cannot tell."""
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def run_job(
    job: Job,
    workers: int = 1,
    slurm: Optional[SlurmOptions] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or resume, or reuse) ``job`` and return its manifest. One job at a time writes an output URL: from its
    first write on (with ``overwrite``, from the start), a job holds the URL's lock (prime_scale.runlock), and a
    second job is refused with RunLocked meanwhile. Reusing a finished dataset, or failing on bad inputs, writes
    nothing, the lock included."""
    lock = RunLock(job.out_url, purpose="data prep", stale_minutes=job.cfg.ckpt.lock_stale_minutes)
    with contextlib.ExitStack() as held:
        if overwrite:  # it removes what is there
            held.enter_context(lock)
        out = Output(job.out_url)
        fingerprint = job.fingerprint()
        finished = _check_output(out, fingerprint, overwrite)
        if finished is not None:
            log.info("%s already holds this dataset (manifest matches); nothing to do", out.url)
            return finished
        units = job.plan()
        if not units:
            raise DataPrepError("the input holds nothing to process")
        if not overwrite:
            held.enter_context(lock)
        return _run_units(job, out, fingerprint, units, workers, slurm, progress)


def _run_units(job: Job, out: Output, fingerprint: dict, units: list[dict], workers: int,
               slurm: Optional[SlurmOptions], progress: bool) -> dict:
    """The writing part of run_job, under the output's lock: plan, work units, manifest."""
    plan = out.read_json(out.work(PLAN_FILE))
    facts = job.prepare(out, plan.get("facts") if plan else None, units)
    if plan is not None and (plan.get("units") != units or plan.get("facts") != facts):
        raise DataPrepError(
            f"{out.url}: the input changed since this job started (other files or sizes, or another tokenizer); "
            "pass --overwrite to start again"
        )
    out.write_json(out.work(PLAN_FILE), {"fingerprint": fingerprint, "units": units, "facts": facts})

    done = _done_units(out, len(units))
    todo = [(i, spec) for i, spec in enumerate(units) if i not in done]
    if done:
        log.info("resuming: %d of %d work units already done, %d to run", len(done), len(units), len(todo))
    bar = _Bar(sum(job.unit_size(s) for s in units), job.progress_unit, progress)
    bar(sum(job.unit_size(units[i]) for i in done))
    try:
        if todo and slurm is not None:
            _run_slurm(job, todo, facts, slurm, bar)
        elif todo and workers > 1 and len(todo) > 1:
            _run_pool(job, todo, facts, min(workers, len(todo)), bar)
        else:
            for i, spec in todo:
                run_one_unit(job, i, spec, facts, _CallbackQueue(bar))
    finally:
        bar.close()

    results = []
    for i in range(len(units)):
        marker = out.read_json(marker_path(out, i))
        if marker is None:
            raise DataPrepFailure(f"work unit {i} finished without its marker; run the job again to redo it")
        results.append(marker["result"])
    body = job.finalize(out, facts, results)
    try:  # the one schema every dataset follows; a job that breaks it fails here, before the commit point
        manifest = DatasetManifest.from_json({"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **body},
                                             f"the manifest of {out.url}").to_json()
    except ValueError as e:
        raise DataPrepFailure(str(e)) from None
    write_manifest(out.url, manifest)  # the commit point: a folder with a manifest is complete
    out.fs.rm(out.work(), recursive=True)
    return manifest


class _CallbackQueue:
    """The ``events.put`` of the in-process path: straight into the bar."""

    def __init__(self, bar: _Bar):
        self.bar = bar

    def put(self, item) -> None:
        advance, counters = item
        self.bar(advance, **counters)


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


# ------------------------------------------------------------------------------------------------ CLI


def cli_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = config_parser(prog, description, sections=("data", "prep"),
                      words="config=NAME and dotted key=value overrides (data.*, prep.*)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at data.path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("SLURM (units as a submitit job array)")
    s.add_argument("--slurm", action="store_true", help="run the units as a SLURM job array")
    add_slurm_options(s, SLURM_DEFAULTS, requeue=False, array=True)  # --timeout-min: per array task
    s.add_argument("--logs", default=SLURM_DEFAULTS.logs, help="folder for submitit's logs and pickles")
    return p


def cli_main(make_job: Callable[[Config], Job], prog: str, description: str, argv: list[str] | None = None) -> int:
    args = cli_parser(prog, description).parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(args.overrides, check_schedule=False)  # the training schedule is the training's to check
    except ConfigError as e:
        print_error(str(e), prog)
        return EXIT_USAGE
    slurm = SlurmOptions.from_args(args, SLURM_DEFAULTS) if args.slurm else None
    try:
        manifest = run_job(make_job(cfg), workers=args.workers, slurm=slurm, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except DataPrepFailure as e:  # started, did not finish
        print(f"data prep failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (DataPrepError, RunLocked) as e:  # refused before any unit ran
        print_error(str(e), prog)
        return EXIT_USAGE
    print(json.dumps(summary(manifest, cfg.data.path), indent=2))
    return EXIT_OK


def summary(manifest: dict, url: str) -> dict:
    """The short account printed at the end of a job."""
    return {
        "path": url,
        "splits": {name: {k: v for k, v in split.items() if k != "shards"} | {"shards": len(split["shards"])}
                   for name, split in manifest["splits"].items()},
        "skipped": manifest.get("skipped", {}).get("counts", {}),
    }


__all__ = [
    "DataPrepError", "DataPrepFailure", "Job", "Output", "SLURM_DEFAULTS", "SkipLog", "SlurmOptions", "cli_main",
    "promote_parts", "remove_stale_shards", "run_job", "run_one_unit",
]
