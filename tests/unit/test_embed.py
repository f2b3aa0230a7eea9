"""evaluation.embed's Python side: embeddings against an independent forward, flip (and the calibration's), alignment
from landmarks, the input listings, the landmarks formats, the output written whole (a pair together or not at all),
non-finite models refused (import cycles: tests/unit/test_layering.py)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from data.recordio import write_insightface_layout
from evaluation.alignment import ARCFACE_TEMPLATE, warp_affine
from evaluation.calibrate import calibrate, write_calibration
from evaluation.embed import (
    EmbedError,
    FaceEmbedder,
    check_output,
    list_images,
    match_landmarks,
    read_landmarks,
    write_embeddings,
    write_together,
)
from models import build_backbone
from models.cli import OutputError
from trainer.checkpoint import model_metadata, save_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=16).eval()
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, backbone, model_metadata("r_lite", 16))
    return path, backbone


def _faces(count: int, seed: int = 0) -> np.ndarray:
    # Smooth random images (a face-free stand-in): bilinear resampling changes them little.
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 14, 14, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((112, 112), Image.Resampling.BICUBIC)) for s in small])


def _reference(backbone: torch.nn.Module, crops: np.ndarray, flip: bool) -> np.ndarray:
    """The embedding computed independently: insightface's (x/255 - 0.5)/0.5, torch.flip, sum, L2-normalize."""
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        out = backbone(x)
        if flip:
            out = out + backbone(torch.flip(x, dims=[3]))
    return torch.nn.functional.normalize(out, dim=1).numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_embeddings_match_an_independent_forward(model: tuple[Path, torch.nn.Module], flip: bool) -> None:
    path, backbone = model
    crops = _faces(5)
    embedder = FaceEmbedder.from_file(path)
    got = embedder.embed(list(crops), flip=flip, batch_size=2)  # batches of 2, 2, 1
    np.testing.assert_allclose(got, _reference(backbone, crops, flip), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert embedder.calibration is None


def test_landmarks_align_a_moved_face_back(model: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """A crop placed into a 200x160 photo by a known rotation + scale + shift, with the template's points moved
    the same way: aligning with those points restores the crop (up to two bilinear resamplings)."""
    path, backbone = model
    crop = _faces(1, seed=3)[0]
    angle, scale, shift = 0.3, 1.2, np.array([30.0, 20.0])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    photo = warp_affine(crop, np.hstack([linear, shift[:, None]]), (200, 160))
    points = ARCFACE_TEMPLATE @ linear.T + shift
    file = tmp_path / "photo.png"
    Image.fromarray(photo).save(file)
    embedder = FaceEmbedder.from_file(path)
    aligned = embedder.embed([file], landmarks=[points])
    direct = _reference(backbone, crop[None], flip=False)
    assert float(aligned[0] @ direct[0]) > 0.99
    with pytest.raises(EmbedError, match="not an aligned 112x112 crop"):
        embedder.embed([file])


def _jpeg(image: np.ndarray) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=95, colorspace="RGB")


def test_inputs_folder_list_rec_bin(tmp_path: Path) -> None:
    faces = _faces(3)
    folder = tmp_path / "faces"
    (folder / "b").mkdir(parents=True)
    Image.fromarray(faces[0]).save(folder / "z.png")
    (folder / "b" / "a.jpg").write_bytes(_jpeg(faces[1]))
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    images = list_images(folder)
    assert [i.name for i in images] == ["b/a.jpg", "z.png"]
    np.testing.assert_array_equal(images[1].load(), faces[0])

    listing = tmp_path / "list.txt"
    listing.write_text("# faces\nfaces/z.png\n\nfaces/missing.png\n")
    listed = list_images(listing)
    assert [i.name for i in listed] == ["faces/z.png", "faces/missing.png"]
    with pytest.raises(EmbedError, match="missing.png: no such file"):
        listed[1].load()

    write_insightface_layout(tmp_path / "t.rec", tmp_path / "t.idx", [(0, _jpeg(faces[0])), (1, _jpeg(faces[2]))])
    recorded = list_images(tmp_path / "t.rec")
    assert [i.name for i in recorded] == ["t.rec#1", "t.rec#2"]
    assert np.abs(recorded[1].load().astype(int) - faces[2]).mean() < 3  # JPEG at quality 95

    with open(tmp_path / "v.bin", "wb") as handle:
        pickle.dump(([_jpeg(f) for f in faces[:2]], [True]), handle, protocol=4)
    assert [i.name for i in list_images(tmp_path / "v.bin")] == ["v.bin#0", "v.bin#1"]

    (tmp_path / "weights.safetensors").write_bytes(b"\x00\x01binary")
    with pytest.raises(EmbedError, match="neither a folder, an image"):
        list_images(tmp_path / "weights.safetensors")
    with pytest.raises(EmbedError, match="no such file or folder"):
        list_images(tmp_path / "nowhere")


def test_landmark_files(tmp_path: Path) -> None:
    csv_path = tmp_path / "lm.csv"
    csv_path.write_text("name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na.jpg,1,2,3,4,5,6,7,8,9,10\n")
    assert read_landmarks(csv_path)["a.jpg"].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    json_path = tmp_path / "lm.json"
    json_path.write_text(json.dumps({"a.jpg": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], "b.jpg": list(range(10))}))
    table = read_landmarks(json_path)
    assert table["b.jpg"][4].tolist() == [8, 9]
    csv_path.write_text("a.jpg,1,2,3\n")
    with pytest.raises(EmbedError, match=r"lm.csv:1: expected a name and 10 numbers"):
        read_landmarks(csv_path)
    images = list_images(_folder_with(tmp_path, ["a.jpg", "c.jpg"]))
    with pytest.raises(EmbedError, match=r"no landmarks for 1 of the 2 images \(first: 'c.jpg'"):
        match_landmarks(images, table, json_path)


