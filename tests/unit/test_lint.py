"""Style gates in the test command itself: ruff (lint) and mypy (types) over the project's packages."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.launching import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is a dev dependency: pip install -e '.[dev]'")
def test_ruff_is_clean() -> None:
    proc = subprocess.run(["ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
