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
    names = dict.fromkeys([*BENCHMARKS, "run_all", "data_prep", "paper_scale", "gpu_check", "gpu_wheels"])  # each once
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
             for name in names}  # all at once: each is little more than a Python start-up
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, (name, stderr[-2000:])
            assert "usage:" in stdout, name
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_emulated_bf16_products_are_tensor_core_products():
    """bench/cpu_bf16.py: bf16 inputs, fp32 products and sums, the output rounded to bf16 (as a tensor-core GEMM),
    for F.linear, a matmul by a 2-D weight, SDPA and a custom autograd function whose backward multiplies in Python
    (as DeepSpeed's ZeRO-3 linear layer does), forward and backward; fp32 and everything outside left alone."""
    import torch
    import torch.nn.functional as F

    import bench.cpu_bf16 as cpu_bf16

    class PythonBackward(torch.autograd.Function):  # LinearFunctionForZeroStage3's shape of code
        @staticmethod
        def forward(ctx, a, weight):
            ctx.save_for_backward(a, weight)
            return a.matmul(weight.t())

        @staticmethod
        def backward(ctx, grad):
            a, weight = ctx.saved_tensors
            return grad.matmul(weight), grad.reshape(-1, grad.shape[-1]).t().matmul(a.reshape(-1, a.shape[-1]))

    torch.manual_seed(0)
    x = torch.randn(3, 40, 96).bfloat16().requires_grad_()
    w = torch.randn(48, 96).bfloat16().requires_grad_()
    b = torch.randn(48).bfloat16().requires_grad_()
    q = torch.randn(2, 3, 40, 16).bfloat16().requires_grad_()
    exact = F.linear(x.float(), w.float(), b.float()).bfloat16()

    def run(emulate: bool):
        for t in (x, w, b, q):
            t.grad = None
        before = cpu_bf16.products
        with cpu_bf16.emulated_bf16_matmuls() if emulate else torch.enable_grad():
            y, m, z = F.linear(x, w, b), x.matmul(w.t()), PythonBackward.apply(x, w)
            a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            (y.float().square().sum() + m.float().sum() + z.float().sum() + a.float().square().sum()).backward()
        return [y, m, z, a, x.grad, w.grad, b.grad, q.grad], cpu_bf16.products - before

    (emulated, counted), (native, none) = run(True), run(False)
    # forward: linear, matmul, the custom forward, attention; backward: 2 products each for linear and matmul,
    # the custom backward's 2, attention's backward
    assert (counted, none) == (4 + 2 * 2 + 2 + 1, 0)
    assert torch.equal(emulated[0], exact) and torch.equal(emulated[1], (x.float() @ w.float().t()).bfloat16())
    assert all(e.dtype == torch.bfloat16 for e in emulated)
    for e, n in zip(emulated, native):  # native bf16 kernels differ by bf16 rounding only
        assert (e.float() - n.float()).abs().max() <= 2e-2 * n.float().abs().max()
    with cpu_bf16.emulated_bf16_matmuls():
        before = cpu_bf16.products
        assert F.linear(x.float(), w.float()).dtype == torch.float32  # fp32 inputs are left alone
        assert cpu_bf16.products == before


