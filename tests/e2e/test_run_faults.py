"""Nothing a user does loses a run or lies (#25), through the real command: what a finished run leaves in its
log files and on the console, a resume with nothing left to train, a data worker killed mid-run, a signal while the
trainer is still importing its libraries, and an Accelerate config that asks for GPUs on a machine without one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launching import CONFIGS, MAIN, REPO, TINY, command, env_for, free_port, launch, train_directly

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]

ARGS = ["--config", str(TINY), "--train.save_every", "0"]


def _start(args: list[str], cache: Path) -> subprocess.Popen[str]:
    """`python trainer/main.py ARGS` (what `accelerate launch` runs), stdout and stderr apart."""
    return subprocess.Popen(
        [sys.executable, str(MAIN), *args], cwd=REPO, env=env_for(cache), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _our_traceback(text: str) -> bool:
    """A traceback through this project's code (the launchers print their own)."""
    return any(
        f"/{d}/" in line
        for line in text.splitlines()
        if line.strip().startswith("File ")
        for d in ("trainer", "models", "heads", "data", "evaluation")
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_finished_run_and_its_resume(tmp_path: Path, face_cache: Path) -> None:
    """train.log ends with the summary rows, the versions and the exit line; the console's log lines are plain and
    unwrapped off a terminal (a path of more than 160 characters stays whole); no DeepSpeed accelerator warning in a
    run without DeepSpeed; metrics.jsonl has one record per log line and per evaluation. A `--resume` of the
    finished run says there was nothing to train, without a progress bar at 0.0 samples/s."""
    out = tmp_path / ("a-long-output-folder-name-" * 7)
    assert len(str(out)) > 160
    run = launch([*ARGS, "--output", str(out), "--schedule.max_steps", "2", "--eval.every", "0"], face_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    assert "Setting accelerator to CPU" not in console and "\x1b[" not in run.stdout
    saved = f"saved checkpoint {out}/checkpoints/step-00000002"
    assert any(line.endswith(saved) for line in run.stdout.splitlines()), run.stdout[-3000:]

    log = (out / "train.log").read_text().splitlines()
    tail = [line.split(": ", 1)[1] for line in log[-14:]]  # after "<time> INFO <logger>"
    assert tail[0].startswith("summary: network: r_lite (32-d)")
    assert tail[-3] == f"summary: checkpoints: {out}/checkpoints"
    assert tail[-2].startswith("summary: versions: python ") and "torch " in tail[-2] and "accelerate " in tail[-2]
    assert tail[-1] == "exit: finished (exit code 0)"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log_lines = [line for line in log if re.search(r" step \d+/2 epoch", line)]
    evaluations = [line for line in log if "Accuracy-Flip" in line]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and len(log_lines) == 2
    assert [r["step"] for r in records if "val/val" in r] == [2] and len(evaluations) == 1
    assert len(records) == len(log_lines) + len(evaluations)

    again = train_directly([*ARGS, "--output", str(out), "--schedule.max_steps", "2", "--resume"], face_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0.0 samples/s" not in again.stdout and "━" not in again.stdout
    assert "nothing to train (the checkpoint is at step 2 of 2)" in again.stdout
    assert (out / "train.log").read_text().rstrip().endswith("exit: finished (exit code 0)")


def test_a_killed_data_worker_stops_the_run_with_its_checkpoint(tmp_path: Path, face_cache: Path) -> None:
    """kill -9 of the loader's worker: no hang, no traceback; the step in progress completes, is saved, and the run
    ends with one line and exit code 5; the checkpoint resumes."""
    from trainer.checkpoint import check_resumable

    out = tmp_path / "out"
    proc = _start([*ARGS, "--output", str(out), "--schedule.max_steps", "6", "--data.num_workers", "1"], face_cache)
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if "step 1/6" in line:
            break
    own = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    (worker,) = [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == own]  # forked: same cmdline
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)  # no hang
    assert proc.returncode == 5, stderr[-3000:]
    (line,) = _errors(stderr)
    found = re.search(r"step-(\d{8})", line)
    assert found and "data worker face-loader-0 died (killed by signal 9" in line and "--resume" in line, line
    step = int(found.group(1))
    assert 1 <= step < 6
    assert not _our_traceback(stdout + stderr), (stdout + stderr)[-3000:]
    check_resumable(out / "checkpoints" / f"step-{step:08d}")
    log = (out / "train.log").read_text()
    assert f"step {step + 1}/6" not in log
    assert log.rstrip().endswith("exit: a data worker died (exit code 5)")
    assert not (out / "model.safetensors").exists()


def test_a_killed_data_worker_of_another_rank(tmp_path: Path, face_cache: Path) -> None:
    """2 processes, rank 1's worker killed: every rank completes the step in progress, saves it and exits 5 (the
    launcher: 1); the main process says what happened on rank 1, in one line."""
    out = tmp_path / "out"
    args = [*ARGS, "--output", str(out), "--schedule.max_steps", "30", "--data.num_workers", "1", "--eval.every", "0"]
    cmd = command(args, CONFIGS / "cpu_ddp_2proc.yaml", launcher=["--main_process_port", str(free_port())])
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env_for(face_cache, 1), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "step 1/30" in line:
            break
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    (rank1,) = [r for r in ranks if b"RANK=1" in Path(f"/proc/{r}/environ").read_bytes().split(b"\0")]
    own = Path(f"/proc/{rank1}/cmdline").read_bytes()
    children = Path(f"/proc/{rank1}/task/{rank1}/children").read_text().split()
    (worker,) = [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == own]
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]  # torchrun's agent: ChildFailedError, each rank's exit code 5
    assert stderr.count("exitcode  : 5") == 2, stderr[-3000:]
    (line,) = _errors(stderr)
    assert line.startswith("error: rank 1: data worker face-loader-0 died (killed by signal 9"), line
    (checkpoint,) = out.glob("checkpoints/step-*")
    assert str(checkpoint) in line
    assert not _our_traceback(stdout + stderr), (stdout + stderr)[-3000:]
    assert (out / "train.log").read_text().rstrip().endswith("exit: a data worker died (exit code 5)")


def test_a_signal_while_the_libraries_load(tmp_path: Path, face_cache: Path) -> None:
    """Ctrl-C while torch is being imported (before the trainer could install its handler in the old code): no
    KeyboardInterrupt traceback; the run stops after its first step with a checkpoint and exits 0."""
    out = tmp_path / "out"
    proc = _start([*ARGS, "--output", str(out), "--schedule.max_steps", "6", "--eval.every", "0"], face_cache)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while "libtorch" not in maps.read_text():  # torch's libraries are being loaded
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "KeyboardInterrupt" not in stdout + stderr and "Traceback" not in stdout + stderr
    assert "received SIGINT while starting" in stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]
    assert "interrupted: continue with --resume" in stdout


