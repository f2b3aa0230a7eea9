"""Running the real CLI (`accelerate launch ... trainer/main.py`) from tests, one or several processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "e2e" / "tiny.yaml"
CONFIGS = REPO / "accelerate_configs"
MAIN = REPO / "trainer" / "main.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(cache: Path, threads: int = 2) -> dict[str, str]:
    return dict(os.environ, ARCFACE_CACHE=str(cache), OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", COLUMNS="160")


def command(args: list[str], config_file: Path, script: Path = MAIN, launcher: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        *(launcher or []),
        str(script),
        *args,
    ]


def launch(
    args: list[str],
    cache: Path,
    config: str = "cpu",
    timeout: float = 300,
    script: Path = MAIN,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file accelerate_configs/<config>.yaml <script> <args>`, output captured."""
    config_file = Path(config) if config.endswith(".yaml") else CONFIGS / f"{config}.yaml"
    if launcher is None and "machines" not in config and config != "cpu":
        launcher = ["--main_process_port", str(free_port())]
    # One intra-op thread per process when several processes share this machine's two cores.
    threads = 2 if config == "cpu" else 1
    return subprocess.run(
        command(args, config_file, script, launcher),
        cwd=REPO,
        env=env_for(cache, threads),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(run: Path) -> list[float]:
    """The per-step losses of a finished run (from its last checkpoint's trainer_state.json)."""
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    return [loss for _, loss in json.loads((last / "trainer_state.json").read_text())["loss_history"]]


def train_directly(args: list[str], cache: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python trainer/main.py <args>`: one process, what `accelerate launch` runs, with the trainer's own exit
    code (the launcher reports any non-zero code of its child as 1)."""
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        cwd=REPO,
        env=env_for(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_ranks(worker: Any, args: tuple[Any, ...], world_size: int, timeout_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` spawned processes (torch.multiprocessing); a worker's exception
    is re-raised here, and ranks still running after ``timeout_s`` are killed and fail the test: a hang in a
    collective cannot block the suite."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=world_size, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    # join() re-raises a worker's exception (and stops the other workers); poll so that a hang is bounded.
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} ranks did not finish within {timeout_s} s")
