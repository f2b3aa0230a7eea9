"""Helpers for running the real CLI (`accelerate launch trainer/main.py`) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "e2e" / "tiny.yaml"
CPU_CONFIG = REPO / "accelerate_configs" / "cpu.yaml"


@pytest.fixture(scope="session")
def face_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faces-cache")


def launch(args: list[str], cache: Path, timeout: float = 300, config_file: Path = CPU_CONFIG) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> trainer/main.py <args>`; output captured."""
    env = dict(os.environ, ARCFACE_CACHE=str(cache), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", COLUMNS="160")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           str(REPO / "trainer" / "main.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
