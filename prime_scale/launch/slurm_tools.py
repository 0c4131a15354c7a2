"""Everything prime_scale says to SLURM, in one place: the options of every submission, the submitit executor they
build, and what it asks SLURM back (squeue, scontrol, sinfo). Used by training (``python -m
prime_scale.launch.slurm`` and the job it submits, prime_scale/slurm_job.py), sweeps (``python -m
prime_scale.launch.sweep --slurm``) and data prep (``python -m data_prep.text ... --slurm``).

Options. Each flag is spelled as the submitit executor parameter it sets, without submitit's ``slurm_`` prefix, so
that what a user types, what the code passes to ``update_parameters`` and submitit's documentation read alike:

    --partition         slurm_partition          --timeout-min      timeout_min
    --account           slurm_account            --cpus-per-task    cpus_per_task
    --qos               slurm_qos                --mem-gb           mem_gb
    --constraint        slurm_constraint         --signal-delay-s   slurm_signal_delay_s
    --gpus-per-node     gpus_per_node            --tasks-per-node   tasks_per_node
    --array-parallelism slurm_array_parallelism  --sbatch KEY=VALUE slurm_additional_parameters (any sbatch option)

The spellings of before (``--time``, ``--mem``, ``--signal-delay``, ``--max-parallel``) still work and print a
one-line deprecation note on stderr. ``SlurmOptions.parameters`` turns the options into submitit's parameters,
``make_executor`` into an executor, and ``sbatch_script`` shows what a submission would write, for ``--dry-run``.

Queries. ``squeue_states`` (which tasks of job arrays are still queued or running: the sweep's and data prep's
pollers), ``partition_gpus`` (sinfo's Gres: a refusal before submitting), ``slurm_preemption`` (scontrol: is this
SIGTERM a preemption that SLURM would requeue?). Each answers None when SLURM cannot be asked, so that callers
can tell "no" from "unknown".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prime_scale.config import Config, ConfigError

# old spelling -> the submitit-named flag that replaced it
DEPRECATED_FLAGS = {"--time": "--timeout-min", "--mem": "--mem-gb", "--signal-delay": "--signal-delay-s",
                    "--max-parallel": "--array-parallelism"}


@dataclass
class SlurmOptions:
    """Where and how jobs run on SLURM, as the flags above give it; the defaults are the training launcher's."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    timeout_min: int = 24 * 60
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: SLURM's default
    signal_delay_s: int = 120
    array_parallelism: int = 0  # 0: submitit's default (256)
    max_requeues: int = 20
    sbatch: list[str] = field(default_factory=list)  # KEY=VALUE (KEY= for a bare flag)
    logs: str = ""  # submitit's folder; "" = the caller's default

    @classmethod
    def from_args(cls, args: argparse.Namespace, defaults: Optional[SlurmOptions] = None) -> SlurmOptions:
        """The options a parser built with ``add_slurm_options`` read; fields it did not declare keep
        ``defaults``."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return dataclasses.replace(defaults or cls(), **given)

    def parameters(self, tasks_per_node: int, gpus_per_node: int = 0, nodes: int = 1, name: str = "",
                   requeue: bool = True) -> dict[str, Any]:
        """submitit's ``update_parameters`` keywords for a job of ``nodes`` x ``tasks_per_node`` tasks.
        ``requeue``: the job saves and requeues itself on SIGUSR2 (training, sweep points): it gets
        ``--signal=USR2@signal_delay_s`` and ``--requeue`` (allowed even where the cluster's ``JobRequeue=0`` makes
        jobs unrequeueable by default; ``--sbatch no-requeue=`` turns it off)."""
        if self.array_parallelism < 0:
            raise ConfigError("--array-parallelism must be >= 0")
        params: dict[str, Any] = {"nodes": nodes, "tasks_per_node": tasks_per_node,
                                  "cpus_per_task": self.cpus_per_task, "timeout_min": self.timeout_min}
        if name:
            params["name"] = name
        if gpus_per_node:
            params["gpus_per_node"] = gpus_per_node
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        if self.array_parallelism:
            params["slurm_array_parallelism"] = self.array_parallelism
        extra: dict[str, Any] = {}
        for item in self.sbatch:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--sbatch {item!r}: expected KEY=VALUE (KEY= for a flag without value)")
            extra[key.replace("-", "_")] = value if value else True
        if requeue:
            params["slurm_signal_delay_s"] = self.signal_delay_s
            if "no_requeue" not in extra:
                extra["requeue"] = True
        params["slurm_additional_parameters"] = extra
        return params


class _DeprecatedSpelling(argparse.Action):
    """An old spelling of an option: stores into the new option's destination and says so on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated, use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add(group, flag: str, **kwargs) -> None:
    """Declare ``flag`` and, hidden from --help, the old spellings that DEPRECATED_FLAGS maps to it."""
    group.add_argument(flag, **kwargs)
    dest = flag.lstrip("-").replace("-", "_")
    for old in [o for o, new in DEPRECATED_FLAGS.items() if new == flag]:
        group.add_argument(old, dest=dest, action=_DeprecatedSpelling, new=flag, type=kwargs.get("type"),
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_slurm_options(group, defaults: SlurmOptions, *, requeue: bool = True, array: bool = False) -> None:
    """Declare the SLURM options on a parser or argument group, with a caller's ``defaults``. ``requeue``: jobs
    that save and requeue themselves (--signal-delay-s, --max-requeues); ``array``: one job array
    (--array-parallelism). --logs, --name and the task layout are the caller's (their defaults differ)."""
    group.add_argument("--partition", default=defaults.partition)
    group.add_argument("--account", default=defaults.account)
    group.add_argument("--qos", default=defaults.qos)
    group.add_argument("--constraint", default=defaults.constraint)
    _add(group, "--timeout-min", type=int, default=defaults.timeout_min,
         help=f"time limit in minutes (default {defaults.timeout_min}; formerly --time)")
    group.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task,
                       help=f"(default {defaults.cpus_per_task})")
    mem = defaults.mem_gb or "SLURM's"
    _add(group, "--mem-gb", type=int, default=defaults.mem_gb, help=f"GB per node (default {mem}; formerly --mem)")
    if array:
        parallel = defaults.array_parallelism or "submitit's, 256"
        _add(group, "--array-parallelism", type=int, default=defaults.array_parallelism,
             help=f"array tasks running at once (default {parallel}; formerly --max-parallel)")
    if requeue:
        _add(group, "--signal-delay-s", type=int, default=defaults.signal_delay_s,
             help=f"seconds before the time limit that SLURM sends SIGUSR2 (default {defaults.signal_delay_s}; "
                  "every rank saves, the job requeues; a save must fit in it; a preemption's SIGTERM gives the "
                  "partition's GraceTime instead; formerly --signal-delay)")
        group.add_argument("--max-requeues", type=int, default=defaults.max_requeues,
                           help=f"(default {defaults.max_requeues})")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --sbatch exclusive= --sbatch mail-type=END (repeatable)")


