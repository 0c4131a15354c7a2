"""The checks of every private DeepSpeed API prime_scale relies on (tests/private_api_checks.py), in a pytest process
of their own: DeepSpeed caches the process group it was set up with, so engines built in this process after another
test module destroyed its group would fail for that reason alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_every_private_deepspeed_api_in_use_still_behaves_as_relied_on():
    from test_engine import fresh_env

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(HERE / "private_api_checks.py")], cwd=HERE.parent, env=fresh_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "5 passed" in done.stdout, done.stdout[-2000:]
