"""Every bad input of the training CLI ends in one line on stderr naming the file, key or value, exit code 2, and
nothing half-written: walked through the real entry point (`python trainer/main.py`, what `accelerate launch`
runs), one case each."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.launching import MAIN, REPO, TINY, env_for

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]


def train(args: list[str], cache: Path, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAIN), "--config", str(TINY), "--schedule.max_steps", "1", *args],
        cwd=REPO,
        env=env_for(cache),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def _jpeg(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 90, 60)).save(path, quality=90)


def test_an_empty_image_folder(tmp_path: Path, face_cache: Path) -> None:
    (tmp_path / "faces").mkdir()
    proc = train(
        ["--data.source", "image_folder", "--data.root", str(tmp_path / "faces"), "--output", str(tmp_path / "out")],
        face_cache,
    )
    assert_one_line(proc, str(tmp_path / "faces"))


def test_an_image_folder_of_unaligned_images(tmp_path: Path, face_cache: Path) -> None:
    for identity in range(3):
        _jpeg(tmp_path / "faces" / f"id{identity}" / "a.jpg", (200, 150))
    proc = train(
        ["--data.source", "image_folder", "--data.root", str(tmp_path / "faces"), "--output", str(tmp_path / "out")],
        face_cache,
    )
    assert_one_line(proc, "a.jpg", "112x112")


def test_an_empty_record_file(tmp_path: Path, face_cache: Path) -> None:
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "train.rec").write_bytes(b"")
    (tmp_path / "rec" / "train.idx").write_bytes(b"")
    proc = train(
        ["--data.source", "recordio", "--data.root", str(tmp_path / "rec"), "--output", str(tmp_path / "out")],
        face_cache,
    )
    assert_one_line(proc, "train.idx")


def test_an_output_path_that_is_a_file(tmp_path: Path, face_cache: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    proc = train(["--output", str(tmp_path / "out")], face_cache)
    assert_one_line(proc, str(tmp_path / "out"))
    assert (tmp_path / "out").read_text() == "not a folder"


def test_an_output_folder_that_cannot_be_written(tmp_path: Path, face_cache: Path) -> None:
    # Root may write anywhere a mode allows it not to: /proc refuses every new entry, whoever asks.
    proc = train(["--output", "/proc/arcface-accelerate-out"], face_cache)
    assert_one_line(proc, "/proc/arcface-accelerate-out")


def test_a_checkpoints_folder_that_cannot_be_made(tmp_path: Path, face_cache: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    proc = train(["--output", str(out)], face_cache)
    assert_one_line(proc, str(out / "checkpoints"))


def test_a_write_failure_leaves_no_half_written_checkpoint(tmp_path: Path, face_cache: Path) -> None:
    """RLIMIT_FSIZE: every file may grow to 300 kB, the checkpoint's model file needs more (EFBIG, "File too
    large", as a full disk would give ENOSPC)."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = train(["--output", str(out)], face_cache, preexec=limit)
    assert_one_line(proc, "File too large")
    checkpoints = out / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
    assert leftovers == [], leftovers
    assert not (out / "model.safetensors").exists()