def add_task_options(group, gpu_default: str) -> None:
    """--gpus-per-node and --tasks-per-node: one task per GPU, or ``--tasks-per-node`` ranks on CPU nodes."""
    group.add_argument("--gpus-per-node", type=int, default=None,
                       help=f"GPUs per node, one task each (default {gpu_default} if the config trains on cuda, "
                            "else 0)")
    group.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node on CPU nodes (default 1)")


def task_layout(args: argparse.Namespace, cfg: Config, cuda_gpus: int) -> tuple[int, int]:
    """(tasks per node, GPUs per node) from ``add_task_options``' flags: one task per GPU (``cuda_gpus`` GPUs when
    the flag is not given and the config trains on cuda); CPU nodes take --tasks-per-node."""
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (cuda_gpus if cfg.train.device == "cuda" else 0)
    if gpus < 0:
        raise ConfigError("--gpus-per-node must be >= 0")
    if gpus and args.tasks_per_node not in (None, gpus):
        raise ConfigError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {gpus}: the launcher runs "
                          "one task per GPU; leave --tasks-per-node out")
    return (gpus or args.tasks_per_node or 1), gpus


def make_executor(folder: str | Path, params: dict[str, Any]):
    """A submitit executor that submits to SLURM with ``params`` (``SlurmOptions.parameters``), its scripts, logs
    and results in ``folder``."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    return executor


def sbatch_script(params: dict[str, Any], folder: Path, job: Callable[[], Any]) -> str:
    """The sbatch script that submitting ``job`` with ``params`` to the log folder ``folder`` writes, for --dry-run.

    Taken from submitit's public API rather than rebuilt, so the dry run cannot drift from a real submission: the
    job is submitted to a temporary folder with stand-ins for ``sbatch`` (answers with a job id, submits nothing)
    and ``srun`` (submitit only checks that it exists) first on PATH; the script is read back from the job's
    ``paths.submission_file``, with the temporary folder replaced by ``folder``, quoted as submitit quotes paths.
    Nothing is written outside the temporary folder, and no SLURM is needed."""
    with tempfile.TemporaryDirectory(prefix="prime_scale_dry_run_") as tmp:
        stand_ins = Path(tmp) / "bin"
        stand_ins.mkdir()
        for command in ("sbatch", "srun"):
            (stand_ins / command).write_text("#!/bin/sh\necho 'Submitted batch job 1'\n")
            (stand_ins / command).chmod(0o755)
        staged = str(Path(tmp).resolve() / "logs")
        if shlex.quote(staged) != staged:
            raise RuntimeError(f"--dry-run: the temporary folder {staged} needs shell quoting; set TMPDIR")
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([str(stand_ins), path])
        try:
            text = Path(make_executor(staged, params).submit(job).paths.submission_file).read_text()
        finally:
            os.environ["PATH"] = path
    # every occurrence of the folder starts a word submitit quoted as a whole (unquoted here: safe characters)
    return re.sub(re.escape(staged) + r"(\S*)", lambda m: shlex.quote(str(folder) + m.group(1)), text)


# ------------------------------------------------------------------------------------------------ asking SLURM


def squeue_states(job_ids: list[str]) -> Optional[dict[str, str]]:
    """{array task id "123_4": state} of the tasks of the given jobs still known to squeue; None when squeue cannot
    tell. Ids name array tasks ("123_4") or whole arrays ("123"): every task of their arrays is listed, one per
    line, pending ones too (``squeue -r``); states are lower case (pending, running, completing, ...)."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i %T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # squeue fails for job ids it no longer knows: then none of them is alive
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def partition_gpus(partition: str) -> Optional[int]:
    """GPUs per node that SLURM reports for a partition (sinfo's Gres), or None when it cannot tell."""
    if not partition or shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%G"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    best = 0
    for gres in out.stdout.split():
        for item in gres.split(","):
            parts = item.split("(")[0].split(":")
            if parts[0] == "gpu" and parts[-1].isdigit():
                best = max(best, int(parts[-1]))
    return best


