"""Several trainings one after another in one torchrun launch, run by tests/test_engine.py: each is
``python -m prime_scale.engine ARGS``'s ``main``, in one process per rank and one process group for all of them, so
the start-up (torchrun, Python, torch, DeepSpeed, the gloo rendezvous: about 5 s on 2 CPU cores) is paid once, not
per training. Each call builds its own DeepSpeed engine and reads and writes its checkpoints on disk, as a launch
does; a failing call is recorded and the next one still runs.

    torchrun --nproc_per_node 2 tests/engine_runs.py RUNS.json RESULT.json

RUNS.json: ``[[name, [key=value, ...]], ...]``, run in that order. RESULT.json: ``{name: {"exit": [status per rank],
"out": rank 0's stdout, "err": rank 0's stderr}}`` (status "exception" with its traceback in "err" when ``main``
raised).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from prime_scale import engine
from prime_scale.run_context import RunContext


def run(args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = engine.main(args)
        except Exception:
            traceback.print_exc()
            status = "exception"
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    return {"exit": statuses, "out": out.getvalue(), "err": err.getvalue()}


def main(runs_path: str, result_path: str) -> None:
    # The process group every run uses: engine.main leaves a group it did not make, and a group cannot be made again
    # over torchrun's rendezvous. A rank stuck in a collective fails after 2 minutes instead of 30.
    with RunContext("cpu", timeout_minutes=2):
        results = {}
        for name, args in json.loads(Path(runs_path).read_text()):
            results[name] = run(args)
            if dist.get_rank() == 0:
                print(f"{name}: exit {results[name]['exit']}", flush=True)
        if dist.get_rank() == 0:
            Path(result_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
