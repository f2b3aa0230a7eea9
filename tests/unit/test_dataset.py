"""RecordFaceDataset on the MXNet-written fixture and on bad folders; the batched path; bad data and its tracker;
DistributedEpochSampler and exact resume through a DataLoader; worker seeding; the GPU batch logic on the CPU."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from data import gpu_decode
from data.dataset import (
    BadDataTracker,
    DistributedEpochSampler,
    FaceBatch,
    RecordFaceDataset,
    augmentation_seeds,
    collate_faces,
    normalize_images,
    seed_worker,
)
from data.recordio import (
    IRHeader,
    MissingRecordFileError,
    RecordIOError,
    RecordReader,
    RecordWriter,
    decode_image,
    pack,
    write_insightface_layout,
)
from data.synthetic import SyntheticDataset

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


def _noise_jpeg(seed: int, size: int = 112) -> bytes:
    """An asymmetric image (a flip changes it), JPEG-encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB")


def _face_folder(root: Path, labels: list[int], payloads: dict[int, bytes] | None = None) -> Path:
    """An insightface-layout folder of noise images; ``payloads`` replaces the encoded image of some samples."""
    root.mkdir(parents=True, exist_ok=True)
    payloads = payloads or {}
    samples = [(label, payloads.get(index, _noise_jpeg(index))) for index, label in enumerate(labels)]
    write_insightface_layout(root / "train.rec", root / "train.idx", samples, root / "property")
    return root


# --- RecordFaceDataset ------------------------------------------------------------------------------------------


def test_fixture_samples() -> None:
    dataset = RecordFaceDataset(INSIGHTFACE, random_flip=False)
    assert len(dataset) == len(EXPECTED["images"]) and dataset.num_classes == EXPECTED["num_classes"]
    assert dataset.labels.tolist() == [image["label"] for image in EXPECTED["images"]]
    for index, image in enumerate(EXPECTED["images"]):
        pixels, label, bad_key = dataset[index]
        assert bad_key.dtype == torch.int64 and bad_key.shape == () and int(bad_key) == -1
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
    (root / "property").write_text("6,112,112\n")
    with pytest.raises(RecordIOError, match=r"property lists 6 identities, more than num_classes=3"):
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
            generator=torch.Generator().manual_seed(seed * 1000 + rank),
            multiprocessing_context="fork",
        )
        return [images for images, _, _ in loader]

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


# --- The batched path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_batched_path_equals_per_sample_path(tmp_path: Path, output: str) -> None:
    dataset = RecordFaceDataset(_face_folder(tmp_path / "d", [0, 0, 1, 2, 2, 2]), output=output)  # type: ignore[arg-type]
    seeds = augmentation_seeds(6, 0, np.arange(6))
    items = [(i, int(s)) for i, s in zip([3, 0, 5, 1, 4, 2], seeds, strict=True)]
    assert 0 < sum((s >> 62) & 1 for _, s in items) < 6  # both flipped and unflipped samples
    batch = dataset.__getitems__(items)
    images, labels, bad_keys = collate_faces(batch)
    expected = default_collate([dataset[item] for item in items])
    assert images.dtype == (torch.float32 if output == "float" else torch.uint8) and images.shape == (6, 3, 112, 112)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]) and torch.equal(bad_keys, expected[2])
    assert labels.tolist() == [2, 0, 2, 0, 2, 1] and bad_keys.tolist() == [-1] * 6
    # default_collate reads a FaceBatch as a sequence of samples: same values.
    assert isinstance(batch, FaceBatch) and all(
        torch.equal(a, b) for a, b in zip(default_collate(batch), expected, strict=True)
    )
    # uint8 normalized on the "device" is bit-identical to the float path.
    floats = RecordFaceDataset(dataset.root, output="float")
    assert torch.equal(normalize_images(images), collate_faces(floats.__getitems__(items))[0])


def test_normalize_images_is_exact() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    reference = ((pixels.double() / 255.0 - 0.5) / 0.5).float()
    assert torch.equal(normalize_images(pixels), reference)
    assert normalize_images(pixels, torch.bfloat16).dtype == torch.bfloat16
    assert normalize_images(pixels).is_contiguous()
    assert torch.equal(normalize_images(reference), reference)  # float passes through


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_images_channels_last_same_values(dtype: torch.dtype) -> None:
    """`speed.channels_last`: the same numbers in NHWC strides, from the datasets' NHWC-strided uint8 batches (a
    permute of (B, H, W, 3)) as from NCHW ones, and from float input."""
    hwc = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = hwc.permute(0, 3, 1, 2)  # what FaceDataset.__getitems__ hands on
    reference = normalize_images(batch, dtype)
    assert reference.is_contiguous() and not batch.is_contiguous()  # the default still transposes: as before
    for images in (batch, batch.contiguous(), reference.float()):
        nhwc = normalize_images(images, dtype, torch.channels_last)
        assert nhwc.is_contiguous(memory_format=torch.channels_last) and nhwc.dtype == dtype
        assert torch.equal(nhwc, reference)


