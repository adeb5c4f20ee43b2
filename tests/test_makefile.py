"""The Makefile's targets work on a fresh clone (read with ``make -n``, nothing is run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_lint_installs_what_mypy_bench_needs():
    # `mypy bench` type-checks the plots, which import matplotlib (the bench extra)
    plan = subprocess.run(
        ["make", "-n", "-B", "lint"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    installs = [i for i, line in enumerate(plan) if "pip install" in line and "bench" in line]
    checks = [i for i, line in enumerate(plan) if line.endswith("mypy bench")]
    assert installs
    assert checks
    assert installs[0] < checks[0]
