"""data.loader.FaceLoader with pin_memory on a CUDA machine: slots page-locked once, asynchronous copies, and the
batches that reach the device equal the CPU loader's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.dataset import DistributedEpochSampler, RecordFaceDataset, normalize_images
from data.faces import FacesConfig, generate
from data.loader import FaceLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_slots_reach_the_device_unchanged(tmp_path: Path, workers: int) -> None:
    cfg = FacesConfig(num_identities=8, images_per_identity=8, num_val_identities=2, num_val_pairs=10)
    dataset = RecordFaceDataset(generate(tmp_path / "faces", cfg), output="uint8")

    def batches(pin: bool) -> list[torch.Tensor]:
        sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=1, with_seeds=True)
        # As the trainer on a GPU: pinned slots, the flip left to the device.
        loader = FaceLoader(dataset, 8, sampler, num_workers=workers, pin_memory=pin, flip_on_device=pin)
        try:
            out = []
            for images, _, _, *flips in loader:
                assert images.is_pinned() == pin
                # The trainer's to_device; the next request may hand the slot back only after this copy ran.
                flip = flips[0].cuda() if flips else None
                out.append(normalize_images(images.to("cuda", non_blocking=True), flips=flip))
            torch.cuda.synchronize()
            return out
        finally:
            loader.close()

    pinned, plain = batches(True), batches(False)
    assert len(pinned) == len(plain) == 8
    for a, b in zip(pinned, plain, strict=True):
        assert torch.equal(a, b)
