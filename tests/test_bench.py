"""The benchmarks run: each script's main at the smallest sizes (bench/run_all.py's --quick arguments, in a fresh
process where run_all uses one) prints one line per case and a summary line, all numbers finite, and returns finite
figures; every script answers --help when run as a script. Benchmarks are not tests: no speed is checked here
(docs/performance.md has the measured figures)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from py_docs import py_docs

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_all import BENCHMARKS, run  # noqa: E402

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def our_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip() and not line.startswith(("[", "DeepSpeed ", "USDT"))]


@pytest.mark.slow  # about 20 s in all: three of them start DeepSpeed in a process of their own
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_bench_prints_finite_figures(name, capfd):
    if name == "data_prep":
        py_docs("library", 1)  # fails with the install command when Debian's python3.11-doc is missing
    fresh, _, quick = BENCHMARKS[name]
    figures = run(name, quick, fresh)
    lines = our_lines(capfd.readouterr().out)
    assert lines[0].startswith("machine:") and lines[-1].startswith("summary:"), lines
    assert len(lines) >= 4, lines  # the machine, at least two cases, the summary
    for line in lines:
        assert not re.search(r"\b(nan|inf)\b", line, re.IGNORECASE), line
        assert all(math.isfinite(float(n.replace(",", ""))) for n in NUMBER.findall(line)), line
    assert figures and all(math.isfinite(f.value) for f in figures)
    # stalls are differences of two timings and may come out slightly negative on a busy machine
    assert all(f.value > 0 for f in figures if "stall" not in f.name), [f for f in figures if f.value <= 0]
    assert all(f.met() in (True, False) for f in figures if f.target)


def test_every_script_answers_help():
    for name in [*BENCHMARKS, "run_all", "data_prep"]:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"], capture_output=True,
                              text=True, timeout=120, cwd="/")
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert "usage:" in proc.stdout, name