def _folder_with(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(_jpeg(_faces(1)[0]))
    return folder


def test_outputs_are_written_whole(tmp_path: Path) -> None:
    embeddings = np.arange(6, dtype=np.float32).reshape(3, 2)
    names = ["a", "b/c.jpg", "d"]
    out = tmp_path / "e.safetensors"
    write_embeddings(out, names, embeddings, {"flip": "true"})
    np.testing.assert_array_equal(load_file(str(out))["embeddings"], embeddings)
    with safe_open(str(out), framework="np") as handle:
        assert json.loads(handle.metadata()["names"]) == names
    written = write_embeddings(tmp_path / "e.npy", names, embeddings, {})
    assert written == [tmp_path / "e.npy", tmp_path / "e.names.txt"]
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), embeddings)
    assert (tmp_path / "e.names.txt").read_text().splitlines() == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.names.txt", "e.npy", "e.safetensors"]
    with pytest.raises(EmbedError, match=r"must end in \.safetensors or \.npy"):
        check_output(tmp_path / "e.csv")


def test_embed_follows_the_calibration_flip(
    model: tuple[Path, torch.nn.Module], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the CLIs do: without `flip=`, the flip the model was calibrated with; a different explicit one warns."""
    path, backbone = model
    calibrated = tmp_path / "model.safetensors"
    shutil.copyfile(path, calibrated)
    scores, labels = np.r_[np.linspace(-0.2, 0.4, 20), np.linspace(0.3, 0.9, 20)], np.r_[np.zeros(20), np.ones(20)]
    write_calibration(calibrated, calibrate(scores, labels, far_target=0.1, bootstrap=10, flip=True))
    crops = _faces(3)
    embedder = FaceEmbedder.from_file(calibrated)
    with caplog.at_level(logging.WARNING, logger="evaluation.calibration"):
        np.testing.assert_allclose(embedder.embed(list(crops)), _reference(backbone, crops, flip=True), atol=1e-5)
        assert not caplog.records
        plain = embedder.embed(list(crops), flip=False)
    np.testing.assert_allclose(plain, _reference(backbone, crops, flip=False), atol=1e-5)
    assert [r.getMessage() for r in caplog.records] == [
        "the model was calibrated with flip; these embeddings are not flipped: its threshold may not hold"
    ]
    # An uncalibrated model: no flip unless asked.
    np.testing.assert_allclose(
        FaceEmbedder.from_file(path).embed(list(crops)), _reference(backbone, crops, False), atol=1e-5
    )


def test_non_finite_embeddings_are_refused(model: tuple[Path, torch.nn.Module]) -> None:
    path, backbone = model
    embedder = FaceEmbedder(lambda batch: backbone(batch) * float("inf"), path, {}, torch.device("cpu"))
    with pytest.raises(EmbedError, match=r"model.safetensors: the model's embeddings are not finite"):
        embedder.embed(list(_faces(2)))


def _old_pair(folder: Path) -> tuple[Path, Path]:
    array, names = folder / "e.npy", folder / "e.names.txt"
    np.save(array, np.zeros((2, 3), np.float32))
    names.write_text("old1\nold2\n")
    array.chmod(0o640)
    return array, names


def _assert_old_pair(folder: Path) -> None:
    np.testing.assert_array_equal(np.load(folder / "e.npy"), np.zeros((2, 3), np.float32))
    assert (folder / "e.names.txt").read_text() == "old1\nold2\n"
    assert sorted(p.name for p in folder.iterdir()) == ["e.names.txt", "e.npy"]  # no temporary files left


def test_a_pair_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names, embeddings = ["a", "b", "c"], np.arange(6, dtype=np.float32).reshape(3, 2)
    out, listing = _old_pair(tmp_path)

    # The array cannot be written (after the names file was): the old pair stays.
    def fail(tmp: Path) -> None:
        raise OSError(27, "File too large")

    with pytest.raises(OutputError, match=r"e.npy: cannot be written \(File too large\)"):
        write_together([(listing, lambda tmp: tmp.write_text("new\n")), (out, fail)])
    _assert_old_pair(tmp_path)

    # Renaming the array into place fails (after the names file was renamed): the old pair is put back.
    real_replace = os.replace

    def replace(source: object, target: object) -> None:
        if Path(str(target)) == out and ".new-" in str(source):
            raise OSError(5, "Input/output error")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=r"e.npy: cannot be written \(Input/output error\)"):
        write_embeddings(out, names, embeddings, {})
    _assert_old_pair(tmp_path)
    monkeypatch.undo()

    # Written whole: both new, the array keeping the mode of the one it replaced.
    write_embeddings(out, names, embeddings, {})
    np.testing.assert_array_equal(np.load(out), embeddings)
    assert listing.read_text().splitlines() == names and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.names.txt", "e.npy"]