def probe_wheel(folder: Path, body: bytes = b"VALUE = 7\n") -> Path:
    """A minimal pure-Python wheel of one module, gpu_run_probe, whose code is ``body``, as a wheel builder would
    write it (METADATA, WHEEL, RECORD with digests)."""
    import base64
    import hashlib
    import zipfile

    files = {"gpu_run_probe/__init__.py": body,
             "gpu_run_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpu_run_probe\nVersion: 1.0\n",
             "gpu_run_probe-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = lambda b: base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n" for name, data in files.items())
    files["gpu_run_probe-1.0.dist-info/RECORD"] = (record + "gpu_run_probe-1.0.dist-info/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_run_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def gpu_run(wheels: Path, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """bench/gpu_run.sh WHEELS OUT with its steps at toy sizes on the CPU (GPU_RUN_DEVICE=cpu), this Python."""
    from bench.common import fresh_process_env

    env = {**fresh_process_env(), "GPU_RUN_DEVICE": "cpu", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), str(wheels), str(out)], env=env,
                          cwd=out.parent, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # two DeepSpeed engines and bench/mfu.py, each in a process of its own
def test_the_gpu_run_rehearses_its_steps_on_the_cpu(tmp_path):
    """bench/gpu_run.sh is the one command for a GPU machine without network (never one of CI's): with
    GPU_RUN_DEVICE=cpu it runs the same steps at toy sizes: installs the carried wheels apart from the machine's
    packages, imports what they hold, runs bench/gpu_check.py and bench/mfu.py, and leaves logs and figures."""
    from bench.common import read_json

    wheels, out = tmp_path / "wheels", tmp_path / "out"
    probe_wheel(wheels)
    proc = gpu_run(wheels, out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "carried by the wheels: gpu_run_probe" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json", "gpu_check.log", "imports.log", "install.log", "mfu.json", "mfu.log"]
    check_log = (out / "gpu_check.log").read_text()
    assert "every token valid: True" in check_log and our_lines(check_log)[-1].startswith("summary:")
    got = {f.name: f.value for f in read_json(str(out / "gpu_check.json"))}
    for l in (1, 2, 4):  # the static path and the compact path compute the same numbers
        assert got[f"head_l{l}_value_err"] < 1e-4 and got[f"head_l{l}_grad_rel_err"] < 1e-4
    assert got["tokens_per_s_plain"] > 0 and got["tokens_per_s_time_conditioned"] > 0
    mfu = {f.name: f.value for f in read_json(str(out / "mfu.json"))}
    assert 0 < mfu["mfu"] < 1 and mfu["train_tokens_per_s"] > 0


def test_the_gpu_run_refuses_without_wheels_and_names_a_module_that_does_not_import(tmp_path):
    """No wheels: exit 2 with the command that makes them, before any Python starts. A carried module that does
    not import is named with the fix, and no check runs (on a lent GPU, seconds spent instead of minutes)."""
    proc = gpu_run(tmp_path / "none", tmp_path / "out", timeout=60)
    assert proc.returncode == 2 and "python bench/gpu_wheels.py" in proc.stderr, proc.stderr

    probe_wheel(tmp_path / "wheels", body=b"import no_such_module_for_gpu_run\n")
    proc = gpu_run(tmp_path / "wheels", tmp_path / "out", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "cannot import: gpu_run_probe (No module named 'no_such_module_for_gpu_run')" in proc.stdout
    assert "python bench/gpu_wheels.py --also NAME" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["imports.log", "install.log"]


def test_gpu_wheels_pins_the_versions_installed_here():
    from importlib import metadata

    from bench import gpu_wheels

    assert gpu_wheels.pinned(["deepspeed", "webdataset"]) == [
        f"deepspeed=={metadata.version('deepspeed')}", f"webdataset=={metadata.version('webdataset')}"]
    with pytest.raises(SystemExit, match="no-such-distribution-x is not installed here"):
        gpu_wheels.pinned(["no-such-distribution-x"])


def test_seeded_tables_pair_by_seed_and_report_the_token_joint_apart():
    """bench/paper_table.py and bench/image_table.py (hours of training, never run here): their statistics and
    tables on made-up runs. A paired difference is the mean of per-seed differences with SE sd / sqrt(n), only
    over the seeds both families have; token_joint is shown only for l > 1; the summary sorts the differences by
    size in SE and never calls one a win."""
    from bench import image_table, paper_table

    d = paper_table.paired({0: 5.0, 1: 5.2, 2: 5.1, 3: 9.0}, {0: 4.9, 1: 5.0, 2: 5.05})
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert math.isclose(d["mean"], (0.1 + 0.2 + 0.05) / 3)
    assert math.isclose(d["se"], paper_table.mean_sd([0.1, 0.2, 0.05])[1] / math.sqrt(3))

    def run(nelbo, l=1, objective="diffusion", joint=None):
        return {"nelbo_per_token": nelbo, "ppl": math.exp(nelbo), "stderr": 0.01, "l": l, "objective": objective,
                "token_joint_not_a_bound": joint, "flops_per_token": 6e6, "parameters": 10**6, "train_s": 60.0}

    mdm = {s: run(5.40 + 0.01 * s, joint=5.40 + 0.01 * s) for s in range(3)}
    prime = {s: run(5.45 + 0.012 * s, l=2, joint=5.30 + 0.012 * s) for s in range(3)}
    ar = {s: run(3.2, objective="ar") for s in range(3)}
    rows = [paper_table.aggregate("mdm", "MDM (l=1)", mdm, mdm), paper_table.aggregate("prime2", "Prime (l=2)", prime, mdm),
            paper_table.aggregate("ar", "AR", ar, mdm)]
    assert rows[0]["token_joint"] is None and rows[2]["token_joint"] is None  # l = 1 and AR: '-'
    assert math.isclose(rows[1]["inflation"][0], 0.15)
    table = paper_table.format_table(rows)
    assert "(baseline)" in table and "token_joint (not a bound)" in table and "0.1500 ± 0.0000" in table
    summary = paper_table.summary_line(rows, 3, 600)
    assert summary.startswith("summary: ") and "> 3 SE: Prime (l=2) +0.0" in summary and "AR -2." in summary
    assert "2 degrees of freedom" in summary and "beats" not in summary

    def image_run(bpd, fid):
        return {"bits_per_dim": bpd, "fid": fid, "inception_score": 1.001, "nfe": 30.0, "l": 1,
                "parameters": 1000, "flops_per_token": 1e5, "train_s": 10.0}

    base = {s: image_run(2.0 + 0.01 * s, 5.0 + s) for s in range(3)}
    other = {s: image_run(2.1 + 0.01 * s, 5.0 + s) for s in range(3)}
    rows = [image_table.aggregate("mdm", base, base), image_table.aggregate("prime2", other, base)]
    text = image_table.format_table(rows, {"samples": 200, "fid": 0.01, "inception_score": 1.002})
    assert "data (val, 200 images)" in text and "+0.1000 ± 0.0000" in text
    assert "equal compute" in image_table.summary_line("digits", rows, 3, 1500, 1000)


def test_seeded_table_scripts_answer_help():
    for name in ("paper_table", "image_table"):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"], capture_output=True,
                              text=True, timeout=60, cwd="/")
        assert proc.returncode == 0 and "--seeds" in proc.stdout, (name, proc.stderr[-2000:])
