"""Real prose for the text tests: Debian's python3.11-doc reStructuredText sources (.ci/run installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def py_docs(sub: str, n: int) -> list[Path]:
    """The first n .rst.txt files (sorted) of a docs folder, e.g. 'library' or 'tutorial'."""
    if not PY_DOCS.is_dir():
        pytest.fail("Debian's python3.11-doc is not installed (apt-get install python3.11-doc; .ci/run does it)")
    files = sorted((PY_DOCS / sub).glob("*.rst.txt"))[:n]
    assert len(files) == n
    return files


def docs_subset(dest: Path, n: int = 40, sub: str = "library") -> list[Path]:
    """A fixed set of n real documents copied into ``dest``; returns the copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in py_docs(sub, n):
        shutil.copy(f, dest / f.name)
    return sorted(dest.glob("*.rst.txt"))
