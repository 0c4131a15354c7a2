"""Train on SLURM: ``python -m prime_scale.launch.slurm --nodes 8 [options] config=NAME [key=value ...]``.

One task per GPU (``--gpus-per-node``; on CPU nodes ``--tasks-per-node``). The job is a submitit Checkpointable:
SLURM signals it SIGUSR2 ``--signal-delay-s`` seconds before its time limit, and SIGTERM when it is preempted
(within the partition's GraceTime before SIGKILL); every rank saves at the next step boundary, the job requeues
itself and resumes from its latest checkpoint — at most ``--max-requeues`` times. ``--dry-run`` prints the sbatch
script a submission would write and the resolved config, and submits nothing. The SLURM options are
prime_scale/launch/slurm_tools.py's (old spellings such as --time and --mem still work). See docs/launching.md
and prime_scale/slurm_job.py. ``python launchers/slurm.py`` is the same command.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

from prime_scale.cli import EXIT_OK, EXIT_USAGE, config_parser, print_error
from prime_scale.config import Config, ConfigError, config_to_dict, load_config
from prime_scale.run_paths import RunPaths
from prime_scale.launch.slurm_tools import (SlurmOptions, add_slurm_options, add_task_options, make_executor,
                                            partition_gpus, sbatch_script, task_layout)

PROG = "python -m prime_scale.launch.slurm"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = config_parser(PROG, __doc__)
    p.add_argument("--nodes", type=int, default=1)
    add_task_options(p, gpu_default="8")
    add_slurm_options(p, SlurmOptions())
    p.add_argument("--name", default="", help="job name (default: run.name)")
    p.add_argument("--logs", default="", help="folder for submitit's logs (default: runs/NAME/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the config; submit nothing")
    return p.parse_intermixed_args(argv)  # options may come after key=value overrides


def executor_parameters(args: argparse.Namespace, cfg: Config) -> dict:
    """submitit parameters of the training job: ``--nodes`` x one task per GPU (or ``--tasks-per-node``)."""
    if args.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    ntasks, gpus = task_layout(args, cfg, cuda_gpus=8)
    return SlurmOptions.from_args(args).parameters(ntasks, gpus, nodes=args.nodes, name=args.name or cfg.run.name)


def check_data(cfg: Config) -> None:
    """Fail before submitting when there is nothing to train on; prepare the synthetic source here (cheap)."""
    from prime_scale.pipeline import prepare_data

    try:
        prepare_data(cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"{e} (data.path={cfg.data.path} must be readable from the compute nodes)") from None
    except RuntimeError as e:  # e.g. the synthetic data there was made with another config
        raise ConfigError(f"data.path={cfg.data.path}: {e}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.overrides)
        params = executor_parameters(args, cfg)
    except ConfigError as e:
        print_error(str(e), PROG)
        return EXIT_USAGE
    from prime_scale.slurm_job import TrainJob

    job = TrainJob(args.overrides, args.max_requeues)
    paths = RunPaths.of(cfg)
    logs = Path(args.logs or paths.slurm_logs).resolve()
    ntasks = params["nodes"] * params["tasks_per_node"]
    header = (f"[prime_scale] {params['nodes']} node(s) x {params['tasks_per_node']} task(s) = {ntasks} tasks"
              f"{', ' + str(params['gpus_per_node']) + ' GPUs per node' if 'gpus_per_node' in params else ''}; "
              f"time limit {args.timeout_min} min; SIGUSR2 {args.signal_delay_s} s before it; on preemption SIGTERM "
              f"(the partition's GraceTime to save); at most {args.max_requeues} requeues")
    if args.dry_run:
        import yaml

        print(header)
        print(sbatch_script(params, logs, job))
        print("# resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return EXIT_OK
    if shutil.which("sbatch") is None:
        rest = " ".join(args.overrides)
        print("error: no 'sbatch' on this machine, so there is no SLURM to submit to. To train here, run\n"
              f"    python -m prime_scale.launch.local --nproc {ntasks} {rest}\n"
              f"(from a checkout also: python launchers/local.py --nproc {ntasks} {rest})", file=sys.stderr)
        return EXIT_USAGE
    available = partition_gpus(args.partition)
    if available is not None and params.get("gpus_per_node", 0) > available:
        print(f"error: --gpus-per-node {params['gpus_per_node']} but partition {args.partition!r} has "
              f"{available or 'no'} GPUs per node (sinfo Gres)", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_data(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    submitted = make_executor(logs, params).submit(job)
    print(header)
    print(f"[prime_scale] submitted job {submitted.job_id}\n"
          f"  logs:        {submitted.paths.stdout} (task 0; {logs}/ holds every task's)\n"
          f"  checkpoints: {paths.checkpoints}\n"
          f"  metrics:     {paths.metrics}\n"
          f"  follow:      tail -f {submitted.paths.stdout}    |  squeue -j {submitted.job_id}\n"
          f"  stop:        scancel {submitted.job_id}   (saves if KillWait allows, then ends; scancel --signal=USR2 "
          f"{submitted.job_id} saves and requeues)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
