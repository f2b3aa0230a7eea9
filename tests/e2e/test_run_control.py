"""One run per output folder, and signals, through the real CLI (`accelerate launch ... trainer/main.py`).

Every interrupted run is resumed and must end exactly where an uninterrupted run with the same arguments ended
(its final checkpoint's loss history and model weights). Runs are 8 steps of the tiny recipe; the
signal is sent once the run logged its first step, so it stops one or two steps later. Interrupted runs are chained
(interrupt, resume, interrupt again, resume to the end) to keep the number of launches down.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launching import CONFIGS, REPO, TINY, command, env_for, free_port, launch, train_directly

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]

STEPS = 8  # 1 process: 6 steps an epoch; 2 processes: 3
ARGS = ["--config", str(TINY), "--schedule.max_steps", str(STEPS), "--train.save_every", "0", "--eval.every", "0"]
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@pytest.fixture(scope="module", autouse=True)
def adopt_orphans() -> Iterator[None]:
    """This test process adopts orphaned descendants: a trainer whose launcher died becomes our child, and
    `os.waitpid` then gives its exit code."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _launch_two(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    return launch(args, cache, config="cpu_ddp_2proc")


def _start(args: list[str], cache: Path, processes: int) -> subprocess.Popen[str]:
    """The launcher in its own process group (a group signal then reaches it and its trainers, not pytest)."""
    if processes == 1:
        cmd = command(args, CONFIGS / "cpu.yaml")
    else:
        cmd = command(args, CONFIGS / "cpu_ddp_2proc.yaml", launcher=["--main_process_port", str(free_port())])
    # torchrun's agent gives its workers this long to exit after forwarding a signal (default 30 s).
    env = dict(env_for(cache, 2 if processes == 1 else 1), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="240")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _read_until(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never appeared:\n" + "".join(seen)[-3000:])


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker process that runs `rank` (from /proc: its children and their RANK)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among the launcher's children {children}")


def _holder_pid(out: Path) -> int:
    return int(json.loads((out / ".lock").read_text())["pid"])


def _history(checkpoint: Path) -> list[list[float]]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["loss_history"]


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _assert_same_run(out: Path, reference: Path) -> None:
    """The resumed run ended where the uninterrupted one did: losses and weights bit for bit."""
    final = f"checkpoints/step-{STEPS:08d}"
    assert _history(out / final) == _history(reference / final)
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def _our_traceback(text: str) -> bool:
    """A traceback through this project's code (torch elastic and accelerate print their own)."""
    return any(
        f"/{d}/" in line
        for line in text.splitlines()
        if line.strip().startswith("File ")
        for d in ("trainer", "models", "heads", "data", "evaluation")
    )


def _stopped_by_signal(out: Path, output: str, after: int = 0) -> int:
    """The checks every interrupted run passes; returns the step it stopped at (> `after`, where it started)."""
    found = re.findall(
        r"(?:received SIG(?:TERM|INT)|another rank received a stop signal): every rank stops after step (\d+)",
        (out / "train.log").read_text(),
    )
    assert found, output[-3000:]
    step = int(found[-1])
    assert after < step < STEPS
    assert _steps(out)[-1] == f"step-{step:08d}"
    assert "interrupted: continue with --resume" in output
    assert (out / ".lock").read_text() == ""  # released by the process itself, not left by a killed one
    assert not _our_traceback(output), output[-3000:]
    return step


def _interrupt(
    args: list[str], cache: Path, processes: int, target: str, after: int = 0, sig: signal.Signals = signal.SIGTERM
) -> int:
    """Start a run, send `sig` to `target` once it logged a step, check what every process returned; returns the
    step it stopped at."""
    out = Path(args[args.index("--output") + 1])
    proc = _start(args, cache, processes)
    _read_until(proc, f"step {after + 1}/{STEPS}")
    trainer = _holder_pid(out)
    if target == "launcher":
        proc.send_signal(sig)
    elif target == "rank 1":
        os.kill(_rank_pid(proc.pid, 1), sig)
    else:
        os.killpg(proc.pid, sig)
    assert proc.stdout is not None
    output = proc.stdout.read()  # EOF: every process sharing the pipe, trainers included, has exited
    if processes == 1:
        # The plain launcher dies at once; its trainer, adopted by this process, saved and exited 0.
        assert proc.wait(timeout=60) == -sig
        _, status = os.waitpid(trainer, 0)
        assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    elif target == "rank 1":
        # Rank 0 did not get the signal, but stops at the same step; every rank exits 0, and so does the agent.
        assert proc.wait(timeout=60) == 0, output[-3000:]
        assert "another rank received a stop signal" in (out / "train.log").read_text()
        assert "rank 1: received SIGTERM" in output
    else:
        # torchrun's agent forwards the signal, waits for its ranks, then raises its SignalException.
        assert proc.wait(timeout=60) == 1, output[-3000:]
        assert "SignalException" in output
    return _stopped_by_signal(out, output, after)


@pytest.fixture(scope="module")
def reference_1(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    """Uninterrupted, 1 process, with `--overwrite` in a folder holding an earlier run and the `.lock` of a killed
    run (taken over)."""
    out = tmp_path_factory.mktemp("reference-1")
    (out / ".lock").write_text('{"pid": 999999999, "host": "elsewhere", "started": "yesterday"}')
    (out / "checkpoints" / "step-00000009").mkdir(parents=True)
    (out / "model.safetensors").write_text("an earlier model")
    (out / "train.log").write_text("the earlier run's log\n")
    proc = train_directly([*ARGS, "--output", str(out), "--overwrite"], face_cache)  # no launcher: it takes time
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (replaced,) = out.glob("replaced-*")
    assert sorted(p.name for p in replaced.iterdir()) == ["checkpoints", "model.safetensors", "train.log"]
    assert (replaced / "checkpoints" / "step-00000009").is_dir()
    assert (replaced / "model.safetensors").read_text() == "an earlier model"
    log = (out / "train.log").read_text()
    assert "the earlier run's log" not in log
    moved = "--overwrite: the earlier run's results (checkpoints, model.safetensors, train.log)"
    assert f"moved {moved} to {replaced}" in log
    assert "took over" in log and "pid 999999999 on elsewhere, started yesterday" in log
    assert _steps(out) == [f"step-{STEPS:08d}"]
    return out


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    """Uninterrupted, 2 DDP processes; `--resume auto` in an empty folder starts fresh."""
    out = tmp_path_factory.mktemp("reference-2")
    proc = _launch_two([*ARGS, "--output", str(out), "--resume", "auto"], face_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" not in (out / "train.log").read_text()
    return out


def test_one_process(reference_1: Path, tmp_path: Path, face_cache: Path) -> None:
    """A second run on a busy folder fails at once, naming the holder, without writing into its train.log. SIGTERM
    to the launcher (which dies: 143; the trainer learns it from the parent-death signal), `--resume auto`,
    SIGTERM to the process group (what Slurm and Ctrl-C do), `--resume`: the same run as an uninterrupted one."""
    out = tmp_path / "run"
    first = _start([*ARGS, "--output", str(out)], face_cache, processes=1)
    _read_until(first, f"step 1/{STEPS}")
    trainer = _holder_pid(out)
    os.kill(trainer, signal.SIGSTOP)  # frozen with the lock held, while a second run tries the folder
    try:
        second = train_directly([*ARGS, "--output", str(out)], face_cache)
    finally:
        os.kill(trainer, signal.SIGCONT)
    assert second.returncode == 2
    assert f"{out} is in use by another run (pid {trainer} on " in second.stderr
    assert not _our_traceback(second.stderr)
    first.send_signal(signal.SIGTERM)  # the launcher only
    assert first.wait(timeout=60) == -signal.SIGTERM
    assert first.stdout is not None
    output = first.stdout.read()  # EOF: the trainer, which shares the pipe, has exited too
    _, status = os.waitpid(trainer, 0)  # adopted by this process when its launcher died
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    step = _stopped_by_signal(out, output)
    log = (out / "train.log").read_text()
    assert log.count("speed: ") == 1 and "refused" not in log  # nothing from the refused run

    step = _interrupt([*ARGS, "--output", str(out), "--resume", "auto"], face_cache, 1, "process group", step)
    resumed = train_directly([*ARGS, "--output", str(out), "--resume"], face_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "train.log").read_text().count("resumed from") == 2
    _assert_same_run(out, reference_1)


def test_ctrl_c_to_the_one_process_launcher(reference_1: Path, tmp_path: Path, face_cache: Path) -> None:
    """Ctrl-C in a terminal (SIGINT to the process group) with Accelerate's plain launcher: the launcher does not
    wait for its child on SIGINT, it dies at once (130 in a shell; the KeyboardInterrupt traceback it prints is its
    own, README); the trainer stops after its step, saves it and exits 0 without a traceback of ours. `--resume`
    ends where the uninterrupted run ended."""
    out = tmp_path / "run"
    _interrupt([*ARGS, "--output", str(out)], face_cache, 1, "process group", sig=signal.SIGINT)
    assert "received SIGINT: every rank stops after step" in (out / "train.log").read_text()
    resumed = train_directly([*ARGS, "--output", str(out), "--resume"], face_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, reference_1)


def test_two_processes(reference_2: Path, tmp_path: Path, face_cache: Path) -> None:
    """SIGTERM to the process group, `--resume PATH`, SIGTERM to the launcher, `--resume`, SIGTERM to rank 1 only,
    `--resume`: both ranks stop after the same step and save it each time; the result is the uninterrupted run's."""
    out = tmp_path / "run"
    step = _interrupt([*ARGS, "--output", str(out)], face_cache, 2, "process group")
    path = out / "checkpoints" / f"step-{step:08d}"
    step = _interrupt([*ARGS, "--output", str(out), "--resume", str(path)], face_cache, 2, "launcher", step)
    _interrupt([*ARGS, "--output", str(out), "--resume"], face_cache, 2, "rank 1", step)
    resumed = _launch_two([*ARGS, "--output", str(out), "--resume"], face_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, reference_2)


def test_a_used_folder_is_refused(reference_1: Path, tmp_path: Path, face_cache: Path) -> None:
    """A fresh run (2 processes: the main process refuses, the other rank must not hang) and an incompatible
    resume are both refused with one line, logged in train.log, leaving config.yaml and the checkpoints as they
    were."""
    out = tmp_path / "used"
    shutil.copytree(reference_1, out)
    config = (out / "config.yaml").read_text()

    fresh = _launch_two([*ARGS, "--output", str(out)], face_cache)
    assert fresh.returncode != 0
    line = f"{out} holds an earlier run's checkpoints up to step-{STEPS:08d} and model.safetensors"
    assert fresh.stderr.count(line) == 1, fresh.stderr[-3000:]  # once: the other rank stays quiet
    assert not _our_traceback(fresh.stderr)

    other = train_directly([*ARGS, "--output", str(out), "--resume", "--network.embedding_size", "64"], face_cache)
    assert other.returncode == 2
    assert "network.embedding_size=32" in other.stderr and "network.embedding_size=64" in other.stderr
    assert (out / "config.yaml").read_text() == config
    log = (out / "train.log").read_text()
    assert f"refused: {line}" in log and "refused: cannot resume from" in log
    assert _steps(out) == [f"step-{STEPS:08d}"]
