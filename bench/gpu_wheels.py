"""Wheels for a GPU machine that has PyTorch but no network (a cluster node behind a firewall, a rented GPU with a
frozen image): the packages the GPU checks import that such an image usually lacks, pinned to the versions installed
here (the ones CI tests), for the target machine's Python and platform, in one folder to copy over.

    python bench/gpu_wheels.py                         # -> .gpu_wheels/ (git ignores it), for CPython 3.12
    python bench/gpu_wheels.py --python-version 3.11 --out /tmp/wheels --also wandb
    # then, on the GPU machine, in a copy of this repository holding that folder:
    bash bench/gpu_run.sh .gpu_wheels OUT_DIR

What is carried (PACKAGES): DeepSpeed and its requirements that a PyTorch image seldom has (hjson, pydantic with
its compiled core), and WebDataset with braceexpand. PyTorch, NumPy, PyYAML, fsspec, tqdm, safetensors,
tokenizers, sentencepiece, matplotlib, torchmetrics and psutil are expected there; `bash bench/gpu_run.sh` imports
everything first and names what is still missing (add it with --also NAME).

DeepSpeed is on PyPI as a source archive only. Its wheel is built here, without compiled ops (DS_BUILD_OPS=0:
nothing prime_scale runs needs them; a GPU image's ninja and nvcc could still build one just in time), from the
archive of the installed version; it holds Python only and installs on any platform. The others are binary wheels
from the package index for --python-version and --platform (pip's manylinux tags). The folder ends with
requirements.txt, the list of what it holds, and the total size is printed: some machines cap what travels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# distribution names, as pip knows them; the version is the one installed here
PACKAGES = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
            "webdataset", "braceexpand")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned(names) -> list[str]:
    """``name==version`` for each distribution as installed here; a clear error for one that is not."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"bench/gpu_wheels.py: {name} is not installed here, so its version is unknown; "
                             f'install the project first (pip install -e ".[dev]")') from None
    return pins


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def dist(name: str) -> str:
    """A distribution's name as wheel files and pins both spell it (pydantic_core and pydantic-core are one)."""
    return name.lower().replace("_", "-")


def build(out: Path, python_version: str, platforms: tuple[str, ...], also: tuple[str, ...]) -> list[Path]:
    pins = pinned((*PACKAGES, *also))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):  # one version of each: two would stop the install there
        stale.unlink()
    deepspeed = next(p for p in pins if p.startswith("deepspeed=="))
    with tempfile.TemporaryDirectory() as tmp:  # its sdist, then a wheel of it built against this machine's torch
        pip("download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", "--quiet", "-d", tmp, deepspeed)
        pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
            *map(str, Path(tmp).iterdir()), env={**os.environ, "DS_BUILD_OPS": "0"})
    pip("download", "--no-deps", "--only-binary=:all:", "--quiet", "--implementation", "cp", "--python-version",
        python_version, *(f"--platform={p}" for p in platforms), "-d", str(out), *(p for p in pins if p != deepspeed))
    wheels = sorted(out.glob("*.whl"))
    names = {dist(w.name.split("-")[0]) for w in wheels}
    missing = [p for p in pins if dist(p.split("==")[0]) not in names]
    if missing:
        raise SystemExit(f"bench/gpu_wheels.py: no wheel for {', '.join(missing)} in {out}")
    (out / "requirements.txt").write_text("".join(f"{p}\n" for p in pins))
    return wheels


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / ".gpu_wheels"), help="the folder (its old wheels are replaced)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    p.add_argument("--platform", action="append", default=[],
                   help=f"pip platform tag, repeatable (default: {', '.join(PLATFORMS)})")
    p.add_argument("--also", action="append", default=[], metavar="NAME",
                   help="one more distribution to carry (at its version installed here), repeatable")
    args = p.parse_args(argv)
    out = Path(args.out)
    wheels = build(out, args.python_version, tuple(args.platform) or PLATFORMS, tuple(args.also))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {out} (Python {args.python_version}); on the GPU machine: "
          f"bash bench/gpu_run.sh {os.path.relpath(out, REPO) if out.is_relative_to(REPO) else out} OUT_DIR")
    return wheels


if __name__ == "__main__":
    main()
