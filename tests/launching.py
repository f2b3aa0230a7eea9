"""Running the real CLI (`accelerate launch ... trainer/main.py`) from tests, one or several processes; and ranks
spawned from a test, each with its gloo process group (`spawn_ranks`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
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


# Bounds a hang, nothing else: three ranks that import torch on two busy cores can take minutes to start.
SPAWN_TIMEOUT_S = 600.0
# The threads of a gloo process group (ProcessGroupGloo's workers, gloo's TCP event loop), as Linux names them.
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def spawn_ranks(worker: Any, args: tuple[Any, ...], world_size: int, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` spawned processes (torch.multiprocessing), each rank inside the
    default gloo process group (none for one process; see `_rank`); a worker's exception is re-raised here, and
    ranks still running after ``timeout_s`` are killed and fail the test: a hang in a collective cannot block the
    suite."""
    import pytest
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="rendezvous-") as folder:
        init_file = str(Path(folder) / "store")
        context = mp.start_processes(
            _rank, args=(worker, args, world_size, init_file), nprocs=world_size, start_method="spawn", join=False
        )
        deadline = time.monotonic() + timeout_s
        # join() re-raises a worker's exception (and stops the other workers); poll so that a hang is bounded.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world_size} ranks did not finish within {timeout_s} s")


def _rank(rank: int, worker: Any, args: tuple[Any, ...], world_size: int, init_file: str) -> None:
    """One spawned rank: the process group's whole life, around ``worker(rank, *args)``.

    The group must be gone before the interpreter exits. torch.optim imports torch._dynamo the first time it builds
    an optimizer, and with it torch.distributed.nn.functional, whose functions take ``group=dist.group.WORLD`` as a
    default argument: imported after init_process_group, that default holds the live group, destroy_process_group
    cannot release it, and gloo is torn down during interpreter finalization instead, while the other ranks exit
    too (the likely cause of a rank's SIGABRT, "terminate called without an active exception", on a busy machine:
    docs/testing.md). Imported first, the default is None. The check after destroy_process_group fails the rank if
    anything else keeps a group alive.
    """
    import torch
    import torch._dynamo  # noqa: F401 - before init_process_group: see above
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share few cores
    if world_size == 1:  # one process is the plain code path: no process group
        worker(rank, *args)
        return
    # gloo's default timeout (30 min) stays: spawn_ranks bounds a hang much sooner.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
        dist.barrier()  # every rank is done with the group before any rank tears its end down
    finally:
        dist.destroy_process_group()
    # Joined threads can linger in /proc for a moment; a group that is still referenced never goes away.
    deadline = time.monotonic() + 60
    while (alive := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        raise RuntimeError(
            f"rank {rank}: the gloo process group outlived destroy_process_group (threads {alive} still run): "
            "something still refers to it, e.g. a module imported after init_process_group that binds "
            "dist.group.WORLD as a default argument"
        )


def gloo_threads() -> list[str]:
    """This process's gloo threads (empty where /proc is not available)."""
    tasks = Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else []:
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(name for name in names if name in GLOO_THREADS)
