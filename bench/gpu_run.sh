#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU and PyTorch but no network, run from the root of a
# copy of this repository that holds the wheels bench/gpu_wheels.py made (at most about 9 minutes in all):
#
#   bash bench/gpu_run.sh [WHEELS=.gpu_wheels] [OUT_DIR=$OUT or runs/gpu_check]
#   GPU_RUN_DEVICE=cpu bash bench/gpu_run.sh WHEELS OUT_DIR     # the same steps at toy sizes on a CPU (a rehearsal:
#                                                               # tests/test_bench.py, or a copy of the GPU image)
#
# 1. installs those wheels (DeepSpeed, WebDataset, ...) into a temporary folder put first on PYTHONPATH, leaving the
#    machine's own packages alone, and imports everything the checks need, naming any module still missing;
# 2. python bench/gpu_check.py: the loss head's static path against the CPU, one bf16 engine step at owt_small's
#    shape without and with time conditioning, max_memory_allocated against the memory model, MFU against the
#    measured bf16 peak, a sample batch at C = 50,257 (at most GPU_CHECK_S seconds, default 330);
# 3. python bench/mfu.py on the GPU at owt_small's shape: eager against torch.compile with fused AdamW, and the
#    profile (at most MFU_S seconds, default 200).
# Each step's output goes to the terminal and to OUT_DIR/NAME.log, the figures to OUT_DIR/NAME.json; the script's
# status is the first failing step's (124: a step ran out of time; the logs keep what it printed).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=$(realpath -m "${1:-$REPO/.gpu_wheels}")
OUT_DIR=$(realpath -m "${2:-${OUT:-$REPO/runs/gpu_check}}")
cd "$REPO"
PYTHON=${PYTHON:-python3}
export GPU_RUN_DEVICE=${GPU_RUN_DEVICE:-cuda}
if [ "$GPU_RUN_DEVICE" = cpu ]; then
    CHECK_ARGS=(--device cpu --config tiny --batch 2 --head-rows 256 --vocab 300 --steps 1 --sample-steps 8)
    MFU_ARGS=(--device cpu --config tiny --batch 2 --steps 1 --warmup 1 --peak-size 256 --peak-repeats 1
              --profile-steps 1)
else
    CHECK_ARGS=()
    MFU_ARGS=(--device cuda --dtype bfloat16 --config owt_small --batch 16 --variants eager,compile+fused)
fi
SITE=$(mktemp -d /tmp/gpu_site.XXXXXX)
export GPU_RUN_SITE=$SITE
trap 'rm -rf "$SITE"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
status=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, logged; remember the first failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most $seconds s): $*"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$status" = 0 ]; then status=$rc; fi
    return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} = 0 ]; then
    echo "no wheels in $WHEELS: make them with 'python bench/gpu_wheels.py' where pip reaches an index" >&2
    exit 2
fi
step install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "${wheels[@]}" || exit "$status"
step imports 120 "$PYTHON" - <<'EOF' || exit "$status"
import importlib
import os
import sys
from pathlib import Path

import torch

# what the checks import, and every top-level module the wheels installed (so that a wheel built for another
# Python shows here, not minutes later)
site = Path(os.environ["GPU_RUN_SITE"])
carried = sorted({p.stem if p.suffix == ".py" else p.name for p in site.iterdir()
                  if p.suffix == ".py" or (p / "__init__.py").is_file()})
modules = ["yaml", "numpy", "fsspec", "tqdm", "safetensors", "tokenizers", "sentencepiece", *carried,
           "prime_scale.trainer", "prime_scale.objective", "bench.gpu_check", "bench.mfu"]
missing = []
for name in modules:
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
print(f"carried by the wheels: {', '.join(carried)}")
if missing:
    sys.exit("cannot import: " + "; ".join(missing) + "\nadd the distribution with "
             "'python bench/gpu_wheels.py --also NAME' where pip reaches an index")
if os.environ["GPU_RUN_DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device is visible (GPU_RUN_DEVICE=cpu rehearses the steps on a CPU)")
print(f"all {len(modules)} modules import")
EOF
step gpu_check "${GPU_CHECK_S:-330}" "$PYTHON" bench/gpu_check.py "${CHECK_ARGS[@]}" --json "$OUT_DIR/gpu_check.json"
step mfu "${MFU_S:-200}" "$PYTHON" bench/mfu.py "${MFU_ARGS[@]}" --json "$OUT_DIR/mfu.json"
exit "$status"
