"""RecordFaceDataset on the MXNet-written fixture and on bad folders; DistributedEpochSampler; worker seeding."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.dataset import (
    DistributedEpochSampler,
    RecordFaceDataset,
    augmentation_seeds,
    loader_generator,
    seed_worker,
)
from data.recordio import IRHeader, MissingRecordFileError, RecordIOError, RecordWriter, decode_image, pack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mxnet"
INSIGHTFACE = FIXTURES / "insightface"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text())["insightface"]


def _jpeg(size: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _plain_folder(root: Path, labels: list[Any], size: int = 112) -> Path:
    """An im2rec-style folder: record 0 is an image (flag 0), every key an image, no property file."""
    root.mkdir(parents=True, exist_ok=True)
    with RecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, label in enumerate(labels):
            writer.write_idx(key, pack(IRHeader(0, label, key, 0), _jpeg(size, 40 * key)))
    return root


# --- RecordFaceDataset ------------------------------------------------------------------------------------------


def test_fixture_samples() -> None:
    dataset = RecordFaceDataset(INSIGHTFACE, random_flip=False)
    assert len(dataset) == len(EXPECTED["images"]) and dataset.num_classes == EXPECTED["num_classes"]
    assert dataset.labels.tolist() == [image["label"] for image in EXPECTED["images"]]
    for index, image in enumerate(EXPECTED["images"]):
        pixels, label = dataset[index]
        assert pixels.shape == (3, 112, 112) and pixels.dtype == torch.float32 and pixels.is_contiguous()
        assert label.dtype == torch.int64 and label.shape == () and int(label) == image["label"]
        assert -1.0 <= pixels.numpy().min() and pixels.numpy().max() <= 1.0
        jpeg = dataset.reader.unpack_idx(image["key"])[1]
        rgb = decode_image(jpeg).astype(np.float32)
        reference = ((rgb / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        np.testing.assert_allclose(pixels.numpy(), reference, rtol=0, atol=1e-6)
        # Channel order: the fixture's colours as OpenCV decoded them, mapped back through the normalisation.
        expected_mean = (np.asarray(image["mean_rgb"]) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(pixels.numpy().mean(axis=(1, 2)), expected_mean, atol=0.01)


def test_random_flip_uses_the_seeded_rng() -> None:
    plain = RecordFaceDataset(INSIGHTFACE, random_flip=False)[0][0].numpy()
    flipped = plain[:, :, ::-1]
    assert not np.array_equal(plain, flipped)  # the fixture images are not mirror-symmetric

    def draws(seed: int) -> list[bool]:
        # The flip stream follows torch.initial_seed(), which DataLoader sets per worker.
        torch.manual_seed(seed)
        dataset = RecordFaceDataset(INSIGHTFACE, random_flip=True)
        outcomes = []
        for _ in range(40):
            image = dataset[0][0].numpy()
            assert np.array_equal(image, plain) or np.array_equal(image, flipped)
            outcomes.append(np.array_equal(image, flipped))
        return outcomes

    first = draws(1)
    assert 5 < sum(first) < 35
    assert draws(1) == first and draws(2) != first


def test_flip_keyed_by_augmentation_seed_is_reproducible() -> None:
    plain = RecordFaceDataset(INSIGHTFACE, random_flip=False)[0][0].numpy()
    dataset = RecordFaceDataset(INSIGHTFACE, random_flip=True)
    seeds = augmentation_seeds(7, 0, np.arange(64))
    assert len(set(seeds.tolist())) == 64 and (seeds >= 0).all()
    torch.manual_seed(123)  # the global/worker stream must not matter
    flips = [not np.array_equal(dataset[(0, int(s))][0].numpy(), plain) for s in seeds]
    torch.manual_seed(456)
    assert [not np.array_equal(dataset[(0, int(s))][0].numpy(), plain) for s in seeds] == flips
    assert 10 < sum(flips) < 54
    # Another epoch or seed gives other draws.
    assert not np.array_equal(augmentation_seeds(7, 1, np.arange(64)), seeds)
    assert not np.array_equal(augmentation_seeds(8, 0, np.arange(64)), seeds)


def test_sampler_with_seeds_yields_index_and_seed() -> None:
    sampler = DistributedEpochSampler(10, rank=1, world_size=2, seed=3, with_seeds=True)
    sampler.set_epoch(2)
    items = list(sampler)
    indices = [i for i, _ in items]
    assert indices == sampler.rank_indices(2).tolist()
    assert [s for _, s in items] == augmentation_seeds(3, 2, np.asarray(indices)).tolist()
    # Resuming mid-epoch gives the same (index, seed) pairs for the rest.
    resumed = DistributedEpochSampler(10, rank=1, world_size=2, seed=3, with_seeds=True)
    resumed.load_state_dict({"epoch": 2, "position": 3})
    assert list(resumed) == items[3:]


def test_num_classes_checks(tmp_path: Path) -> None:
    assert RecordFaceDataset(INSIGHTFACE, num_classes=10).num_classes == 10
    with pytest.raises(RecordIOError, match=r"record 0 of .*train\.rec lists 3 identities, more than num_classes=2"):
        RecordFaceDataset(INSIGHTFACE, num_classes=2)
    root = _plain_folder(tmp_path / "plain", [0, 1, 5, 2])
    assert RecordFaceDataset(root).num_classes == 6  # no layout, no property: the largest label + 1
    (root / "property").write_text("4,112,112\n")
    with pytest.raises(RecordIOError, match=r"property lists 4 identities, more than num_classes=3"):
        RecordFaceDataset(root, num_classes=3)


@pytest.mark.parametrize(("label", "shown"), [(5.0, "5"), (-1.0, "-1"), (1.5, "1.5"), ([7.0, 0.0], "7")])
def test_label_outside_classes_names_file_and_key(tmp_path: Path, label: Any, shown: str) -> None:
    root = _plain_folder(tmp_path / "bad", [0, 1, label, 2])
    dataset = RecordFaceDataset(root, num_classes=3)
    assert int(dataset[3][1]) == 2
    with pytest.raises(RecordIOError, match=rf"train\.rec: key 2 \(byte offset \d+\) has label {shown}, not a class"):
        dataset[2]


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(MissingRecordFileError, match=r"not found: .*empty/train\.rec"):
        RecordFaceDataset(tmp_path / "empty")
    root = _plain_folder(tmp_path / "no_idx", [0])
    (root / "train.idx").unlink()
    with pytest.raises(MissingRecordFileError, match=r"not found: .*no_idx/train\.idx"):
        RecordFaceDataset(root)
    root = _plain_folder(tmp_path / "small", [0, 1], size=64)
    with pytest.raises(RecordIOError, match=r"train\.rec: key 1: image is 64x64, expected aligned 112x112"):
        RecordFaceDataset(root)[1]


def test_dataloader_workers_are_reproducible() -> None:
    dataset = RecordFaceDataset(INSIGHTFACE, random_flip=True)

    def run(seed: int, rank: int) -> list[torch.Tensor]:
        sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=seed)
        loader = DataLoader(
            dataset,
            batch_size=2,
            sampler=sampler,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=loader_generator(seed, rank),
            multiprocessing_context="fork",
        )
        return [images for images, _ in loader]

    first = run(0, 0)
    assert len(first) == 4 and first[0].shape == (2, 3, 112, 112)
    assert all(torch.equal(a, b) for a, b in zip(first, run(0, 0), strict=True))
    # Another rank: same sampler order (same seed) but its own flips.
    assert not all(torch.equal(a, b) for a, b in zip(first, run(0, 1), strict=True))


def test_seed_worker_seeds_numpy_and_random_from_torch() -> None:
    def draw(seed: int) -> tuple[float, float]:
        torch.manual_seed(seed)
        seed_worker(0)
        return float(np.random.rand()), random.random()

    assert draw(3) == draw(3) and draw(3) != draw(4)
    assert loader_generator(0, 1).initial_seed() != loader_generator(1, 0).initial_seed()


# --- DistributedEpochSampler ------------------------------------------------------------------------------------


def _shards(total: int, world: int, epoch: int = 0, **kwargs: Any) -> list[list[int]]:
    shards = []
    for rank in range(world):
        sampler = DistributedEpochSampler(total, rank=rank, world_size=world, seed=7, **kwargs)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    return shards


def test_ranks_are_disjoint_and_follow_the_shared_order() -> None:
    shards = _shards(103, 4, epoch=2)
    assert {len(shard) for shard in shards} == {25}
    flat = [index for shard in shards for index in shard]
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    # Independent re-computation of the contract: randperm(seed + epoch), cut, rank r takes r, r + W, ...
    order = torch.randperm(103, generator=torch.Generator().manual_seed(7 + 2)).tolist()[:100]
    assert shards == [order[rank::4] for rank in range(4)]


def test_without_drop_last_every_sample_is_covered() -> None:
    shards = _shards(103, 4, drop_last=False)
    assert {len(shard) for shard in shards} == {26}
    assert set().union(*shards) == set(range(103))
    tiny = _shards(2, 3, drop_last=False)
    assert [len(shard) for shard in tiny] == [1, 1, 1] and tiny[2] == tiny[0]
    assert _shards(10, 3, shuffle=False) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_reshuffles_per_epoch_and_is_deterministic() -> None:
    assert _shards(50, 2, epoch=0) == _shards(50, 2, epoch=0)
    assert _shards(50, 2, epoch=0) != _shards(50, 2, epoch=1)
    other_seed = DistributedEpochSampler(50, rank=0, world_size=2, seed=8)
    assert list(other_seed) != _shards(50, 2)[0]


def test_resume_mid_epoch_yields_exactly_the_remaining_indices() -> None:
    sampler = DistributedEpochSampler(40, rank=1, world_size=2, seed=3)
    sampler.set_epoch(5)
    full = sampler.rank_indices(5).tolist()
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(9)]
    assert taken == full[:9] and sampler.state_dict() == {"epoch": 5, "position": 9}
    # A DataLoader prefetches: the trainer reports what it really consumed.
    sampler.set_position(6)
    state = sampler.state_dict()
    assert state == {"epoch": 5, "position": 6}

    resumed = DistributedEpochSampler(40, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # the trainer's loop calls this again: same epoch keeps the position
    assert list(resumed) == full[6:]
    assert resumed.state_dict() == {"epoch": 5, "position": 20}
    # A finished epoch resumes as finished; the next epoch starts from its beginning.
    finished = DistributedEpochSampler(40, rank=1, world_size=2, seed=3)
    finished.load_state_dict(resumed.state_dict())
    assert list(finished) == []
    finished.set_epoch(6)
    assert list(finished) == finished.rank_indices(6).tolist() and len(finished) == 20


def test_abandoned_iterator_does_not_move_the_position() -> None:
    sampler = DistributedEpochSampler(20, rank=0, world_size=1, seed=0)
    stale = iter(sampler)
    next(stale)
    fresh = iter(sampler)  # starts where the position stands
    assert next(fresh) == sampler.rank_indices(0)[1] and sampler.position == 2
    next(stale)
    next(stale)
    assert sampler.position == 2


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="rank < world_size"):
        DistributedEpochSampler(10, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="num_samples_total"):
        DistributedEpochSampler(-1, rank=0, world_size=1, seed=0)
    sampler = DistributedEpochSampler(10, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"position must be in \[0, 5\]"):
        sampler.set_position(6)
    with pytest.raises(ValueError, match=r"position must be in \[0, 5\]"):
        sampler.load_state_dict({"epoch": 1, "position": -1})
