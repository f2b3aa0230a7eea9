"""The tier rule of tests/conftest.py, run by pytest in this process on a scratch suite: a fast-tier test that starts
a Python process fails unless marked; the markers, forked workers and non-Python tools are let through; `-m tier2`
selects the second tier although setup.cfg's addopts deselect it."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]
SCRATCH_SUITE = """
import multiprocessing
import subprocess
import sys

import pytest


def test_launches():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.fast_launch
def test_launches_on_purpose():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.tier2
def test_launches_in_tier2():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_runs_a_tool():
    subprocess.run(["true"], check=True)


def test_forks():
    process = multiprocessing.get_context("fork").Process(target=sum, args=([],))
    process.start()
    process.join()
    assert process.exitcode == 0


def test_spawns():
    process = multiprocessing.get_context("spawn").Process(target=sum, args=([],))
    process.start()
    process.join()
"""


@pytest.fixture
def scratch(pytester: pytest.Pytester) -> pytest.Pytester:
    """A suite with this project's conftest and setup.cfg's [tool:pytest] section."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(TESTS.parent / "setup.cfg")
    options = {k: v.replace("\n", "\n    ") for k, v in ini["tool:pytest"].items() if k != "testpaths"}
    pytester.makeini("[pytest]\n" + "\n".join(f"{k} = {v}" for k, v in options.items()))
    pytester.makepyfile(test_scratch=SCRATCH_SUITE)
    return pytester


@pytest.mark.fast_launch  # the scratch tests start three small interpreters
def test_fast_tier_fails_an_unmarked_launch(scratch: pytest.Pytester) -> None:
    result = scratch.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2, deselected=1)
    failed = {report.nodeid.split("::")[1] for report in result.reprec.getfailures()}  # type: ignore[attr-defined]
    assert failed == {"test_launches", "test_spawns"}
    result.stdout.fnmatch_lines(["*test_launches is in the fast tier but started 1 process(es)*"])


@pytest.mark.fast_launch
def test_second_tier_is_selected_by_a_later_m(scratch: pytest.Pytester) -> None:
    result = scratch.runpytest_inprocess("-p", "no:cacheprovider", "-m", "tier2")
    result.assert_outcomes(passed=1, deselected=5)
