"""`python -m data.tools`: round trips of pack, shuffle and build-bin; inspect; scan; one-line errors."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data.dataset import RecordFaceDataset
from data.image_folder import list_image_folder
from data.recordio import RecordReader, decode_image, read_insightface_layout, write_insightface_layout
from data.tools import main
from evaluation.verification import load_bin


def _pixels(seed: int, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _jpeg(seed: int, size: int = 112) -> bytes:
    return simplejpeg.encode_jpeg(_pixels(seed, size), quality=90, colorspace="RGB")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three identities; one PNG, one undecodable file, one 64x64 image."""
    root = tmp_path / "images"
    for identity, count in (("bob", 3), ("al", 2), ("cy", 2)):
        (root / identity).mkdir(parents=True)
        for number in range(count):
            (root / identity / f"{number}.jpg").write_bytes(_jpeg(10 * len(identity) + number))
    Image.fromarray(_pixels(99)).save(root / "al" / "2.png", format="PNG")
    (root / "bob" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (root / "cy" / "8.jpg").write_bytes(_jpeg(5, size=64))
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_pack_round_trip(
    tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, workers: str
) -> None:
    out = tmp_path / "rec"
    code, stdout, err = _run(capsys, "pack", str(image_dir), str(out), "--workers", workers)
    assert code == 0, err
    assert "packed 8 images of 3 identities" in stdout and "skipped 2 unusable images" in stdout
    assert "bob/9.jpg: cannot decode" in caplog.text and "cy/8.jpg: image is 64x64" in caplog.text
    dataset = RecordFaceDataset(out, random_flip=False)
    assert dataset.num_classes == 3 and (out / "property").read_text() == "3,112,112\n"
    assert (out / "identities.txt").read_text() == "0\tal\n1\tbob\n2\tcy\n"
    # Same labels as ImageFolderDataset; JPEGs stored byte for byte, the PNG re-encoded at quality 95.
    _, paths, labels = list_image_folder(image_dir)
    usable = [(p, label) for p, label in zip(paths, labels.tolist(), strict=True) if p not in ("bob/9.jpg", "cy/8.jpg")]
    assert dataset.labels.tolist() == [label for _, label in usable]
    layout = read_insightface_layout(dataset.reader)
    assert layout.identity_ranges == [(1, 4), (4, 7), (7, 9)]
    for index, (path, _) in enumerate(usable):
        stored = dataset.encoded(index)[0]
        if path.endswith(".png"):
            assert simplejpeg.is_jpeg(stored)
            error = np.abs(decode_image(stored).astype(int) - _pixels(99).astype(int)).mean()
            assert error < 20  # noise is JPEG's worst case; a clearly wrong image would be ~85
        else:
            assert stored == (image_dir / path).read_bytes()


def test_pack_errors(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "pack", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert code == 2 and "image folder not found:" in _error_line(err) and "nowhere" in err
    for name in ("0.jpg", "1.jpg"):
        (image_dir / "cy" / name).write_bytes(b"junk")
    code, _, err = _run(capsys, "pack", str(image_dir), str(tmp_path / "out"), "--workers", "1")
    assert code == 2 and f"{image_dir / 'cy'}: no usable image (first: " in _error_line(err)
    assert not (tmp_path / "out" / "train.rec").exists()
    (tmp_path / "out" / "train.rec").write_bytes(b"")
    code, _, err = _run(capsys, "pack", str(image_dir), str(tmp_path / "out"))
    assert code == 2 and "train.rec already exists" in _error_line(err)


def _packed(tmp_path: Path, count: int = 12) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    samples = [(index // 3, _jpeg(index)) for index in range(count)]
    write_insightface_layout(root / "train.rec", root / "train.idx", samples, root / "property")
    return root


def test_shuffle_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _packed(tmp_path)
    code, stdout, err = _run(capsys, "shuffle", str(source), str(tmp_path / "a"), "--seed", "3")
    assert code == 0, err
    assert "plain im2rec layout" in stdout
    before = RecordFaceDataset(source)
    after = RecordFaceDataset(tmp_path / "a")
    reader = RecordReader(tmp_path / "a" / "train.rec", tmp_path / "a" / "train.idx")
    assert reader.keys.tolist() == list(range(12)) and after.num_classes == 4
    assert read_insightface_layout(reader).identity_ranges is None  # record 0 is an image (flag 0)
    moved = []
    for index in range(12):
        header, payload = reader.unpack_idx(index)
        assert header.flag == 0 and header.id == index
        original = int(header.id2)  # the source key
        assert (
            payload == before.reader.unpack_idx(original)[1] and int(after.labels[index]) == before.labels[original - 1]
        )
        moved.append(original)
    assert sorted(moved) == list(range(1, 13)) and moved != sorted(moved)
    # Deterministic by seed, different across seeds.
    assert _run(capsys, "shuffle", str(source), str(tmp_path / "b"), "--seed", "3")[0] == 0
    assert (tmp_path / "b" / "train.rec").read_bytes() == (tmp_path / "a" / "train.rec").read_bytes()
    assert _run(capsys, "shuffle", str(source), str(tmp_path / "c"), "--seed", "4")[0] == 0
    assert (tmp_path / "c" / "train.rec").read_bytes() != (tmp_path / "a" / "train.rec").read_bytes()
    code, _, err = _run(capsys, "shuffle", str(source), str(source))
    assert code == 2 and "must differ from the input folder" in _error_line(err)


def test_build_bin_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "img"
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for number in (1, 2):
            (images / name / f"{name}_{number:04d}.jpg").write_bytes(_jpeg(ord(name) + number))
    Image.fromarray(_pixels(3)).save(images / "a" / "extra.png", format="PNG")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# path1 path2 same\na/a_0001.jpg a/a_0002.jpg 1\n\na/extra.png b/b_0001.jpg 0\n")
    code, stdout, err = _run(capsys, "build-bin", str(pairs), str(images), str(tmp_path / "out.bin"))
    assert code == 0, err
    assert "2 pairs (1 same, 1 different)" in stdout
    bins, issame = pickle.loads((tmp_path / "out.bin").read_bytes())
    assert issame == [True, False] and all(isinstance(item, bytes) for item in bins)
    assert bins[0] == (images / "a" / "a_0001.jpg").read_bytes() and bins[2] == (images / "a/extra.png").read_bytes()
    loaded, same = load_bin(tmp_path / "out.bin")
    assert same == [True, False] and loaded.shape == (4, 3, 112, 112)
    assert np.array_equal(loaded[2].permute(1, 2, 0).numpy(), _pixels(3))
    # LFW's pairs.txt: a "folds pairs" header, then same (name i j) and different (name1 i name2 j) pairs.
    lfw = tmp_path / "lfw_pairs.txt"
    lfw.write_text("1\t2\na\t1\t2\na\t1\tb\t2\n")
    assert _run(capsys, "build-bin", str(lfw), str(images), str(tmp_path / "lfw.bin"))[0] == 0
    bins, issame = pickle.loads((tmp_path / "lfw.bin").read_bytes())
    assert issame == [True, False] and bins[3] == (images / "b" / "b_0002.jpg").read_bytes()


def test_build_bin_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "x.jpg").write_bytes(_jpeg(1))
    (tmp_path / "img" / "a" / "bad.jpg").write_bytes(b"nope")
    cases = {
        "a/x.jpg a/x.jpg yes\n": r"pairs.txt, line 1: malformed pair 'a/x.jpg a/x.jpg yes'; expected 'path1 path2 0|1'",
        "a/x.jpg a/x.jpg 1\na/x.jpg a/y.jpg 0\n": r"pairs.txt, line 2: .*a/y.jpg: No such file",
        "a/x.jpg a/bad.jpg 0\n": r"pairs.txt, line 1: .*a/bad.jpg: cannot decode",
        "# nothing\n": r"pairs.txt: no pairs",
    }
    for text, expected in cases.items():
        (tmp_path / "pairs.txt").write_text(text)
        code, _, err = _run(capsys, "build-bin", str(tmp_path / "pairs.txt"), str(tmp_path / "img"), "o.bin")
        assert code == 2
        assert re.search(expected, _error_line(err)), err


def test_inspect_prints_the_header_and_writes_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _packed(tmp_path)
    grid = tmp_path / "grid.png"
    code, stdout, err = _run(capsys, "inspect", str(source), "--grid", str(grid), "--n", "5")
    assert code == 0, err
    for text in ("insightface (record 0: flag 2, label [13. 17.])", "(17 records)", "4,112,112", "JPEG, "):
        assert text in stdout
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in stdout.splitlines() if "│" in line}
    assert rows["images"] == "12" and rows["identities (classes)"] == "4"
    assert "min 3, median 3, max 3" in stdout
    with Image.open(grid) as image:
        assert image.size == (3 * 112, 2 * 112)  # 5 samples: 3 columns, 2 rows
        first = np.asarray(image.convert("RGB"))[20:112, :112]
    reference = decode_image(RecordFaceDataset(source).encoded(0)[0])[20:112]
    assert np.array_equal(first, reference)  # the label is drawn in the top-left corner only


def test_scan_lists_corrupt_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _packed(tmp_path)
    code, stdout, _ = _run(capsys, "scan", str(source), "--workers", "1")
    assert code == 0 and "all 12 images decode" in stdout
    reader = RecordReader(source / "train.rec", source / "train.idx")
    data = bytearray((source / "train.rec").read_bytes())
    # Key 5: JPEG data overwritten (decode fails); key 9: its frame's magic broken (read fails).
    jpeg_start = reader.offset(5) + 8 + 24
    data[jpeg_start : jpeg_start + 200] = b"\0" * 200
    data[reader.offset(9)] ^= 0xFF
    (source / "train.rec").write_bytes(bytes(data))
    for workers in ("1", "2"):
        code, stdout, err = _run(capsys, "scan", str(source), "--workers", workers)
        assert code == 1, err
        assert "2 of 12 images unusable" in stdout
        rows = [line for line in stdout.splitlines() if line.startswith("│")]
        assert rows[0].split("│")[1].strip() == "5" and rows[0].split("│")[2].strip() == str(reader.offset(5))
        assert any(row.split("│")[1].strip() == "9" for row in rows)
        assert "unreadable" in stdout and "RecordIO" in stdout and "magic" in stdout  # the reason, wrapped in its cell


def test_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "scan", "shuffle"):
        argv = [command, str(tmp_path / "none")] + ([str(tmp_path / "out")] if command == "shuffle" else [])
        code, _, err = _run(capsys, *argv)
        assert code == 2 and _error_line(err) == f"error: RecordIO file not found: {tmp_path / 'none' / 'train.rec'}"
    source = _packed(tmp_path)
    (source / "train.rec").write_bytes((source / "train.rec").read_bytes()[:-4])
    code, _, err = _run(capsys, "scan", str(source))
    assert code == 2 and "is truncated" in _error_line(err)


@pytest.mark.fast_launch
def test_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data.tools", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: RecordIO file not found")
    assert "Traceback" not in proc.stderr
