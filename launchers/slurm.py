"""Train on SLURM: ``python launchers/slurm.py --nodes 8 [options] config=NAME [key=value ...]``.

One task per GPU (``--gpus-per-node``; on CPU nodes ``--tasks-per-node``). The job is a submitit Checkpointable:
SLURM signals it SIGUSR2 ``--signal-delay`` seconds before its time limit, and SIGTERM when it is preempted
(within the partition's GraceTime before SIGKILL); every rank saves at the next step boundary, the job requeues
itself and resumes from its latest checkpoint — at most ``--max-requeues`` times. ``--dry-run`` prints the sbatch
script and the resolved config and submits nothing. See docs/launching.md and prime_scale/slurm_job.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from prime_scale.config import Config, ConfigError, config_to_dict, load_config  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launchers/slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config=NAME and dotted key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node, one task each (default 8 if "
                   "the config trains on cuda, else 0)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node on CPU nodes (default 1)")
    add_node_options(p)
    p.add_argument("--name", default="", help="job name (default: run.name)")
    p.add_argument("--logs", default="", help="folder for submitit's logs (default: runs/NAME/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the config; submit nothing")
    return p.parse_intermixed_args(argv)  # options may come after key=value overrides


def add_node_options(p) -> None:
    """The SLURM options that ``node_parameters`` reads, declared once for this launcher and launchers/sweep.py
    (where each applies to every point of the sweep)."""
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    p.add_argument("--constraint", default="")
    p.add_argument("--mem", type=int, default=0, help="GB per node (0 = SLURM's default)")
    p.add_argument("--signal-delay", type=int, default=120, help="seconds before the time limit that SLURM sends "
                   "SIGUSR2 (every rank saves, the job requeues; a save must fit in it; a preemption's SIGTERM "
                   "gives the partition's GraceTime instead)")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --sbatch exclusive= --sbatch mail-type=END (repeatable)")


def tasks_per_node(args: argparse.Namespace, cfg: Config) -> tuple[int, int]:
    """(tasks per node, GPUs per node): one task per GPU; CPU nodes take --tasks-per-node."""
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (8 if cfg.train.device == "cuda" else 0)
    if gpus < 0 or args.nodes < 1:
        raise ConfigError("--nodes must be >= 1 and --gpus-per-node >= 0")
    if gpus and args.tasks_per_node not in (None, gpus):
        raise ConfigError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {gpus}: the launcher runs "
                          "one task per GPU; leave --tasks-per-node out")
    return (gpus or args.tasks_per_node or 1), gpus


def partition_gpus(partition: str) -> int | None:
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


def executor_parameters(args: argparse.Namespace, cfg: Config) -> dict:
    ntasks, gpus = tasks_per_node(args, cfg)
    return {"name": args.name or cfg.run.name, "nodes": args.nodes,
            **node_parameters(args, ntasks, gpus)}


def node_parameters(args: argparse.Namespace, ntasks: int, gpus: int) -> dict:
    """submitit parameters every job needs from the SLURM options (--partition, --time, --sbatch, ...): shared
    by this launcher and launchers/sweep.py."""
    params = {"tasks_per_node": ntasks, "cpus_per_task": args.cpus_per_task, "timeout_min": args.time,
              "slurm_signal_delay_s": args.signal_delay}
    if gpus:
        params["gpus_per_node"] = gpus
    for key, value in (("slurm_partition", args.partition), ("slurm_account", args.account),
                       ("slurm_qos", args.qos), ("slurm_constraint", args.constraint)):
        if value:
            params[key] = value
    if args.mem:
        params["mem_gb"] = args.mem
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--sbatch {item!r}: expected KEY=VALUE (KEY= for a flag without value)")
        extra[key.replace("-", "_")] = value if value else True
    if "no_requeue" not in extra:
        # the job requeues itself after a save (and SLURM requeues it on preemption): allowed even where the
        # cluster's JobRequeue=0 makes jobs unrequeueable by default
        extra["requeue"] = True
    params["slurm_additional_parameters"] = extra
    return params


def check_data(cfg: Config) -> None:
    """Fail before submitting when there is nothing to train on; prepare the synthetic source here (cheap)."""
    from prime_scale.pipeline import prepare_data

    try:
        prepare_data(cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"{e} (data.path={cfg.data.path} must be readable from the compute nodes)") from None
    except RuntimeError as e:  # e.g. the synthetic data there was made with another config
        raise ConfigError(f"data.path={cfg.data.path}: {e}") from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        params = executor_parameters(args, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logs = Path(args.logs or Path(cfg.run.out_dir) / cfg.run.name / "slurm").resolve()
    ntasks = params["nodes"] * params["tasks_per_node"]
    header = (f"[prime_scale] {params['nodes']} node(s) x {params['tasks_per_node']} task(s) = {ntasks} tasks"
              f"{', ' + str(params['gpus_per_node']) + ' GPUs per node' if 'gpus_per_node' in params else ''}; "
              f"time limit {args.time} min; SIGUSR2 {args.signal_delay} s before it; on preemption SIGTERM (the "
              f"partition's GraceTime to save); at most {args.max_requeues} requeues")
    if args.dry_run:
        import submitit
        import yaml

        executor = submitit.AutoExecutor(folder=logs, cluster="slurm")
        executor.update_parameters(**params)
        # the very text submit() would write (a private helper of submitit's, so the dry run cannot drift from it)
        sbatch = executor._executor._make_submission_file_text(
            f"{sys.executable} -u -m submitit.core._submit {logs}", "dry-run")
        print(header)
        print(sbatch)
        print("# resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    if shutil.which("sbatch") is None:
        print("error: no 'sbatch' on this machine, so there is no SLURM to submit to. To train here, run\n"
              f"    python launchers/local.py --nproc {ntasks} {' '.join(args.overrides)}", file=sys.stderr)
        return 2
    available = partition_gpus(args.partition)
    if available is not None and params.get("gpus_per_node", 0) > available:
        print(f"error: --gpus-per-node {params['gpus_per_node']} but partition {args.partition!r} has "
              f"{available or 'no'} GPUs per node (sinfo Gres)", file=sys.stderr)
        return 2
    try:
        check_data(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import submitit

    from prime_scale.slurm_job import TrainJob

    executor = submitit.AutoExecutor(folder=logs, cluster="slurm")
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(args.overrides, args.max_requeues))
    ckpt = cfg.ckpt.dir or str(Path(cfg.run.out_dir) / cfg.run.name / "checkpoints")
    print(header)
    print(f"[prime_scale] submitted job {job.job_id}\n"
          f"  logs:        {job.paths.stdout} (task 0; {logs}/ holds every task's)\n"
          f"  checkpoints: {ckpt}\n"
          f"  metrics:     {Path(cfg.run.out_dir) / cfg.run.name / 'metrics.jsonl'}\n"
          f"  follow:      tail -f {job.paths.stdout}    |  squeue -j {job.job_id}\n"
          f"  stop:        scancel {job.job_id}   (saves if KillWait allows, then ends; scancel --signal=USR2 "
          f"{job.job_id} saves and requeues)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
