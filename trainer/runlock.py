"""One run per output folder, and what a run does with the folder it finds: start fresh, resume, or refuse.

The main process holds an exclusive `flock` on `<output>/.lock` for the whole run, before anything (train.log
included) is written there; a second run on the same folder fails at once, naming the holder. The kernel drops a
`flock` when its holder dies, however it dies: a lock file that still names a holder while the lock is free is
the leftover of a run that was killed, and is taken over (with a log line). On NFS, `flock` is only as reliable
as the server's lock manager.

`plan_run` decides, on the main process, from the folder's contents and `--resume` / `--overwrite`; the decision
is then shared with every rank (`trainer.distributed.main_process_decides`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from models.errors import InputError
from models.run_folder import CheckpointFolder, RunFolder
from trainer import checkpoint as ckpt

ResumeRequest = Literal["newest", "auto"] | Path | None


class RunFolderError(InputError):
    """The output folder is in use by another run, or holds results this run would overwrite."""


class RunLock:
    """Holds `<output>/.lock` (pid, host, start time) from `acquire()` to `release()` (or a `with` block)."""

    def __init__(self, output: RunFolder | Path) -> None:
        self.folder = output if isinstance(output, RunFolder) else RunFolder(output)
        self.output = self.folder.root
        self.path = self.folder.lock
        self.fd: int | None = None
        self.took_over: str | None = None  # the stale holder this run replaced, for a log line once logging is up

    def acquire(self) -> None:
        """Take the folder, or raise `RunFolderError` naming the run that holds it."""
        self.folder.refuse_links()  # a planted link (.lock, train.log, ...) is never written through
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            # Never unlinked: a run that opened the old file while another deleted it would lock a file nobody else
            # sees. O_NOFOLLOW: a link planted after the check above fails here (ELOOP) instead of being followed.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a file in the way, a read-only or missing file system, no permission, a link
            raise RunFolderError(f"output folder {self.output}: cannot use it ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunFolderError(
                f"{self.output} is in use by another run ({holder}): wait for it, stop it, or choose another --output"
            ) from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():  # a holder that released nothing: it was killed
            self.took_over = _describe(previous)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Give the folder back (nothing if not held)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # empty: a clean release, not a run that died
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


@dataclass
class RunPlan:
    """What this run does with its output folder; the same on every rank."""

    resume_from: Path | None = None  # the checkpoint to continue from; None: a fresh run
    moved_to: Path | None = None  # where what was in this run's way went (--overwrite, broken later checkpoints)
    moved: list[str] = field(default_factory=list)
    why: str = ""  # for the log line that says what was moved


def plan_run(output: RunFolder | Path, resume: ResumeRequest, overwrite: bool) -> RunPlan:
    """Decide from the folder's contents; raise `RunFolderError`/`CheckpointError` naming the way out.

    `resume`: None (a fresh run), "newest" (`--resume`), "auto" (resume if there is a checkpoint, else start
    fresh) or a checkpoint folder (`--resume PATH`). `overwrite` moves an earlier run's results to
    `<output>/replaced-<time>/` instead of refusing a fresh run.
    """
    output = output if isinstance(output, RunFolder) else RunFolder(output)
    steps = [c.path for c in output.step_folders()]
    if resume == "newest" or (resume == "auto" and steps):
        if overwrite:
            raise RunFolderError("--overwrite and --resume contradict each other: give one")
        return RunPlan(resume_from=newest_checkpoint(output))
    if isinstance(resume, Path):
        path = resume.resolve()
        ckpt.check_resumable(path)  # complete, and every file matches its manifest
        if path.parent != output.checkpoints.resolve():
            return _clear_for_new_run(output, overwrite, RunPlan(resume_from=path))  # another run's checkpoint
        if overwrite:
            raise RunFolderError(f"--overwrite would move away {path}, the checkpoint --resume names")
        return _drop_later_broken(output, path, steps)
    return _clear_for_new_run(output, overwrite, RunPlan())


def check_checkpoints_writable(output: RunFolder) -> None:
    """`<output>/checkpoints/` can take this run's checkpoints: created if needed, and a file can be made in it.
    Checked at start (main process, holding the folder), so that a file in the way, a read-only file system or a
    missing permission stops the run now, not at its first save hours later (`RunFolderError` naming the path).
    A folder made only for the probe is removed again: a run refused later at start leaves no trace."""
    path = output.checkpoints
    try:
        made = not path.exists()
        path.mkdir(exist_ok=True)
        probe, name = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
        os.close(probe)
        os.unlink(name)
        if made:
            path.rmdir()  # the first save makes it again (in the same, writable, parent)
    except FileExistsError:
        raise RunFolderError(f"{path}: is a file, not a folder: the run cannot save checkpoints there") from None
    except OSError as exc:
        raise RunFolderError(f"{path}: the run cannot save checkpoints there ({exc.strerror or exc})") from None


def newest_checkpoint(output: RunFolder) -> Path:
    """The checkpoint `--resume` continues from: the newest in `<output>/checkpoints`, verified (an incomplete or
    corrupt newest one is an error naming the newest valid one, never skipped silently)."""
    if not output.step_folders():
        raise ckpt.CheckpointError(f"--resume: no checkpoint in {output.checkpoints}")
    return ckpt.find_resumable(output)


def _drop_later_broken(output: RunFolder, path: Path, steps: list[Path]) -> RunPlan:
    """`--resume PATH` inside this folder. Later valid checkpoints would be mixed with this run's (a later
    `--resume` would continue the old trajectory): refused. Later broken ones (what makes a user pick an older
    checkpoint) would shadow this run's own as the newest: moved to `<output>/replaced-<time>/checkpoints/`."""
    later = [p for p in steps if (CheckpointFolder(p).step or -1) > (CheckpointFolder(path).step or -1)]
    valid, broken = [], []
    for folder in later:
        try:
            ckpt.check_resumable(folder)
            valid.append(folder.name)
        except ckpt.CheckpointError:
            broken.append(folder)
    if valid:
        raise RunFolderError(
            f"--resume {path}: {output.checkpoints} also holds later checkpoints ({', '.join(valid)}) that "
            "this run would mix with its own: move them away, or resume into another --output"
        )
    plan = RunPlan(resume_from=path, why="later checkpoints that cannot be resumed")
    if broken:
        plan.moved_to = output.new_replaced_folder() / output.CHECKPOINTS
        plan.moved_to.mkdir()
        for folder in broken:
            shutil.move(folder, plan.moved_to / folder.name)
            plan.moved.append(f"{output.CHECKPOINTS}/{folder.name}")
    return plan


def _clear_for_new_run(output: RunFolder, overwrite: bool, plan: RunPlan) -> RunPlan:
    """A run that does not continue this folder's checkpoints: refuse to mix with an earlier run's results."""
    earlier = output.holds_a_run()
    if not earlier:
        return plan
    if not overwrite:
        raise RunFolderError(
            f"{output.root} holds an earlier run's {' and '.join(earlier)}: continue it with --resume, start over "
            f"with --overwrite (moves them to {output.root}/replaced-<time>/), or choose another --output"
        )
    plan.moved_to, plan.why = output.new_replaced_folder(), "--overwrite: the earlier run's results"
    for name in output.RESULTS:
        path = output.root / name
        if path.exists() or path.is_symlink():
            shutil.move(path, plan.moved_to / name)
            plan.moved.append(name)
    return plan
