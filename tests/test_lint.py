"""The tree is formatted and lint-clean, so `make test` (and CI) enforce what `make lint` says.

mypy runs in `make lint` only: it takes longer than the rest of this file together.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["attnscope", "tests", "benchmarks", "examples"]


def _ruff() -> str:
    found = Path(sys.executable).with_name("ruff")
    if found.exists():
        return str(found)
    which = shutil.which("ruff")
    if which is None:
        pytest.fail("ruff is not installed: `make install` installs the dev extras")
    return which


@pytest.mark.parametrize(
    "args", [["check", *TREES], ["format", "--check", *TREES]], ids=["ruff-check", "ruff-format"]
)
def test_ruff(args):
    proc = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
