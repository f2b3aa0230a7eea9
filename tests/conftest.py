"""Session fixtures, and the rule that keeps the fast tier fast (docs/testing.md, "Tiers").

The README's `python -m pytest` runs the fast tier: setup.cfg's addopts deselect `tier2`. A test of the fast tier
that starts a Python process (a subprocess running Python: `python ...`, `accelerate ...`; or a rank started by
spawn or forkserver) fails unless it is marked `fast_launch`: a launch costs seconds of interpreter and library
start-up, so each one in the fast tier is a decision, not an accident. Launch-heavy tests belong to the second tier
(`pytestmark = pytest.mark.tier2`). Forked workers (DataLoader, fork pools) are in-process parallelism, and
non-Python tools (`uname`, `git`) cost nothing worth a rule: neither counts.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import shlex
import shutil
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

_LAUNCHES = pytest.StashKey[list[str]]()
_launches: list[str] | None = None  # the running test's launches; None between tests


def _note(what: str) -> None:
    if _launches is not None:
        _launches.append(what)


def _words(args: Any) -> list[str]:
    """A subprocess command (Popen's ``args``) as a list of words."""
    if isinstance(args, str | bytes | os.PathLike):
        return shlex.split(os.fsdecode(args))
    return [os.fsdecode(arg) for arg in args]


def _runs_python(words: list[str]) -> bool:
    """Whether a command starts a Python interpreter: its program is a python executable or a script whose shebang
    names python (console scripts such as `accelerate`)."""
    if not words:
        return False
    program = shutil.which(words[0]) or words[0]
    if Path(program).name.startswith("python"):
        return True
    try:
        with open(program, "rb") as file:
            first_line = file.readline(256)
    except OSError:
        return False
    return first_line.startswith(b"#!") and b"python" in first_line


def pytest_configure(config: pytest.Config) -> None:
    """Watch process starts in this (the pytest) process for the whole session."""
    patch = pytest.MonkeyPatch()
    config.add_cleanup(patch.undo)
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def watched_popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if _launches is not None and _runs_python(words := _words(args)):
            _note(" ".join(words))
        popen_init(self, args, *rest, **kwargs)

    def watched_process_start(self: multiprocessing.process.BaseProcess) -> None:
        method = getattr(self, "_start_method", None) or multiprocessing.get_start_method(allow_none=True)
        if (method or multiprocessing.get_all_start_methods()[0]) != "fork":
            _note(f"{method} process {self.name}")
        process_start(self)

    patch.setattr(subprocess.Popen, "__init__", watched_popen_init)
    patch.setattr(multiprocessing.process.BaseProcess, "start", watched_process_start)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    # Setup counts: a module-scoped fixture that launches is charged to the first test that uses it.
    global _launches
    _launches = item.stash.setdefault(_LAUNCHES, [])
    try:
        return (yield)
    finally:
        _launches = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    launched = item.stash.get(_LAUNCHES, [])
    allowed = item.get_closest_marker("tier2") or item.get_closest_marker("fast_launch")
    if call.when == "call" and report.passed and launched and not allowed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is in the fast tier but started {len(launched)} process(es), the first: "
            f"{launched[0][:300]}\nMark it (or its module: pytestmark = pytest.mark.tier2) for the second tier, or, "
            "if this launch belongs in the fast tier, @pytest.mark.fast_launch (docs/testing.md, Tiers)."
        )
    return report


@pytest.fixture(scope="session")
def face_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated-faces cache for the whole session (the tiny recipe's dataset is written once)."""
    return tmp_path_factory.mktemp("faces-cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    """The tiny recipe (`tests/e2e/tiny.yaml`) trained once through `accelerate launch` for every module that needs
    a finished run: 12 steps, checkpoints at steps 3, 6, 9 and 12, the launcher's stdout in `stdout.txt`. Read it;
    copy it before changing anything in it (`shutil.copytree`)."""
    from tests.launching import TINY, launch

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    proc = launch(["--config", str(TINY), "--output", str(out)], face_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out
