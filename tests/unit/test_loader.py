"""data.loader.FaceLoader: the same batches as DataLoader + collate_faces, slots reused, resumable, abandoned passes
cleaned up, and worker failures (errors, bad data, a killed worker) reported in the main process."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
import torch
from torch.utils.data import DataLoader

from data.dataset import (
    DistributedEpochSampler,
    FaceDataset,
    RecordFaceDataset,
    collate_faces,
    normalize_images,
)
from data.image_folder import ImageFolderDataset
from data.loader import FaceLoader
from data.recordio import RecordIOError, write_insightface_layout


def _noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 asymmetric images of 8 identities; sample 13 is not a JPEG."""
    root = tmp_path_factory.mktemp("loader")
    samples = [(index // 5, b"broken" if index == 13 else _noise_jpeg(index)) for index in range(40)]
    write_insightface_layout(root / "train.rec", root / "train.idx", samples, root / "property")
    return root


def _sampler(size: int, **kwargs: Any) -> DistributedEpochSampler:
    return DistributedEpochSampler(size, rank=0, world_size=1, seed=5, with_seeds=True, **kwargs)


def _copies(batches: Any) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(tensor.clone() for tensor in batch) for batch in batches]  # a FaceLoader batch is a slot view


def _reference(dataset: FaceDataset, batch_size: int, drop_last: bool = True) -> list[tuple[torch.Tensor, ...]]:
    loader = DataLoader(
        dataset, batch_size, sampler=_sampler(len(dataset)), collate_fn=collate_faces, drop_last=drop_last
    )
    return _copies(loader)


def _assert_same(got: list[tuple[torch.Tensor, ...]], expected: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_same_batches_as_dataloader(faces: Path, workers: int) -> None:
    dataset = RecordFaceDataset(faces, output="uint8")
    expected = _reference(dataset, 8)
    sampler = _sampler(len(dataset))
    loader = FaceLoader(dataset, 8, sampler, num_workers=workers, prefetch=2)
    try:
        got = _copies(loader)
        _assert_same(got, expected)
        assert len(loader) == len(got) == 5
        assert any(int(key) == 14 for batch in got for key in batch[2])  # the broken sample (key 14) was replaced
        assert got[0][0].stride()[1] == 1  # (B, 3, H, W) with channels-last strides, like __getitems__
        sampler.set_position(0)  # the same epoch again, as after a restart: the same batches
        _assert_same(_copies(loader), expected)
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_flips_left_to_the_device_give_the_same_batches(faces: Path, workers: int) -> None:
    dataset = RecordFaceDataset(faces, output="uint8")
    expected = _reference(dataset, 8)
    loader = FaceLoader(dataset, 8, _sampler(len(dataset)), num_workers=workers, flip_on_device=True)
    try:
        got = [(normalize_images(images, flips=flips), labels, bad_keys) for images, labels, bad_keys, flips in loader]
    finally:
        loader.close()
    assert len(got) == len(expected)
    for (images, labels, bad_keys), (ref_images, ref_labels, ref_bad) in zip(got, expected, strict=True):
        assert torch.equal(images, normalize_images(ref_images)) and torch.equal(labels, ref_labels)
        assert torch.equal(bad_keys, ref_bad)


def test_device_flips_need_augmentation_seeds(faces: Path) -> None:
    dataset = RecordFaceDataset(faces, output="uint8")
    plain = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=5)  # indices only
    with pytest.raises(ValueError, match="with_seeds=True"):
        list(FaceLoader(dataset, 8, plain, num_workers=0, flip_on_device=True))
    assert not dataset.flips([]).any()


def test_last_partial_batch_and_image_folders(tmp_path: Path) -> None:
    for identity in range(3):
        (tmp_path / f"id{identity}").mkdir()
        for image in range(3):
            (tmp_path / f"id{identity}" / f"{image}.jpg").write_bytes(_noise_jpeg(10 * identity + image))
    dataset = ImageFolderDataset(tmp_path, output="uint8")
    loader = FaceLoader(dataset, 4, _sampler(len(dataset), drop_last=False), num_workers=1, drop_last=False)
    try:
        got = _copies(loader)
    finally:
        loader.close()
    _assert_same(got, _reference(dataset, 4, drop_last=False))
    assert [len(batch[0]) for batch in got] == [4, 4, 1] and len(loader) == 3


def test_slots_are_reused_not_reallocated(faces: Path) -> None:
    dataset = RecordFaceDataset(faces, output="uint8")
    loader = FaceLoader(dataset, 4, _sampler(len(dataset)), num_workers=1, prefetch=1)
    try:
        pointers = {batch[0].data_ptr() for batch in loader}
    finally:
        loader.close()
    base, size = loader.slots.data_ptr(), loader.slots[0].nbytes
    assert len(loader.slots) == 2 and pointers == {base, base + size}  # 10 batches through 2 slots


def test_abandoned_pass_then_resume_mid_epoch(faces: Path) -> None:
    dataset = RecordFaceDataset(faces, output="uint8")
    full = _reference(dataset, 4)
    sampler = _sampler(len(dataset))
    loader = FaceLoader(dataset, 4, sampler, num_workers=2, prefetch=2)
    try:
        for number, _ in enumerate(loader):  # leave the pass early, with batches still in flight
            if number == 2:
                break
        sampler.set_position(3 * 4)  # as the trainer does on resume: three batches consumed
        _assert_same(_copies(loader), full[3:])
        sampler.set_epoch(1)  # a new epoch, a new order, from the start
        assert len(_copies(loader)) == len(full)
    finally:
        loader.close()


class _Failing(RecordFaceDataset):
    """Fails on one index: with RecordIOError (a data error the trainer reports) or another exception (a bug)."""

    def __init__(self, root: Path, index: int, error: Exception) -> None:
        super().__init__(root, output="uint8")
        self.failing_index, self.error = index, error

    def encoded(self, index: int) -> tuple[bytes, int]:
        if index == self.failing_index:
            raise self.error
        return super().encoded(index)


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_errors_reach_the_main_process(faces: Path, workers: int) -> None:
    order = _sampler(40).rank_indices(0).tolist()
    data_error = _Failing(faces, order[9], RecordIOError("train.rec: key 99 is unusable"))
    loader = FaceLoader(data_error, 4, _sampler(40), num_workers=workers)
    with pytest.raises(RecordIOError, match=r"^train\.rec: key 99 is unusable$"):
        list(loader)
    loader.close()
    bug = _Failing(faces, order[9], KeyError("oops"))
    loader = FaceLoader(bug, 4, _sampler(40), num_workers=workers)
    expected = RuntimeError if workers else KeyError
    with pytest.raises(expected, match="oops"):
        list(loader)
    loader.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_loses_no_batch(faces: Path, workers: int) -> None:
    """A worker killed mid-pass (the OOM killer's SIGKILL): no hang, no exception, the same batches as without it
    (the batches in flight and the rest decoded in this process), and `failure` says which worker died and how."""
    dataset = RecordFaceDataset(faces, output="uint8")
    expected = _reference(dataset, 4)
    loader = FaceLoader(dataset, 4, _sampler(40), num_workers=workers, prefetch=2)
    iterator = iter(loader)
    got = [tuple(t.clone() for t in next(iterator))]
    assert loader.failure is None
    victim = loader._workers[0]
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(timeout=30)  # dead before the next batch is asked for (a kill is not instantaneous)
    got += _copies(iterator)
    _assert_same(got, expected)
    assert loader.failure is not None and loader._workers == []
    assert re.fullmatch(r"data worker face-loader-0 died \(killed by signal 9; out of memory\?\) while .*train\.rec",
                        loader.failure), loader.failure  # fmt: skip
    loader.sampler.set_position(0)  # type: ignore[attr-defined]
    _assert_same(_copies(loader), expected)  # the next pass runs in this process
    loader.close()


def test_workers_leave_stopping_to_the_training_process(faces: Path) -> None:
    # A scheduler's SIGTERM or a terminal's Ctrl-C reaches the whole process group: the trainer finishes its step
    # and saves a checkpoint, for which the loader must still work.
    dataset = RecordFaceDataset(faces, output="uint8")
    expected = _reference(dataset, 4)
    loader = FaceLoader(dataset, 4, _sampler(40), num_workers=2, prefetch=1)
    iterator = iter(loader)
    got = [tuple(t.clone() for t in next(iterator))]
    for process in loader._workers:
        os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        os.kill(process.pid, signal.SIGINT)  # type: ignore[arg-type]
    got += _copies(iterator)
    _assert_same(got, expected)
    processes = list(loader._workers)
    loader.close()
    assert not any(process.is_alive() for process in processes)


def test_argument_errors(faces: Path) -> None:
    with pytest.raises(TypeError, match="FaceLoader needs a data.dataset.FaceDataset"):
        FaceLoader([1, 2, 3], 2, range(3))  # type: ignore[arg-type]
    dataset = RecordFaceDataset(faces, output="uint8")
    with pytest.raises(ValueError, match="batch_size >= 1"):
        FaceLoader(dataset, 0, range(3))


def test_the_input_pipeline_leaves_the_flip_to_a_gpu_only(faces: Path) -> None:
    from data.config import DataConfig
    from data.pipeline import _build_loader

    cfg = DataConfig(source="recordio", root=str(faces))
    dataset = RecordFaceDataset(faces, output="uint8")
    for device, on_device in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        loader = _build_loader(cfg, dataset, _sampler(len(dataset)), 8, device, seed=0)
        assert isinstance(loader, FaceLoader) and loader.flip_on_device is on_device
        assert loader.num_workers == cfg.num_workers and loader.prefetch == cfg.prefetch
        loader.close()
