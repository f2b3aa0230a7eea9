"""models.cli: the one logging setup, the one-line bad-input report, atomic output files."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from models.cli import OutputError, atomic_output, output_folder, report_input_error, setup_logging
from models.errors import EXIT_BAD_INPUT, InputError


@contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without pytest's capture handlers (what a real process starts with), restored after.

    Entered inside the test: pytest adds its handlers for the test's call phase, after fixtures ran."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    for handler in saved:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_setup_logging_console_and_file_once(tmp_path: Path) -> None:
    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, width=200)
    log_file = tmp_path / "run" / "train.log"
    with bare_root() as root:
        setup_logging(True, console=console, log_file=log_file)
        setup_logging(True, console=console, log_file=log_file)  # again (as after a lock is taken): nothing doubles
        assert len(root.handlers) == 2 and root.level == logging.INFO
        logging.getLogger("some.module").info("hello %d", 42)
        logging.getLogger("accelerate").info("noise")  # a noisy library: warnings only
        assert stream.getvalue().count("hello 42") == 1 and "noise" not in stream.getvalue()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO some.module: hello 42")


def test_setup_logging_other_ranks_warn_only_and_write_no_file(tmp_path: Path) -> None:
    with bare_root() as root:
        setup_logging(False, log_file=tmp_path / "train.log")
        assert root.level == logging.WARNING and len(root.handlers) == 1
    assert not (tmp_path / "train.log").exists()


def test_setup_logging_leaves_a_harness_alone() -> None:
    harness = logging.StreamHandler(io.StringIO())
    with bare_root() as root:
        root.addHandler(harness)
        setup_logging(True)
        assert root.handlers == [harness]  # no second console handler: each line would show twice


def test_report_input_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert report_input_error(InputError("a.bin: broken\nacross lines")) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: a.bin: broken across lines\n"


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.json"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_text("{}")
        assert not out.exists()  # nothing at the final path until the block ends well
    assert out.read_text() == "{}" and sorted(p.name for p in out.parent.iterdir()) == ["result.json"]


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="writer bug"):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer bug")  # not a write failure: propagates as it is
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(OutputError, match=f"^{out}: cannot be written \\(No space left on device\\)$"):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_output_paths_that_are_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="folder: is a folder, expected a file path"):
        with atomic_output(tmp_path / "folder"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file: is a file, expected an output folder"):
        output_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        output_folder(tmp_path / "file" / "below")
    assert output_folder(tmp_path / "new" / "deep").is_dir()
    assert issubclass(OutputError, InputError)
