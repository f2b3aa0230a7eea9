"""What every entry point shares: the logging setup, the one-line report of bad input, and atomic output files.

Used by `trainer/main.py` and every `python -m` tool (`data.tools`, `evaluation.verification`, `evaluation.ijb`,
`trainer.export`, `trainer.convert`). It lives in `models/`, next to `models.errors`, for the same reason: `models/`
is the bottom of the import graph, so `data/` and `evaluation/` can use it without importing `trainer/` (which sits
above them), and it imports nothing of theirs. It holds no model code.

    try:
        ...
    except InputError as err:
        return report_input_error(err)      # "error: <message>" on stderr, one line; returns EXIT_BAD_INPUT (2)
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler

from models.errors import EXIT_BAD_INPUT, InputError

__all__ = ["OutputError", "atomic_output", "file_mode", "output_folder", "report_input_error", "setup_logging"]

# Libraries whose INFO lines would drown the run's own.
_NOISY_LOGGERS = ("DeepSpeed", "torch.distributed", "accelerate")


class OutputError(InputError):
    """An output file that cannot be written (a full disk, a file-size limit, a read-only or missing folder, a
    path that is a folder): the user's environment to fix, not a bug. The message names the path."""


# A log record with this attribute set goes to the log file only (the end-of-run summary, already on the console
# as a table): `logger.info(..., extra={FILE_ONLY: True})`.
FILE_ONLY = "file_only"


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY, False)


class _LogFile(logging.StreamHandler):  # type: ignore[type-arg]
    """A log file opened by the caller (no-follow): closed with the handler."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def setup_logging(is_main: bool = True, console: Console | None = None, log_file: Path | None = None) -> None:
    """The root logger of a process: INFO on the main process, WARNING elsewhere (other ranks).

    `console`: where the lines go (default: a stderr console), the same console as a progress bar so that the two
    do not overwrite each other. On a terminal the lines are rich's; anywhere else (a log file of a batch job, a CI
    capture) they are plain lines, never wrapped or cut, so a path in them stays whole. `log_file`: also written
    there, with times and logger names (main process only), opened without following a symbolic link. Called
    again, it replaces what it installed before. Handlers installed by others (a test harness's capture, a program
    that calls a tool's `main`) are left alone, and then no console handler is added: they show the lines already,
    and a second handler would print each line twice.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_arcface_setup", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = []
    if not root.handlers:
        console = console or Console(stderr=True)
        shown: logging.Handler
        if console.is_terminal:
            shown = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        else:
            shown = logging.StreamHandler(console.file)
            shown.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        shown.addFilter(_not_file_only)
        handlers.append(shown)
    if is_main and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # No symbolic link is followed: a planted `train.log -> elsewhere` is refused, not appended to.
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        file_handler = _LogFile(os.fdopen(fd, "a", encoding="utf-8"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        handler._arcface_setup = True  # type: ignore[attr-defined]  # marks what a later call replaces
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_input_error(err: InputError, stream: TextIO | None = None) -> int:
    """Print `error: <message>` as one line on stderr (never wrapped: paths in it stay copyable); returns
    `EXIT_BAD_INPUT`, the exit status of every entry point for bad input."""
    message = " ".join(str(err).split("\n"))
    print(f"error: {message}", file=stream or sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def output_folder(path: Path) -> Path:
    """`path` as an existing folder (created if needed), or an `OutputError` naming it: a file there, no permission.

    For a tool to call before its long work, so a bad output path fails at once rather than at the end."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path}: is a file, expected an output folder") from None
    except OSError as err:
        raise OutputError(f"{path}: cannot create the output folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the output folder is not writable")
    return path


def file_mode() -> int:
    """The permissions `open(path, "w")` gives a new file here: 0666 less the process umask (safetensors' writer and
    `tempfile` create 0600 files; outputs should not differ from plainly written ones)."""
    umask = os.umask(0)  # the only way to read it; set straight back (no file is created in between)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it is renamed to `path`, on any failure removed.

    A failed write (disk full, file too large, no permission) leaves neither a half-written `path` nor a temporary
    file, and becomes an `OutputError` naming `path`. The parent folder is created if needed. The temporary file is
    created new (`O_EXCL`, a unique name), so a link planted beside `path` is never written through, and the rename
    replaces a link at `path` instead of following it. The result has the mode of the file it replaces, or that of
    a plainly written new file.
    """
    tmp: Path | None = None
    try:
        if path.is_dir() and not path.is_symlink():
            raise OutputError(f"{path}: is a folder, expected a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        mode = file_mode()
        if path.is_file() and not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)  # rewriting a file keeps its permissions
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # no folder to hold it (the error above says why)
                pass
