"""`python -m data.tools extract`: a `.rec` as `<label>/<key>.jpg` + labels.csv (the stored bytes, the labels the
dataset reads), a `.bin` as images + pairs.txt that `build-bin` turns back into the same `.bin`; refusals."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest

from data.dataset import RecordFaceDataset
from data.faces import FacesConfig, encode_jpeg, generate, identity_params, render_face
from data.recordio import RecordReader
from data.tools import main


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 12 identities: folder names "10" and "2" would sort the wrong way round without the padding.
    cfg = FacesConfig(num_identities=12, images_per_identity=2, num_val_identities=3, num_val_pairs=10, seed=3)
    return generate(tmp_path_factory.mktemp("faces"), cfg)


def test_rec_to_image_folder(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces"
    assert main(["extract", str(generated), str(out)]) == 0
    dataset = RecordFaceDataset(generated, random_flip=False)
    reader = RecordReader(generated / "train.rec", generated / "train.idx")
    with (out / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(dataset) == 24
    for index, row in enumerate(rows):
        key = dataset.sample_key(index)
        _, label = dataset.encoded(index)
        assert row == {"path": f"{label:02d}/{key}.jpg", "label": str(label)}
        assert (out / row["path"]).read_bytes() == reader.read_record(key)[1]  # the stored JPEG, byte for byte
    # The layout of `pack` and of an image_folder source: packing it again gives the same labels.
    assert main(["pack", str(out), str(tmp_path / "packed"), "--workers", "1"]) == 0
    repacked = RecordFaceDataset(tmp_path / "packed", random_flip=False)
    assert repacked.labels.tolist() == [int(r["label"]) for r in rows]


def test_bin_to_pairs_and_back(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    assert main(["extract", str(generated / "val.bin"), str(out)]) == 0
    images, issame = pickle.loads((generated / "val.bin").read_bytes())
    lines = (out / "pairs.txt").read_text().splitlines()
    assert lines[0] == f"00000.jpg 00001.jpg {int(issame[0])}" and len(lines) == len(issame) == 10
    assert [(out / f"{i:05d}.jpg").read_bytes() for i in range(len(images))] == list(images)
    rebuilt = tmp_path / "rebuilt.bin"
    assert main(["build-bin", str(out / "pairs.txt"), str(out), str(rebuilt)]) == 0
    assert pickle.loads(rebuilt.read_bytes()) == (list(images), list(issame))


def test_refusals(generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main(["extract", str(generated), str(busy)]) == 2
    assert main(["extract", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps((np.zeros(2, dtype=object), [True])))
    assert main(["extract", str(evil), str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "not an empty folder" in lines[0] and "neither a verification .bin" in lines[1]
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["busy", "evil.bin"]


def test_a_non_jpeg_record_is_reencoded(tmp_path: Path) -> None:
    from PIL import Image

    from data.recordio import write_insightface_layout

    face = render_face(identity_params(0, 0), np.random.default_rng(0))
    png = tmp_path / "f.png"
    Image.fromarray(face).save(png)
    src = tmp_path / "rec"
    src.mkdir()
    samples = [(0, png.read_bytes()), (0, encode_jpeg(face, 90))]
    write_insightface_layout(src / "train.rec", src / "train.idx", iter(samples), src / "property", (112, 112))
    assert main(["extract", str(src / "train.rec"), str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out" / "0").iterdir())
    assert len(files) == 2 and all(f.read_bytes()[:2] == b"\xff\xd8" for f in files)
