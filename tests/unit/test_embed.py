"""evaluation.embed's Python side: embeddings against an independent forward, flip, alignment from landmarks,
the input listings, the landmarks formats and the atomic output."""

from __future__ import annotations

import json
import pickle
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
from evaluation.embed import (
    EmbedError,
    FaceEmbedder,
    check_output,
    list_images,
    match_landmarks,
    read_landmarks,
    write_embeddings,
)
from models import build_backbone
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
