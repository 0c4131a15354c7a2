"""Run a sweep: ``python -m prime_scale.launch.sweep sweep=NAME [options] [key=value ...]``.

The spec ``prime_scale/configs/sweeps/NAME.yaml`` (or ``sweep=path/to/spec.yaml``) expands into points
(prime_scale/sweep/); every point is one training run in OUT/NAME/ID (OUT = --out, default runs/sweeps), and the
results table is OUT/NAME/results.csv (and .parquet). ``key=value`` words apply to every point.

    python -m prime_scale.launch.sweep sweep=pydocs_tiny --dry-run     # the points: id, family, N, D, C, steps
    python -m prime_scale.launch.sweep sweep=pydocs_tiny               # here, one point after another
    python -m prime_scale.launch.sweep sweep=owt_chinchilla --slurm --partition gpu --gpus-per-node 1 \
        --array-parallelism 32
    python -m prime_scale.launch.sweep sweep=owt_chinchilla --collect  # the table from whatever has finished

Here every unfinished point runs as its own process (``python -m prime_scale.engine ...``; DeepSpeed initialises
once per process), with ``ckpt.resume=auto``: run the same command again after an interruption and finished
points are skipped (their ``done.json``), an interrupted one resumes from its checkpoint. Ctrl-C (or SIGTERM) asks
the running point to save and stop; a second Ctrl-C kills it. ``--slurm`` submits every unfinished point as one
SLURM job array (a ``TrainJob`` per task: save and requeue on SIGUSR2). Exit status: 0 every point done, 1 some
point failed or is unfinished, 2 a usage or config error. The SLURM options are
prime_scale/launch/slurm_tools.py's (old spellings such as --max-parallel and --time still work). See
docs/scaling.md ("Running a sweep"). ``python launchers/sweep.py`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from prime_scale import sweep as sw
from prime_scale.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_parser, print_error
from prime_scale.config import ConfigError
from prime_scale.launch.slurm_tools import (SlurmOptions, add_slurm_options, add_task_options, make_executor,
                                            task_layout)
from prime_scale.processes import kill_with_parent

PLAN_COLUMNS = ["id", "family", "seed", "N", "D", "C", "steps", "status"]
TABLE_COLUMNS = ["id", "family", "N", "D", "C", "steps", "loss", "loss_stderr", "wall_s", "status"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = config_parser("python -m prime_scale.launch.sweep", __doc__,
                      words="sweep=NAME (prime_scale/configs/sweeps/NAME.yaml or a path), then key=value overrides "
                            "for every point")
    p.add_argument("--out", default=sw.DEFAULT_OUT, help="parent folder of the sweep folder (default runs/sweeps)")
    p.add_argument("--dry-run", action="store_true", help="print the points and submit/run nothing")
    p.add_argument("--collect", action="store_true", help="only write the results table from the run folders")
    p.add_argument("--only", action="append", default=[], metavar="FAMILY",
                   help="run only this family (repeatable, or comma-separated)")
    g = p.add_argument_group("SLURM (--slurm: one job array, a task per unfinished point)")
    g.add_argument("--slurm", action="store_true")
    g.add_argument("--wait", action="store_true", help="block until the array is done, then write the table")
    add_task_options(g, gpu_default="1")  # per point: one node
    # --partition, --timeout-min, --cpus-per-task, --signal-delay-s, --array-parallelism, --sbatch, ...: each point
    add_slurm_options(g, SlurmOptions(), array=True)
    g.add_argument("--name", default="", help="job name (default: sweep:NAME)")
    g.add_argument("--logs", default="", help="submitit's log folder (default: OUT/NAME/slurm)")
    g.add_argument("--poll", type=float, default=5.0, help="--wait: seconds between checks")
    args = p.parse_intermixed_args(argv)  # options and key=value words in any order
    args.only = [f for item in args.only for f in item.split(",") if f]
    return args


def split_words(words: list[str]) -> tuple[str, list[str]]:
    names = [w.partition("=")[2] for w in words if w.startswith("sweep=")]
    rest = [w for w in words if not w.startswith("sweep=")]
    if len(names) != 1 or not names[0].strip():
        have = ", ".join(sw.available_sweeps()) or "(none)"
        raise sw.SweepError(f"give sweep=NAME once (prime_scale/configs/sweeps/NAME.yaml or a path); available sweeps: {have}")
    for w in rest:
        if "=" not in w:
            raise sw.SweepError(f"malformed word '{w}': expected sweep=NAME or key=value")
    return names[0].strip(), rest


def say(msg: str) -> None:
    print(f"[sweep] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ tables


def summary(rows: list[dict], paths: list[Path], wall: Optional[float] = None) -> int:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(sw.format_table(rows, TABLE_COLUMNS))
    took = f" in {wall:.0f} s" if wall is not None else ""
    say(f"{len(rows)} points{took}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    say(f"results: {', '.join(str(p) for p in paths)}")
    if counts.get("done", 0) == len(rows) and rows:
        say(f"fit: python -m prime_scale.scaling fit {paths[0]}")
        return EXIT_OK
    for r in rows:
        if r["status"] == "failed":
            say(f"failed: {r['id']} (log: {Path(r['run_url']) / 'train.log'}, marker: "
                f"{Path(r['run_url']) / sw.FAILED})")
    return EXIT_FAILED


# ------------------------------------------------------------------------------------------------ here


class Interrupt:
    """Ctrl-C / SIGTERM: ask the running point to save and stop (SIGTERM to it); a second one kills it."""

    def __init__(self):
        self.count = 0
        self.proc: Optional[subprocess.Popen] = None

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.count == 1 else signal.SIGKILL)
        if self.count == 1:
            say("interrupted: the running point saves a checkpoint and stops (again to kill it)")


def run_point(point: sw.Point, stop: Interrupt) -> tuple[int, float]:
    """Train one point in a process of its own; its output goes to RUN_DIR/train.log. Returns (status, seconds)."""
    run_dir = Path(point.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prime_scale.engine", *point.overrides]  # the installed package
    t0 = time.monotonic()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C in the terminal reaches only this launcher, which asks the point to save; and
        # it dies with this launcher if this one is killed outright (prime_scale.processes)
        stop.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=kill_with_parent)
        while True:
            try:
                code = stop.proc.wait()
                break
            except KeyboardInterrupt:  # only if a handler was not installed
                stop(signal.SIGINT, None)
    stop.proc = None
    wall = time.monotonic() - t0
    sw.record_attempt(run_dir, wall, code, "local")
    return code, wall


def tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_here(spec: sw.SweepSpec, points: list[sw.Point], folder: Path) -> int:
    from tqdm import tqdm

    todo = [p for p in points if sw.read_state(p).status != "done"]
    say(f"{len(points)} points, {len(points) - len(todo)} already done, {len(todo)} to run here "
        f"(logs: RUN_DIR/train.log)")
    stop = Interrupt()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t_all = time.monotonic()
    try:
        bar = tqdm(total=len(todo), unit="point", file=sys.stderr, dynamic_ncols=True, disable=None)
        for i, p in enumerate(todo, 1):
            if stop.count:
                break
            bar.set_description(p.id)
            code, wall = run_point(p, stop)
            prefix = f"{i}/{len(todo)} {p.id} (N {p.N:,}, D {p.D:,}, C {p.C:.3e})"
            if code == 0:
                state = sw.mark_finished(p, "local")
                if state.status == "done":
                    line = f"{prefix}: done in {wall:.1f} s, loss {state.loss:.4f} ± {state.loss_stderr:.4f}"
                else:
                    line = f"{prefix}: FAILED: {state.detail}"
            elif code == 75 or stop.count:
                line = f"{prefix}: stopped after {wall:.1f} s (checkpoint kept; run the same command to resume)"
            else:
                sw.mark_failed(p, code, f"exit status {code}; log {Path(p.run_dir) / 'train.log'}", "local")
                line = (f"{prefix}: FAILED (exit status {code}) after {wall:.1f} s; last lines of "
                        f"{Path(p.run_dir) / 'train.log'}:\n{tail(Path(p.run_dir) / 'train.log')}")
            tqdm.write(f"[sweep] {line}", file=sys.stdout)
            sys.stdout.flush()
            bar.update(1)
        bar.close()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    _, rows, paths = sw.collect(spec, points, folder)
    code = summary(rows, paths, time.monotonic() - t_all)
    if stop.count:
        say("interrupted: run the same command again to continue (finished points are skipped)")
        return EXIT_FAILED
    return code


# ------------------------------------------------------------------------------------------------ SLURM


def executor_parameters(args: argparse.Namespace, cfg) -> dict:
    """submitit parameters of one point (one node; one task per GPU, or --tasks-per-node on CPU nodes), for the
    job array of every unfinished point."""
    ntasks, gpus = task_layout(args, cfg, cuda_gpus=1)
    return SlurmOptions.from_args(args).parameters(ntasks, gpus, name=args.name)


def run_slurm(args: argparse.Namespace, spec: sw.SweepSpec, points: list[sw.Point], folder: Path) -> int:
    if shutil.which("sbatch") is None:
        say("error: no 'sbatch' on this machine, so there is no SLURM to submit to; run the sweep here without "
            "--slurm")
        return EXIT_USAGE
    cfg = points[0].config()
    try:
        params = executor_parameters(args, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    alive = sw.live_tasks(folder) or {}
    todo = [p for p in points if sw.read_state(p).status != "done" and p.id not in alive]
    say(f"{len(points)} points: {len(points) - len(todo) - len(alive)} done, {len(alive)} still queued/running from "
        f"an earlier submission, {len(todo)} to submit")
    if not todo:
        return wait_and_collect(args, spec, points, folder, []) if args.wait else 0

    logs = Path(args.logs or folder / "slurm").resolve()
    executor = make_executor(logs, {"name": f"sweep:{spec.name}", **params})
    for p in todo:  # a new attempt: the failure marker of the last one goes
        (Path(p.run_dir) / sw.FAILED).unlink(missing_ok=True)
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    with executor.batch():
        jobs = [executor.submit(sw.SweepJob(p, args.max_requeues)) for p in todo]
    array_id = jobs[0].job_id.split("_")[0]
    state_path = sw.record_submission(folder, array_id, logs, {p.id: j.job_id for p, j in zip(todo, jobs)})
    limit = f", at most {args.array_parallelism} at once" if args.array_parallelism else ""
    say(f"submitted job array {array_id} with {len(jobs)} tasks{limit} "
        f"({params['tasks_per_node']} task(s) per point, time limit {args.timeout_min} min)")
    say(f"  tasks:   {', '.join(f'{j.job_id}={p.id}' for p, j in zip(todo[:4], jobs[:4]))}"
        f"{' ...' if len(jobs) > 4 else ''} (all in {state_path})")
    say(f"  logs:    {logs}/{array_id}_<task>_0_log.out (and each point's RUN_DIR/metrics.jsonl)")
    say(f"  follow:  squeue -r -j {array_id}   |  tail -f {logs}/{array_id}_0_0_log.out")
    say(f"  stop:    scancel {array_id}   (scancel --signal=USR2 {array_id} saves and requeues)")
    say(f"  results: python -m prime_scale.launch.sweep sweep={args.sweep_word} --out {args.out} --collect")
    if not args.wait:
        return EXIT_OK
    return wait_and_collect(args, spec, points, folder, jobs)


def wait_and_collect(args, spec: sw.SweepSpec, points: list[sw.Point], folder: Path, jobs: list) -> int:
    """Block until no task of this sweep is queued or running, then write the table."""
    t0 = time.monotonic()
    last = ""
    gone_polls = 0
    while True:
        alive = sw.live_tasks(folder)
        if alive is None:  # squeue did not answer: ask again
            time.sleep(args.poll)
            continue
        # result files, not job.done(): without accounting storage (sacct) that warns on every call
        finished = sum(1 for j in jobs if Path(j.paths.result_pickle).exists()) if jobs else 0
        msg = f"{len(alive)} task(s) queued or running" + (f", {finished}/{len(jobs)} finished" if jobs else "")
        if msg != last:
            say(f"[{time.monotonic() - t0:.0f} s] {msg}")
            last = msg
        # a task that died leaves no result file: squeue decides it is gone (twice, against a race at a requeue)
        gone_polls = gone_polls + 1 if not alive else 0
        if gone_polls >= 2 or (jobs and finished == len(jobs) and not alive):
            break
        time.sleep(args.poll)
    _, rows, paths = sw.collect(spec, points, folder)
    return summary(rows, paths, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------------ main


def prepare_data(points: list[sw.Point]) -> None:
    """The synthetic source is prepared here (cheap, once per data config); shards must exist at data.path."""
    from prime_scale.pipeline import prepare_data as prepare

    seen = set()
    for p in points:
        cfg = p.config()
        key = json.dumps(sorted(vars(cfg.data).items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            prepare(cfg)
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # missing shards, another dataset at the path
            hint = " (text: python -m data_prep.text config=BASE; see docs/data_prep.md)" \
                if cfg.data.source == "shards" else ""
            raise sw.SweepError(f"data for point {p.id}: {e}{hint}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        name, overrides = split_words(args.overrides)
        args.sweep_word = name
        spec = sw.load_spec(name)
        points = sw.expand(spec, args.out, overrides, args.only)
    except ConfigError as e:
        print_error(str(e), "python -m prime_scale.launch.sweep")
        return EXIT_USAGE
    if not points:
        print("error: the sweep has no points", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(args.out).expanduser().resolve() / spec.name
    for p in points:
        for w in p.warnings:
            say(f"warning: {w}")

    mismatched = [(p, s) for p in points for s in [sw.read_state(p)] if s.status == "mismatch"]
    if args.dry_run:
        rows = [{**sw.results_rows([p], [s])[0]} for p in points for s in [sw.read_state(p)]]
        kind = f"isoFLOP, budgets {', '.join(f'{b:.3g}' for b in spec.isoflop.budgets)}" if spec.isoflop else spec.mode
        say(f"sweep {spec.name} ({spec.path}): {len(points)} points ({kind}); families "
            f"{', '.join(sorted({p.family for p in points}))}; run folders {folder}/ID")
        print(sw.format_table(rows, PLAN_COLUMNS))
        total_c = sum(p.C for p in points)
        say(f"total: {sum(p.D for p in points):,} tokens, {total_c:.3e} FLOPs "
            f"(N = non-embedding parameters, D = steps x batch x seq_len, C = flops_per_token x D)")
        say(f"engine command of the first point: python -m prime_scale.engine {' '.join(points[0].overrides)}")
        return EXIT_OK
    if mismatched:
        for p, s in mismatched:
            print(f"error: {p.run_dir} was run with another config ({s.detail}); use another --out or "
                  "remove that folder", file=sys.stderr)
        return EXIT_USAGE

    if args.collect:
        states, rows, paths = sw.collect(spec, points, folder, sw.live_tasks(folder) or {})
        return summary(rows, paths)
    try:
        prepare_data(points)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.slurm:
        return run_slurm(args, spec, points, folder)
    return run_here(spec, points, folder)


if __name__ == "__main__":
    sys.exit(main())
