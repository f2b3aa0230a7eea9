"""Every bad input that stops the training CLI before its first step: one line on stderr naming the file, key or
value, exit code 2, and nothing written or half-written. `trainer.main.main` runs in this process
(tests/in_process.py); what needs a launch (a write failure under a file-size limit, the launcher's own exit code)
is in tests/e2e/test_bad_input_train.py."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from data.recordio import IRHeader, RecordWriter, pack
from tests.in_process import assert_one_line, main_in_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def train(
    face_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str]]:
    return lambda *args: main_in_process(list(args), face_cache, monkeypatch, capsys)


def _jpeg(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 90, 60)).save(path, quality=90)


def test_an_empty_image_folder(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    (tmp_path / "faces").mkdir()
    out = tmp_path / "out"
    code, err = train("--data.source", "image_folder", "--data.root", str(tmp_path / "faces"), "--output", str(out))
    assert_one_line(code, err, str(tmp_path / "faces"))
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_an_image_folder_of_unaligned_images(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    for identity in range(3):
        _jpeg(tmp_path / "faces" / f"id{identity}" / "a.jpg", (200, 150))
    code, err = train("--data.source", "image_folder", "--data.root", str(tmp_path / "faces"), "--output",
                      str(tmp_path / "out"))  # fmt: skip
    assert_one_line(code, err, "a.jpg", "112x112")


def test_an_empty_record_file(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "train.rec").write_bytes(b"")
    (tmp_path / "rec" / "train.idx").write_bytes(b"")
    code, err = train("--data.source", "recordio", "--data.root", str(tmp_path / "rec"), "--output",
                      str(tmp_path / "out"))  # fmt: skip
    assert_one_line(code, err, "train.idx")


def _headers_only(root: Path, labels: list[int]) -> Path:
    """A plain im2rec folder (no layout record): labels in the headers, a few payload bytes (the run stops before
    any image is decoded)."""
    root.mkdir(parents=True)
    with RecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, label in enumerate(labels):
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), b"not decoded"))
    return root


def _cut_idx(root: Path) -> str:
    lines = (root / "train.idx").read_text().splitlines(keepends=True)
    (root / "train.idx").write_text("".join(lines[:40]))
    return f"{root / 'train.idx'} lists 40 records, but {root / 'train.rec'} holds 109"


def _wrong_property(root: Path) -> str:
    (root / "property").write_text("50,112,112\n")
    return f"{root / 'property'} says 50 classes, but the labels of {root / 'train.rec'} span 12 (0..11)"


@pytest.mark.parametrize("damage", [_cut_idx, _wrong_property], ids=["idx_lists_40_of_109", "property_50_of_12"])
def test_inconsistent_recordio_names_both_sides(
    tmp_path: Path, damage: Callable[[Path], str], train: Callable[..., tuple[int, str]]
) -> None:
    root = _headers_only(tmp_path / "data", [k % 12 for k in range(109)])
    expected = damage(root)
    out = tmp_path / "run"
    code, err = train("--data.source", "recordio", "--data.root", str(root), "--output", str(out))
    assert expected in assert_one_line(code, err)
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_an_output_path_that_is_a_file(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    (tmp_path / "out").write_text("not a folder")
    code, err = train("--output", str(tmp_path / "out"))
    assert_one_line(code, err, str(tmp_path / "out"))
    assert (tmp_path / "out").read_text() == "not a folder"


def test_an_output_folder_that_cannot_be_written(train: Callable[..., tuple[int, str]]) -> None:
    # Root may write anywhere a mode allows it not to: /proc refuses every new entry, whoever asks.
    code, err = train("--output", "/proc/arcface-accelerate-out")
    assert_one_line(code, err, "/proc/arcface-accelerate-out")


def test_a_checkpoints_folder_that_cannot_be_made(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    code, err = train("--output", str(out))
    assert_one_line(code, err, str(out / "checkpoints"))
    assert (out / "checkpoints").read_text() == "in the way"


def test_resume_without_a_checkpoint(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    code, err = train("--output", str(tmp_path / "empty"), "--resume")
    assert "--resume: no checkpoint in" in assert_one_line(code, err)


def test_an_unknown_key(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    code, err = train("--output", str(tmp_path), "--optim.learning_rate", "0.1")
    assert "unknown key 'optim.learning_rate'" in assert_one_line(code, err)


def test_a_resume_with_another_network(tmp_path: Path, train: Callable[..., tuple[int, str]]) -> None:
    """The committed checkpoint of the tiny recipe (tests/fixtures/checkpoint_v1), resumed with another embedding
    size: refused naming both values, the checkpoint left as it was."""
    checkpoint = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1" / "step-00000006"
    out = tmp_path / "copy"
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    before = sorted((p.name, p.read_bytes()) for p in (out / "checkpoints" / checkpoint.name).iterdir())
    code, err = train("--output", str(out), "--resume", "--network.embedding_size", "64")
    line = assert_one_line(code, err)
    assert "network.embedding_size=32" in line and "network.embedding_size=64" in line
    assert sorted((p.name, p.read_bytes()) for p in (out / "checkpoints" / checkpoint.name).iterdir()) == before
