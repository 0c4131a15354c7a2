"""Deterministic, resumable batch execution of a data-prep job: plan -> work units -> finalize.

A job partitions its input into work units as a pure function of the input and the config (never of the number
of workers). Each unit writes its shard parts under ``{out}/_work/`` and then, last, a small JSON *marker* with
its counts; a unit with a marker is done. ``finalize`` promotes the parts, in unit order, to the final
``{split}-{index:06d}.tar`` names and writes ``manifest.json`` last. So:

- the bytes of every shard are the same whatever the number of workers (a unit's output depends on the unit only);
- a job killed midway and run again redoes only the units without a marker, and ends with the same bytes;
- an output folder that holds a *different* dataset (another fingerprint) is refused before any work.

Units run in this process (``workers=1``), in a local process pool, or as a submitit job array on SLURM
(data_prep/slurm.py). What a job implements and the folder it writes are in data_prep/job.py, the promotion of
parts to shards in data_prep/parts.py, the command line every job shares in data_prep/cli.py.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import posixpath
import threading
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Optional

from data_prep.job import Job, Output, marker_path, run_one_unit
from data_prep.progress import BarQueue, ProgressBar, drain_events
from data_prep.slurm import run_slurm
from prime_scale.data.errors import DataPrepError, DataPrepFailure
from prime_scale.data.manifest import FORMAT_VERSION, DatasetManifest
from prime_scale.data.shards import MANIFEST_FILENAME, read_manifest, write_manifest
from prime_scale.launch.slurm_tools import SlurmOptions
from prime_scale.runlock import RunLock

log = logging.getLogger("data_prep")

PLAN_FILE = "plan.json"


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
    bar = ProgressBar(sum(job.unit_size(s) for s in units), job.progress_unit, progress)
    bar(sum(job.unit_size(units[i]) for i in done))
    try:
        if todo and slurm is not None:
            run_slurm(job, todo, facts, slurm, bar)
        elif todo and workers > 1 and len(todo) > 1:
            _run_pool(job, todo, facts, min(workers, len(todo)), bar)
        else:
            for i, spec in todo:
                run_one_unit(job, i, spec, facts, BarQueue(bar))
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


def _diff(old: dict, new: dict) -> dict:
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


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


def _run_pool(job: Job, todo: list[tuple[int, dict]], facts: dict, workers: int, bar: ProgressBar) -> None:
    # spawn, not fork: workers must not inherit the parent's threads (tqdm's monitor, torch's pools).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()
        stop = threading.Event()
        drainer = threading.Thread(target=drain_events, args=(events, bar, stop), daemon=True)
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
