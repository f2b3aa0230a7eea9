"""nvJPEG batch decoding (data.gpu_decode) against the CPU path on the same .rec; needs CUDA and torchvision."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import RecordFaceDataset, augmentation_seeds, collate_faces
from data.faces import FacesConfig, iter_train_samples
from data.recordio import decode_image, write_insightface_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision"),
]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 rendered faces; sample 4 is a PNG (nvJPEG refuses it: the batch falls back to one-by-one and the CPU),
    sample 7's JPEG header is destroyed (bad on both paths: key 8)."""
    cfg = FacesConfig(num_identities=6, images_per_identity=6, num_val_identities=2, num_val_pairs=10, seed=3)
    samples = list(iter_train_samples(cfg))
    png = io.BytesIO()
    Image.fromarray(decode_image(samples[4][1])).save(png, format="PNG")
    samples[4] = (samples[4][0], png.getvalue())
    samples[7] = (samples[7][0], samples[7][1][:2] + bytes(300) + samples[7][1][302:])
    root = tmp_path_factory.mktemp("faces")
    write_insightface_layout(root / "train.rec", root / "train.idx", samples, root / "property")
    return root


def test_gpu_decode_matches_the_cpu_path(faces: Path) -> None:
    from data.gpu_decode import JpegRecordDataset, collate_jpeg, decode_batch

    cpu = RecordFaceDataset(faces)
    gpu = JpegRecordDataset(faces)
    items = [(index, int(seed)) for index, seed in enumerate(augmentation_seeds(1, 0, np.arange(len(cpu))))]
    images, labels, bad_keys = decode_batch(collate_jpeg([gpu[item] for item in items]), "cuda")
    expected_images, expected_labels, expected_bad = collate_faces([cpu[item] for item in items])
    assert images.device.type == "cuda" and images.dtype == torch.float32 and images.shape == (36, 3, 112, 112)
    assert bad_keys.device.type == "cpu" and bad_keys.tolist() == expected_bad.tolist()
    good = (expected_bad < 0).nonzero().flatten()
    assert int((expected_bad >= 0).sum()) == 1 and int(expected_bad.max()) == 8
    assert torch.equal(labels.cpu()[good], expected_labels[good])
    # nvJPEG and libjpeg-turbo round IDCT and chroma upsampling differently: a few grey levels.
    difference = (images.cpu()[good] - expected_images[good]).abs() * 127.5
    assert float(difference.mean()) < 1.5 and float(difference.quantile(0.999)) <= 12
    # The flips agree (a wrong flip would differ by tens of levels on average).
    assert float(difference.flatten(1).mean(1).max()) < 3


def test_gpu_decode_in_bf16_and_from_a_loader(faces: Path) -> None:
    from torch.utils.data import DataLoader

    from data.dataset import DistributedEpochSampler
    from data.gpu_decode import JpegRecordDataset, collate_jpeg, decode_batch

    dataset = JpegRecordDataset(faces)
    sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=0, with_seeds=True)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate_jpeg, num_workers=2, drop_last=True)
    seen = 0
    for batch in loader:
        images, labels, bad_keys = decode_batch(batch, torch.device("cuda"), dtype=torch.bfloat16)
        assert images.dtype == torch.bfloat16 and images.shape == (8, 3, 112, 112) and len(bad_keys) == 8
        assert float(images.abs().max()) <= 1.0
        seen += len(labels)
    assert seen == 32
