"""Every benchmark with CI-sized settings (about 3 minutes on 2 idle CPU cores, at most 15), then every figure with
its target and MET / NOT MET, and a summary line.

    python bench/run_all.py [--quick] [--only mfu,sampling] [--threads 0]

Scripts that start DeepSpeed (mfu, engine_overhead, checkpoint) run in a fresh process each (a process holds one
DeepSpeed communication group and accelerator choice; a fresh one also starts with torch's default threads and no
compiled graphs), and so does prime_overhead (its 400 MB logits buffers: in a process whose heap earlier benchmarks
used, one of the three models' steps was seen 15% slower throughout); the others are called in this process.
Each script's own lines are printed as it runs.
--quick uses the smallest sizes (seconds; tests/test_bench.py runs those): the figures are then not meaningful.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run_all.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, Figure, fresh_process_env, machine_line, parser, read_json  # noqa: E402

# name -> (needs a fresh process, CI-sized arguments, smallest arguments)
BENCHMARKS: dict[str, tuple[bool, list[str], list[str]]] = {
    "mfu": (True, ["--steps", "10", "--profile-steps", "3", "--variants", "eager,compile,compile+fused"],
            ["--config", "tiny", "--steps", "1", "--warmup", "1", "--peak-size", "256", "--peak-repeats", "1",
             "--profile-steps", "1"]),
    "prime_overhead": (True, ["--repeats", "5"],
                       ["--vocab", "64", "--d-model", "32", "--layers", "1", "--heads", "1", "--seq-len", "16",
                        "--batch", "2", "--repeats", "1"]),
    "engine_overhead": (True, ["--steps", "12"],
                        ["--d-model", "32", "--layers", "1", "--seq-len", "16", "--batch", "2", "--vocab", "64",
                         "--steps", "1", "--stages", "0,1"]),
    "data_path": (False, [],
                  ["--data", "synthetic", "--sequences", "256", "--batch", "8", "--steps", "8", "--train-steps", "1",
                   "--group-mb", "1", "--io-workers", "2"]),
    "sampling": (False, [],
                 ["--config", "tiny", "--steps", "4,8", "--num", "2"]),
    "data_prep": (False, ["--repeat", "4"], ["--repeat", "1", "--vocab", "1024", "--unit-mb", "1", "--docs", "120"]),
    # every case of bench/memory.py runs in processes of its own; its training-step section (a native bf16 step of
    # owt_small's shape on 2 ranks: about 10 minutes here) runs with `python bench/memory.py` alone
    "memory": (False, ["--only", "head,sampler,table"], ["--quick"]),
    "checkpoint": (True, [],
                   ["--d-model", "32", "--layers", "1", "--vocab", "64", "--seq-len", "16", "--batch", "2",
                    "--repeats", "1", "--steps", "1", "--no-async"]),
}


def run(name: str, args: list[str], fresh: bool) -> list[Figure]:
    """bench/NAME.py's figures: its main called here, or (fresh) the script in a new process."""
    if not fresh:
        return importlib.import_module(f"bench.{name}").main(args)
    with tempfile.TemporaryDirectory(prefix="bench_run_all_") as tmp:
        out = os.path.join(tmp, "figures.json")
        proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args, "--json", out], cwd=REPO,
                              env=fresh_process_env())
        if proc.returncode != 0:
            raise RuntimeError(f"bench/{name}.py exited with status {proc.returncode}")
        return read_json(out)


def main(argv=None) -> list[Figure]:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="the smallest sizes (a smoke run; figures not meaningful)")
    p.add_argument("--only", default="", help="comma-separated benchmarks (default: all)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    print(machine_line(), flush=True)
    results: dict[str, list[Figure]] = {}
    for name in names:
        fresh, ci_args, quick_args = BENCHMARKS[name]
        bench_args = quick_args if args.quick else ci_args
        if args.threads:
            bench_args = bench_args + ["--threads", str(args.threads)]
        print(f"\n=== bench/{name}.py {' '.join(bench_args)}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run(name, bench_args, fresh)
        except SystemExit as e:  # a benchmark whose input is missing here (data_prep: Debian's python3.11-doc)
            print(f"=== {name}: skipped: {e}", flush=True)
            continue
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    wall = time.perf_counter() - start
    print("\n=== figures")
    judged = []
    for name, figures in results.items():
        for f in figures:
            target = f"target {f.target}" if f.target else ""
            print(f"{name:16s} {f.name:40s} {f.formatted():>18s}  {target:16s} {f.verdict()}")
            if f.target:
                judged.append(f)
    missed = [f.name for f in judged if not f.met()]
    print(f"summary: {len(judged) - len(missed)} of {len(judged)} targets met"
          f"{' (NOT MET: ' + ', '.join(missed) + ')' if missed else ''}; {wall / 60:.1f} min wall, load average "
          f"{load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
          f"{' [--quick: sizes too small to judge]' if args.quick else ''}")
    return [f for figures in results.values() for f in figures]


if __name__ == "__main__":
    main()