def scontrol_fields(args: list[str], timeout_s: float = 30.0) -> Optional[dict[str, str]]:
    """``scontrol ARGS`` (one record, ``-o``) as a dict of its KEY=VALUE words; None if it fails."""
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)


def slurm_preemption(job_id: str, timeout_s: float = 30.0) -> Optional[dict]:
    """Whether SLURM is preempting job ``job_id`` right now, from ``scontrol show job`` (PreemptTime is set from
    the preemption's SIGTERM until the job is requeued) and its partition's PreemptMode; None if SLURM cannot be
    asked. ``requeue``: whether SLURM would requeue it (PreemptMode not CANCEL, and the job's Requeue=1)."""
    job = scontrol_fields(["show", "job", "-o", str(job_id)], timeout_s)
    if job is None or "JobState" not in job:
        return None
    preempt_time = job.get("PreemptTime", "None")
    preempted = preempt_time not in ("None", "Unknown", "", "(null)")
    part = scontrol_fields(["show", "partition", "-o", job.get("Partition", "")], timeout_s) or {}
    mode = part.get("PreemptMode", "")
    requeue = preempted and job.get("Requeue") == "1" and "CANCEL" not in mode.upper()
    return {"preempted": preempted, "requeue": requeue, "preempt_time": preempt_time, "state": job["JobState"],
            "partition": job.get("Partition", ""), "mode": mode, "requeue_flag": job.get("Requeue", "")}
