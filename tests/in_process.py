"""`trainer/main.py` in the test's own process, for refusals that stop a run before its first step.

A refusal at start needs no launch: `trainer.main.main(argv)` returns the exit code the process would exit with,
and its stderr is the test's. Launching it costs seconds of interpreter and library start-up per case
(docs/testing.md, "Tiers"). What `main` changes in the process is put back afterwards: the SIGINT / SIGTERM
handlers it installs, the signals `StopSignal` recorded, the handlers `setup_logging` adds, the Accelerate state
singletons and the working directory. Runs that train go through a launch (`tests.launching`).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from tests.launching import REPO, TINY


def main_in_process(
    args: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``python trainer/main.py --config TINY --schedule.max_steps 1 *args`` here: (exit code, stderr)."""
    from accelerate.state import AcceleratorState, GradientState

    from trainer import main as trainer_main
    from trainer.distributed import StopSignal

    monkeypatch.setenv("ARCFACE_CACHE", str(cache))
    monkeypatch.chdir(REPO)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    received = list(StopSignal.received)
    capsys.readouterr()  # what came before is not this run's
    try:
        code = trainer_main.main(["--config", str(TINY), "--schedule.max_steps", "1", *args])
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        for handler in [h for h in root.handlers if h not in root_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(root_level)
        StopSignal.received[:] = received
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert os.environ.get("ARCFACE_CACHE") == str(cache)
    return code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, *names: str) -> str:
    """Exit status 2 (bad input), no traceback, one `error:` line on stderr naming each of ``names``."""
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]