def test_loader_with_workers_shares_the_batch_tensor(tmp_path: Path) -> None:
    dataset = RecordFaceDataset(_face_folder(tmp_path / "d", [0, 1, 1, 2]), output="uint8")
    sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=1, with_seeds=True)
    loader = DataLoader(
        dataset, batch_size=2, sampler=sampler, num_workers=1, collate_fn=collate_faces, multiprocessing_context="fork"
    )
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, 3, 112, 112)] * 2 and all(b[0].is_shared() for b in batches)
    order = sampler.rank_indices(0)
    items = list(zip(order.tolist(), augmentation_seeds(1, 0, order).tolist(), strict=True))
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([dataset[item][0] for item in items]))


def test_synthetic_dataset_follows_the_sample_contract() -> None:
    image, label, bad_key = SyntheticDataset(4, 3)[(2, 99)]
    assert image.shape == (3, 112, 112) and label.dtype == torch.int64 and int(bad_key) == -1
    images, labels, bad_keys = collate_faces([SyntheticDataset(4, 3)[i] for i in range(4)])
    assert images.shape == (4, 3, 112, 112) and bad_keys.tolist() == [-1] * 4


# --- Bad data ---------------------------------------------------------------------------------------------------


def _corrupt_cases() -> dict[str, bytes]:
    jpeg = _noise_jpeg(100)
    return {
        "garbage": b"\xff\xd8\xff\xe0 not a jpeg at all",
        "truncated": jpeg[: len(jpeg) // 3],
        "not_an_image": b"hello",
        "wrong_size": _noise_jpeg(101, size=64),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_image_is_replaced_by_the_next_sample(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    labels = [0, 0, 1, 1, 2]
    root = _face_folder(tmp_path / case, labels, payloads={2: _corrupt_cases()[case]})
    clean = RecordFaceDataset(_face_folder(tmp_path / "clean", labels), random_flip=False)
    dataset = RecordFaceDataset(root, random_flip=False)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        image, label, bad_key = dataset[2]
    # Key 3 holds index 2 (keys start at 1); index 3 stands in, with its own label.
    assert int(bad_key) == 3 and int(label) == 1 and torch.equal(image, clean[3][0])
    assert re.search(r"d?train\.rec: key 3 \(byte offset \d+\): .*; skipped, using sample 3", caplog.text)
    assert int(dataset[3][2]) == -1
    # The batched path does the same, and the batch keeps its size.
    images, batch_labels, bad_keys = collate_faces(dataset.__getitems__([1, 2, 4]))
    assert bad_keys.tolist() == [-1, 3, -1] and batch_labels.tolist() == [0, 1, 2] and len(images) == 3
    assert torch.equal(images[1], clean[3][0])


def test_bad_last_sample_wraps_and_all_bad_raises(tmp_path: Path) -> None:
    dataset = RecordFaceDataset(_face_folder(tmp_path / "d", [0, 1, 2], payloads={2: b"junk"}), random_flip=False)
    image, label, bad_key = dataset[2]
    assert int(bad_key) == 3 and int(label) == 0 and torch.equal(image, dataset[0][0])
    broken = RecordFaceDataset(_face_folder(tmp_path / "all", [0, 1], payloads={0: b"a", 1: b"b"}))
    with pytest.raises(RecordIOError, match=r"train\.rec: 2 consecutive samples from index 1 are unusable"):
        broken[1]


def test_broken_framing_found_during_training_is_a_bad_sample(tmp_path: Path) -> None:
    root = _face_folder(tmp_path / "d", [0, 1, 2, 3])
    offset = RecordReader(root / "train.rec", root / "train.idx").offset(2)
    data = bytearray((root / "train.rec").read_bytes())
    data[offset] ^= 0xFF  # key 2's magic
    (root / "train.rec").write_bytes(bytes(data))
    dataset = RecordFaceDataset(root, random_flip=False, spot_check=False)
    assert int(dataset[1][2]) == 2 and int(dataset[1][1]) == 2


def test_label_out_of_range_is_still_a_hard_error(tmp_path: Path) -> None:
    root = _face_folder(tmp_path / "d", [0, 1, 2])
    dataset = RecordFaceDataset(root, num_classes=3)
    dataset.num_classes = 2  # as if the recipe said fewer classes than the data has
    with pytest.raises(RecordIOError, match=r"key 3 \(byte offset \d+\) has label 2, not a class id in \[0, 2\)"):
        dataset.__getitems__([0, 2])


def test_tracker_counts_and_stops_past_the_fraction() -> None:
    tracker = BadDataTracker(0.01, "data/train.rec", min_samples=100)
    tracker.update(torch.tensor([-1, 7, -1, -1]))  # 1 bad in 4: judged against min_samples, 1 <= 0.01 * 100
    tracker.update(torch.full((96,), -1))
    assert tracker.summary() == {"seen": 100, "count": 1, "fraction": 0.01, "keys": [7]}
    tracker.update(torch.tensor([7] + [-1] * 99))  # the same key again (next epoch): 2 in 200 = 1%
    assert tracker.summary()["count"] == 2 and tracker.summary()["keys"] == [7]
    with pytest.raises(
        RecordIOError,
        match=r"data/train\.rec: 3 bad samples in 201 \(1\.49%\), more than the limit data\.max_bad_fraction=0\.01; "
        r"2 distinct keys: 5, 7;",
    ):
        tracker.update(torch.tensor([5]))
    resumed = BadDataTracker(0.01, "data/train.rec", min_samples=100)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.summary() == tracker.summary()


def test_tracker_limits() -> None:
    strict = BadDataTracker(0.0, "x.rec")
    strict.update(torch.full((8,), -1))
    with pytest.raises(RecordIOError, match=r"x\.rec: 1 bad samples in 9"):
        strict.update(torch.tensor([4]))
    burst = BadDataTracker(0.1, "x.rec", min_samples=50)
    burst.update(torch.tensor([1, 2, 3, 4, 5]))  # 5 bad of 5 seen, but 5 <= 0.1 * 50
    with pytest.raises(RecordIOError, match=r"6 bad samples in 6 .*6 distinct keys: 1, 2, 3, 4, 5, 6;"):
        burst.update(torch.tensor([6]))
    many = BadDataTracker(0.0, "x.rec")
    with pytest.raises(RecordIOError, match=r"12 distinct keys: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.;"):
        many.update(torch.arange(12))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="max_fraction"):
            BadDataTracker(bad, "x.rec")


# --- Errors at start, through the dataset -----------------------------------------------------------------------


def test_truncated_rec_fails_at_start(tmp_path: Path) -> None:
    root = _face_folder(tmp_path / "d", [0, 1, 2])
    rec = root / "train.rec"
    data = rec.read_bytes()
    rec.write_bytes(data[:-4])  # cuts into the last record (record 0, written last)
    with pytest.raises(RecordIOError, match=r"d/train\.rec: key 0 \(record at byte offset \d+\) is truncated"):
        RecordFaceDataset(root)
    rec.write_bytes(data[: len(data) // 2])  # cut in the images: later records start past the end
    with pytest.raises(RecordIOError, match=r"d/train\.idx: key \d+ points at byte offset \d+, past the end of .*d/tr"):
        RecordFaceDataset(root)


def _edit_idx(root: Path, key: int, offset: int) -> None:
    idx = root / "train.idx"
    lines = [f"{key}\t{offset}" if line.split("\t")[0] == str(key) else line for line in idx.read_text().splitlines()]
    idx.write_text("\n".join(lines) + "\n")


def test_idx_pointing_past_the_end_fails_at_start(tmp_path: Path) -> None:
    root = _face_folder(tmp_path / "d", [0, 1, 2])
    size = (root / "train.rec").stat().st_size
    _edit_idx(root, 2, size + 8)
    with pytest.raises(RecordIOError, match=rf"d/train\.idx: key 2 points at byte offset {size + 8}, past the end"):
        RecordFaceDataset(root)


def test_idx_that_disagrees_with_rec_fails_at_start(tmp_path: Path) -> None:
    root = _face_folder(tmp_path / "d", [0, 0, 1, 1, 2, 2])
    # A middle image record (the reader itself checks only the first and last) now points 8 bytes into itself.
    offset = RecordReader(root / "train.rec", root / "train.idx").offset(4) + 8
    _edit_idx(root, 4, offset)
    with pytest.raises(
        RecordIOError,
        match=rf"d/train\.rec: key 4 \(record at byte offset {offset}\): expected the RecordIO magic.*"
        r"the \.idx and \.rec disagree",
    ):
        RecordFaceDataset(root)


# --- Exact mid-epoch resume through a DataLoader ----------------------------------------------------------------


class _Probe(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Returns the item itself: what the sampler asked for, index and augmentation seed."""

    def __len__(self) -> int:
        return 37

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(item[0]), torch.tensor(item[1])


def _batches(dataset: Dataset[Any], sampler: DistributedEpochSampler, workers: int, **kwargs: Any) -> list[Any]:
    loader = DataLoader(
        dataset,
        batch_size=4,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        worker_init_fn=seed_worker,
        multiprocessing_context="fork" if workers else None,
        **kwargs,
    )
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_yields_the_uninterrupted_batches(workers: int) -> None:
    def sampler() -> DistributedEpochSampler:
        built = DistributedEpochSampler(37, rank=1, world_size=2, seed=11, with_seeds=True)
        built.set_epoch(3)
        return built

    full = _batches(_Probe(), sampler(), workers)
    assert len(full) == 4  # 18 samples on this rank, batches of 4, drop_last
    for consumed_batches in (1, 3):
        resumed = sampler()
        resumed.load_state_dict({"epoch": 3, "position": 4 * consumed_batches})
        rest = _batches(_Probe(), resumed, workers)
        # The same indices and seeds, batch for batch (18 - 4 k samples left: whole batches only).
        expected = full[consumed_batches:]
        assert len(rest) == len(expected)
        for (index, seed), (index_full, seed_full) in zip(rest, expected, strict=True):
            assert torch.equal(index, index_full) and torch.equal(seed, seed_full)
    indices = torch.cat([index for index, _ in full])
    assert indices.tolist() == sampler().rank_indices(3)[:16].tolist()
    assert torch.cat([seed for _, seed in full]).tolist() == augmentation_seeds(11, 3, indices.numpy()).tolist()


def test_resumed_loader_yields_the_same_images(tmp_path: Path) -> None:
    dataset = RecordFaceDataset(_face_folder(tmp_path / "d", [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))

    def sampler(position: int) -> DistributedEpochSampler:
        built = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=2, with_seeds=True)
        built.load_state_dict({"epoch": 1, "position": position})
        return built

    full = _batches(dataset, sampler(0), 2, collate_fn=collate_faces)
    rest = _batches(dataset, sampler(4), 2, collate_fn=collate_faces)
    assert len(full) == 2 and len(rest) == 1
    assert all(torch.equal(a, b) for a, b in zip(rest[0], full[1], strict=True))


# --- GPU batch logic, with a CPU stand-in for nvJPEG ------------------------------------------------------------


def _cpu_nvjpeg(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    images = []
    for item in encoded:
        try:
            pixels = simplejpeg.decode_jpeg(item.numpy().tobytes(), colorspace="RGB")
        except ValueError as error:
            raise RuntimeError(str(error)) from None
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).to(device))
    return images


def test_gpu_batch_logic_matches_the_cpu_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_decode, "_gpu_decode", _cpu_nvjpeg)
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(png, "PNG")
    labels = [0, 0, 1, 1, 2, 2, 3]
    payloads = {1: _noise_jpeg(1)[:900], 3: png.getvalue(), 5: _noise_jpeg(5, size=64)}
    root = _face_folder(tmp_path / "d", labels, payloads)
    cpu = RecordFaceDataset(root)
    gpu = gpu_decode.JpegRecordDataset(root)
    items = [(i, int(s)) for i, s in enumerate(augmentation_seeds(3, 0, np.arange(7)))]
    batch = gpu_decode.collate_jpeg([gpu[item] for item in items])
    images, batch_labels, bad_keys = gpu_decode.decode_batch(batch, "cpu")
    expected_images, expected_labels, expected_bad = collate_faces([cpu[item] for item in items])
    # Index 5 (key 6, 64x64) is caught by its header when read, and replaced by index 6 as on the CPU; index 1
    # (key 2, truncated) only fails to decode, and the next image of the batch stands in.
    assert bad_keys.tolist() == expected_bad.tolist() == [-1, 2, -1, -1, -1, 6, -1]
    assert batch.keys.tolist() == [1, 2, 3, 4, 5, 7, 7]
    good = [0, 2, 3, 4, 5, 6]
    assert torch.equal(images[good], expected_images[good]) and torch.equal(batch_labels[good], expected_labels[good])
    assert torch.equal(images[1], images[2]) and int(batch_labels[1]) == labels[2]


# --------------------------------------------------------------------------------------------------------------
# Data that disagrees with itself: .idx vs .rec record count, property file vs labels


def _headers_only(root: Path, labels: list[Any]) -> Path:
    """A plain im2rec folder whose records carry labels and a few payload bytes (nothing here decodes them)."""
    root.mkdir(parents=True, exist_ok=True)
    with RecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, label in enumerate(labels):
            writer.write_idx(key, pack(IRHeader(0, label, key, 0), bytes(range(key % 7))))
    return root


def _keep_idx_lines(root: Path, count: int) -> None:
    lines = (root / "train.idx").read_text().splitlines(keepends=True)
    (root / "train.idx").write_text("".join(lines[:count]))


def test_idx_listing_part_of_the_rec_is_refused_or_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _headers_only(tmp_path / "plain", [k % 12 for k in range(109)])
    assert len(RecordFaceDataset(root, num_classes=12, spot_check=False)) == 109
    _keep_idx_lines(root, 40)
    with pytest.raises(RecordIOError) as info:
        RecordFaceDataset(root, num_classes=12)
    message = str(info.value)
    assert f"{root / 'train.idx'} lists 40 records, but {root / 'train.rec'} holds 109" in message
    assert "data.allow_partial_index: true" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        partial = RecordFaceDataset(root, num_classes=12, allow_partial_index=True)
    assert len(partial) == 40
    assert "lists 40 records, but" in caplog.text and "training on the listed records only" in caplog.text


def test_idx_cut_short_in_the_insightface_layout(tmp_path: Path) -> None:
    """The generated dataset's layout (12 identities x 8 images = 109 records, record 0 written last): an .idx cut to
    its first 40 lines has no record 0, so it reads as a plain im2rec of 40 images; the count catches it."""
    root = _face_folder(tmp_path / "faces", [c for c in range(12) for _ in range(8)])
    assert len(RecordFaceDataset(root)) == 96
    _keep_idx_lines(root, 40)
    with pytest.raises(RecordIOError, match=r"train\.idx lists 40 records, but .*train\.rec holds 109 "):
        RecordFaceDataset(root)


@pytest.mark.parametrize("property_classes", [50, 2])
def test_property_file_disagreeing_with_the_labels(tmp_path: Path, property_classes: int) -> None:
    plain = _headers_only(tmp_path / "plain", [k % 12 for k in range(30)])
    (plain / "property").write_text(f"{property_classes},112,112\n")
    with pytest.raises(RecordIOError) as info:
        RecordFaceDataset(plain)
    assert str(info.value).startswith(
        f"{plain / 'property'} says {property_classes} classes, but the labels of {plain / 'train.rec'} span 12 (0..11)"
    )
    (plain / "property").write_text("12,112,112\n")
    assert RecordFaceDataset(plain).num_classes == 12
    # The insightface layout: record 0's identity count is what the property file must repeat.
    faces = _face_folder(tmp_path / "faces", [0, 0, 1, 2])
    (faces / "property").write_text(f"{property_classes},112,112\n")
    with pytest.raises(RecordIOError) as info:
        RecordFaceDataset(faces)
    assert str(info.value).startswith(
        f"{faces / 'property'} says {property_classes} classes, but record 0 of {faces / 'train.rec'} lists 3 "
        "identities"
    )


def test_empty_rec_and_idx_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_bytes(b"")
    with pytest.raises(RecordIOError) as info:
        RecordFaceDataset(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'train.idx'} lists no records ({tmp_path / 'train.rec'}: 0 bytes): there is nothing to train on"
    )
    from models.errors import InputError

    assert isinstance(info.value, InputError)  # the CLI turns it into one line and exit status 2


def test_labels_read_in_one_gather_equal_the_headers(tmp_path: Path) -> None:
    labels: list[Any] = [3, 0, [7.0, 1.0], 2, 5]
    root = _headers_only(tmp_path / "plain", labels)
    reader = RecordReader(root / "train.rec", root / "train.idx")
    keys = np.array([4, 2, 0, 3, 1])
    expected = [float(np.asarray(reader.read_header(int(k)).label).reshape(-1)[0]) for k in keys]
    assert reader.read_labels(keys).tolist() == expected == [5.0, 7.0, 3.0, 2.0, 0.0]
    reader.close()
