"""ImageFolderDataset: labels from sorted folder names, the shared sample and item contracts, bad images, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from data.dataset import DistributedEpochSampler, augmentation_seeds, collate_faces
from data.image_folder import ImageFolderDataset, ImageFolderError, list_image_folder


def _pixels(seed: int, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _folder(root: Path, layout: dict[str, list[str]]) -> Path:
    """``layout``: identity folder -> file names; .jpg/.jpeg get JPEG noise, .png PNG noise, others junk."""
    for seed, (identity, names) in enumerate(layout.items()):
        (root / identity).mkdir(parents=True, exist_ok=True)
        for number, name in enumerate(names):
            path = root / identity / name
            pixels = _pixels(100 * seed + number)
            if name.lower().endswith((".jpg", ".jpeg")):
                path.write_bytes(simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB"))
            elif name.lower().endswith(".png"):
                Image.fromarray(pixels).save(path, format="PNG")
            else:
                path.write_bytes(b"not an image")
    return root


def _reference(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_labels_follow_sorted_folder_names(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "faces",
        {"zoe": ["b.jpg", "a.JPEG"], "adam": ["1.png"], "mia": ["x.jpg", "notes.txt", ".hidden.jpg"]},
    )
    (root / ".cache").mkdir()  # hidden folders are not identities
    identities, paths, labels = list_image_folder(root)
    assert identities == ["adam", "mia", "zoe"]
    assert paths == ["adam/1.png", "mia/x.jpg", "zoe/a.JPEG", "zoe/b.jpg"]
    assert labels.tolist() == [0, 1, 2, 2]
    dataset = ImageFolderDataset(root, random_flip=False)
    assert len(dataset) == 4 and dataset.num_classes == 3 and dataset.labels.tolist() == [0, 1, 2, 2]
    for index, path in enumerate(paths):
        image, label, bad_key = dataset[index]
        expected = (_reference(root / path).astype(np.float32) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(image.numpy(), expected.transpose(2, 0, 1), atol=1e-6)
        assert int(label) == labels[index] and int(bad_key) == -1
    assert ImageFolderDataset(root, num_classes=5).num_classes == 5
    with pytest.raises(ImageFolderError, match=r"faces has 3 identity folders, more than num_classes=2"):
        ImageFolderDataset(root, num_classes=2)


def test_item_contract_and_batched_path_match_the_record_dataset(tmp_path: Path) -> None:
    root = _folder(tmp_path / "faces", {"a": ["1.jpg", "2.jpg"], "b": ["1.png", "2.jpg"]})
    dataset = ImageFolderDataset(root, output="uint8")
    plain = ImageFolderDataset(root, random_flip=False, output="uint8")
    seeds = augmentation_seeds(1, 0, np.arange(4))
    items = [(index, int(seed)) for index, seed in enumerate(seeds)]
    for index, seed in items:
        flipped = (seed >> 62) & 1
        expected = plain[index][0].flip(2) if flipped else plain[index][0]
        assert torch.equal(dataset[(index, seed)][0], expected)
    images, labels, bad_keys = collate_faces(dataset.__getitems__(items))
    assert torch.equal(images, torch.stack([dataset[item][0] for item in items]))
    assert labels.tolist() == [0, 0, 1, 1] and bad_keys.tolist() == [-1] * 4
    sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=1, with_seeds=True)
    assert len(list(sampler)) == 4


def test_bad_images_are_skipped_like_corrupt_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "faces", {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg", "2.jpg"]})
    (root / "a" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    Image.fromarray(_pixels(9, size=80)).save(root / "b" / "2.jpg", format="JPEG")
    dataset = ImageFolderDataset(root, random_flip=False)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        image, label, bad_key = dataset[1]
    assert int(bad_key) == 1 and int(label) == 1 and torch.equal(image, dataset[2][0])
    assert f"{root / 'a' / '2.jpg'}: cannot decode" in caplog.text
    image, label, bad_key = dataset[3]  # 80x80: bad as well; the next sample wraps to index 0
    assert int(bad_key) == 3 and int(label) == 0 and torch.equal(image, dataset[0][0])
    assert "image is 80x80, expected aligned 112x112 faces" in caplog.text
    (root / "b" / "1.jpg").unlink()  # vanished since the listing: unreadable, skipped too
    assert int(dataset[2][2]) == 2


def test_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match=r"image folder not found: .*missing"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.jpg").write_bytes(b"")
    with pytest.raises(ImageFolderError, match=r"flat has no identity sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    root = _folder(tmp_path / "faces", {"a": ["1.jpg"], "b": ["readme.txt"]})
    with pytest.raises(ImageFolderError, match=r"faces/b has no \.jpg/\.jpeg/\.png image"):
        ImageFolderDataset(root)
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    Image.fromarray(_pixels(1, size=250)).save(raw / "a" / "1.jpg", format="JPEG")
    with pytest.raises(ImageFolderError, match=r"raw/a/1\.jpg: image is 250x250, .*must hold aligned 112x112 face"):
        ImageFolderDataset(raw)
