"""Bad input of the training CLI that needs a process of its own: a write failure under a file-size limit ends in one
line on stderr, exit code 2, and nothing half-written (`python trainer/main.py`, what `accelerate launch` runs).
The refusals at start run in-process: tests/unit/test_start_refusals.py."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.launching import MAIN, REPO, TINY, env_for

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]


def train(args: list[str], cache: Path, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAIN), "--config", str(TINY), "--schedule.max_steps", "1", *args],
        cwd=REPO,
        env=env_for(cache),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def test_a_write_failure_leaves_no_half_written_checkpoint(tmp_path: Path, face_cache: Path) -> None:
    """RLIMIT_FSIZE: every file may grow to 300 kB, the checkpoint's model file needs more (EFBIG, "File too
    large", as a full disk would give ENOSPC)."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = train(["--output", str(out)], face_cache, preexec=limit)
    assert_one_line(proc, "File too large")
    checkpoints = out / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
    assert leftovers == [], leftovers
    assert not (out / "model.safetensors").exists()
