"""The generated default dataset: determinism, the written insightface files, held-out validation, the cache."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data import faces
from data.faces import FacesConfig, ensure_dataset, generate, identity_params, render_face
from data.recordio import RecordReader, decode_image, read_insightface_layout, unpack
from evaluation.verification import load_bin

TINY = FacesConfig(num_identities=4, images_per_identity=3, num_val_identities=3, num_val_pairs=20, seed=1)
FILES = ("train.rec", "train.idx", "property", "val.bin", "faces.json")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("faces") / "tiny", TINY)


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def test_render_face_shape_dtype_and_determinism() -> None:
    params = identity_params(0, 5)
    image = render_face(params, np.random.default_rng(1))
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_face(params, np.random.default_rng(1)))
    assert not np.array_equal(image, render_face(params, np.random.default_rng(2)))
    assert image.std() > 10  # not a flat image
    assert render_face(params, np.random.default_rng(1), variation=0.0).shape == (112, 112, 3)


def test_identities_differ_and_repeat() -> None:
    assert identity_params(0, 1) == identity_params(0, 1)
    assert identity_params(0, 1) != identity_params(0, 2)
    assert identity_params(0, 1) != identity_params(1, 1)


def test_generate_is_deterministic_by_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", TINY)
    assert _file_bytes(again) == _file_bytes(tiny_dir)
    other = generate(tmp_path / "other", dataclasses.replace(TINY, seed=2))
    other_bytes = _file_bytes(other)
    for name in ("train.rec", "val.bin"):
        assert other_bytes[name] != _file_bytes(tiny_dir)[name]


def test_rec_reads_back_with_native_reader(tiny_dir: Path) -> None:
    assert (tiny_dir / "property").read_text().strip() == "4,112,112"
    with RecordReader(tiny_dir / "train.rec", tiny_dir / "train.idx") as reader:
        layout = read_insightface_layout(reader)
        assert layout.num_classes == 4
        assert layout.image_keys.tolist() == list(range(1, 13))
        assert layout.identity_ranges == [(1, 4), (4, 7), (7, 10), (10, 13)]
        labels = []
        for key in layout.image_keys.tolist():
            header, payload = unpack(reader.read_idx(key))
            labels.append(int(header.label))
            image = decode_image(payload)
            assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_val_bin_holds_held_out_identities(tiny_dir: Path) -> None:
    images, issame = load_bin(tiny_dir / "val.bin")
    assert images.shape == (40, 3, 112, 112)
    assert len(issame) == 20 and sum(issame) == 10
    meta = json.loads((tiny_dir / "faces.json").read_text())
    train, val = set(meta["train_identities"]), set(meta["val_identities"])
    assert train == {0, 1, 2, 3} and len(val) == 3 and not train & val
    assert [same for _, _, same in meta["val_pairs"]] == issame
    for a, b, same in meta["val_pairs"]:
        assert {a, b} <= val and (a == b) == same
    # The bookkeeping's identity numbers are what the renderer used: no val identity's structure is a train one's.
    train_params = [identity_params(TINY.seed, i) for i in train]
    assert all(identity_params(TINY.seed, i) not in train_params for i in val)
    # Both kinds of pair appear in the first half of the file, not only at its end (folds are contiguous).
    assert 0 < sum(issame[:10]) < 10


def test_ensure_dataset_caches_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ensure_dataset(TINY, cache_dir=tmp_path)
    assert folder.parent == tmp_path and folder.name == f"faces-{faces.cache_key(TINY)}"
    assert all((folder / name).is_file() for name in FILES)
    mtime = (folder / "train.rec").stat().st_mtime_ns

    def fail(*args: object) -> Path:
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(faces, "generate", fail)
    assert ensure_dataset(TINY, cache_dir=tmp_path) == folder
    assert (folder / "train.rec").stat().st_mtime_ns == mtime
    assert os.listdir(tmp_path) == [folder.name]  # no temporary folders left behind


def test_ensure_dataset_uses_env_cache_and_config_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCFACE_CACHE", str(tmp_path))
    small = dataclasses.replace(TINY, num_identities=2, images_per_identity=1)
    folder = ensure_dataset(small)
    assert folder.parent == tmp_path
    assert faces.cache_key(small) != faces.cache_key(TINY)
    monkeypatch.setattr(faces, "GENERATOR_VERSION", faces.GENERATOR_VERSION + 1)
    assert faces.cache_key(small) != folder.name.removeprefix("faces-")


def test_ensure_dataset_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishes the same folder while we generate: we keep its copy and clean up ours."""
    real_generate = faces.generate
    final = tmp_path / f"faces-{faces.cache_key(TINY)}"

    def racing_generate(out_dir: Path, cfg: FacesConfig) -> Path:
        real_generate(final, cfg)  # the other process wins
        (final / "winner").write_text("1")
        return real_generate(out_dir, cfg)

    monkeypatch.setattr(faces, "generate", racing_generate)
    assert ensure_dataset(TINY, cache_dir=tmp_path) == final
    assert (final / "winner").exists()
    assert os.listdir(tmp_path) == [final.name]


def test_ensure_dataset_refuses_incomplete_folder(tmp_path: Path) -> None:
    final = tmp_path / f"faces-{faces.cache_key(TINY)}"
    final.mkdir()
    (final / "train.rec").write_bytes(b"")
    with pytest.raises(RuntimeError, match="exists but is incomplete"):
        ensure_dataset(TINY, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "changes",
    [{"num_identities": 0}, {"num_val_identities": 1}, {"num_val_pairs": 7}, {"jpeg_quality_min": 99}],
)
def test_config_validation(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        dataclasses.replace(TINY, **changes)
