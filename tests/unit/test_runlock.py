"""trainer.runlock: the folder lock (a second holder, a killed holder) and what a run does with the folder it finds.

The end-to-end behaviour (refusals through the CLI, several processes, signals) is in tests/e2e/test_run_control.py;
here each row of the README's fresh / resume / overwrite table, quickly, on hand-made checkpoint folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models.run_folder import RunFolder
from trainer import checkpoint as ckpt
from trainer.runlock import RunFolderError, RunLock, plan_run

TAKE = "import sys, pathlib\nfrom trainer.runlock import RunLock\nRunLock(pathlib.Path(sys.argv[1])).acquire()"
# A run's hold on the folder as RunLock takes it, in plain Python (no torch import: this one gets killed).
HOLD = """import fcntl, json, os, sys, time
fd = os.open(sys.argv[1] + "/.lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": "t"}).encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = RunFolder(out).checkpoint(step)
    folder.path.mkdir(parents=True)
    folder.trainer_state.write_text(json.dumps({"step": step}))
    if complete:
        folder.write_manifest(step, 1)
    return folder.path


@pytest.mark.fast_launch
def test_a_second_holder_is_refused_and_a_killed_one_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunLock(out) as lock:
        assert lock.took_over is None
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", TAKE, str(out)], capture_output=True, text=True)
        assert other.returncode == 1
        assert f"{out} is in use by another run (pid {os.getpid()} on {holder['host']}, started " in other.stderr
    assert (out / ".lock").read_text() == ""  # released cleanly

    # A holder killed with the lock held: the kernel dropped the flock, its record stays and is taken over.
    killed = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline() == "held\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with RunLock(out) as lock:
        assert lock.took_over == f"pid {killed.pid} on h, started t"


def test_fresh_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert plan_run(out, None, overwrite=False).resume_from is None  # nothing there
    out.mkdir()
    (out / "train.log").write_text("a run that failed at start\n")
    assert plan_run(out, None, overwrite=False).moved_to is None  # a log alone is no earlier run
    _checkpoint(out, 3, complete=False)  # even an incomplete checkpoint is an earlier run's
    (out / "model.safetensors").write_text("model")
    with pytest.raises(RunFolderError, match=r"holds an earlier run's checkpoints up to step-00000003 and model"):
        plan_run(out, None, overwrite=False)
    with pytest.raises(ckpt.CheckpointError, match="step-00000003 is incomplete"):
        plan_run(out, "auto", overwrite=False)  # auto resumes when there is a checkpoint, even a broken one
    plan = plan_run(out, None, overwrite=True)
    assert plan.resume_from is None and plan.moved == ["checkpoints", "model.safetensors", "train.log"]
    assert plan.moved_to is not None and plan.moved_to.parent == out
    assert (plan.moved_to / "checkpoints" / "step-00000003").is_dir()
    assert sorted(p.name for p in out.iterdir()) == [plan.moved_to.name]


def test_resume_newest_and_auto(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointError, match="--resume: no checkpoint in"):
        plan_run(out, "newest", overwrite=False)
    assert plan_run(out, "auto", overwrite=False).resume_from is None  # empty: auto starts fresh
    _checkpoint(out, 3)
    newest = _checkpoint(out, 6)
    assert plan_run(out, "newest", overwrite=False).resume_from == newest
    assert plan_run(out, "auto", overwrite=False).resume_from == newest
    with pytest.raises(RunFolderError, match="contradict"):
        plan_run(out, "auto", overwrite=True)


def test_resume_path(tmp_path: Path) -> None:
    out = tmp_path / "run"
    old = _checkpoint(out, 3)
    _checkpoint(out, 6)
    with pytest.raises(RunFolderError, match=r"also holds later checkpoints \(step-00000006\)"):
        plan_run(out, old, overwrite=False)  # its trajectory and this run's would mix
    # A later checkpoint that cannot be resumed (a kill during the save of step 9) is moved out of the way.
    (out / "checkpoints" / "step-00000006" / "trainer_state.json").write_text("changed")
    _checkpoint(out, 9, complete=False)
    plan = plan_run(out, old, overwrite=False)
    assert plan.resume_from == old.resolve()
    assert plan.moved == ["checkpoints/step-00000006", "checkpoints/step-00000009"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    # Another run's checkpoint: this folder must hold no earlier run, as for a fresh run.
    other = tmp_path / "other"
    assert plan_run(other, old, overwrite=False).resume_from == old.resolve()
    other.mkdir()
    (other / "model.safetensors").write_text("model")
    with pytest.raises(RunFolderError, match="holds an earlier run's model.safetensors"):
        plan_run(other, old, overwrite=False)
    with pytest.raises(ckpt.CheckpointError):
        plan_run(other, tmp_path / "nowhere", overwrite=False)


def test_the_checkpoint_folder_is_checked_at_start_and_left_as_found(tmp_path: Path) -> None:
    from trainer.runlock import check_checkpoints_writable

    fresh = RunFolder(tmp_path / "fresh")
    fresh.root.mkdir()
    check_checkpoints_writable(fresh)  # writable: nothing left behind for a run that is refused later at start
    assert list(fresh.root.iterdir()) == []
    kept = RunFolder(tmp_path / "kept")
    kept.checkpoints.mkdir(parents=True)
    check_checkpoints_writable(kept)
    assert kept.checkpoints.is_dir() and list(kept.checkpoints.iterdir()) == []
    blocked = RunFolder(tmp_path / "blocked")
    blocked.root.mkdir()
    blocked.checkpoints.write_text("in the way")
    with pytest.raises(RunFolderError, match="checkpoints: is a file, not a folder"):
        check_checkpoints_writable(blocked)