def test_a_signal_after_the_run_ended_leaves_its_exit_code(tmp_path: Path, face_cache: Path) -> None:
    """What Accelerate's plain launcher does after a Ctrl-C: it dies slowly, and its parent-death SIGTERM reaches a
    trainer that has saved its last step and is finishing, or already shutting down, when Python has put the
    default handlers back. Exit code 0 all the same, not "killed by SIGTERM"."""
    out = tmp_path / "out"
    proc = _start([*ARGS, "--output", str(out), "--schedule.max_steps", "1", "--eval.every", "0"], face_cache)
    log, deadline = out / "train.log", time.monotonic() + 600
    while not (log.is_file() and "saved checkpoint" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    while proc.poll() is None:  # SIGTERM, again and again, until the process is gone
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.001)
    assert proc.returncode == 0, proc.returncode


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("config", ["single_gpu_bf16", "multi_gpu_bf16"])
def test_a_gpu_config_on_a_machine_without_cuda(config: str, tmp_path: Path, face_cache: Path) -> None:
    """Accelerate would train on the CPU instead, without a word: refused with one line naming the CPU configs,
    before anything is written (the plain launcher for one GPU, torchrun for several: here 2 processes)."""
    launcher = ["--num_processes", "2", "--main_process_port", str(free_port())] if "multi" in config else None
    out = tmp_path / "out"
    proc = launch([*ARGS, "--output", str(out)], face_cache, config=config, launcher=launcher)
    assert proc.returncode == 1  # the launcher's code for a failed trainer (README)
    (line,) = _errors(proc.stderr)
    assert f"the Accelerate config {CONFIGS / config}.yaml asks for GPUs (use_cpu: false)" in line, line
    assert "no CUDA device" in line and "accelerate_configs/cpu.yaml" in line
    assert not _our_traceback(proc.stdout + proc.stderr) and not out.exists()
