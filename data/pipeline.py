"""The training input pipeline, built in one call from the recipe's `data:` section.

    train_input = build_train_input(cfg.data, batch_size=64, seed=2048, rank=0, world_size=1, device=device)
    for batch in train_input.batches(epoch):
        images, labels, bad_keys = train_input.to_device(batch, dtype, memory_format)

Every choice about the input is made here, once: which dataset class reads `data.source`, which loader feeds it
(`data.loader.FaceLoader` for decoded faces, DataLoader for the synthetic source and for JPEG bytes), where the
random flip happens (in the workers on a CPU device, on the device on a GPU), and whether JPEGs are decoded on the
CPU or on the GPU (`data.decode`). The trainer sees batches, the sampler's position (for checkpoints), the number
of classes, the verification files that come with the data, and the bad-sample counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.config import DataConfig
from data.dataset import (
    BadDataTracker,
    DistributedEpochSampler,
    FaceDataset,
    RecordFaceDataset,
    augmentation_seeds,
    collate_faces,
    normalize_images,
    seed_worker,
)
from data.image_folder import ImageFolderDataset
from data.loader import FaceLoader
from data.synthetic import SyntheticDataset
from models.errors import InputError

Batch = Any  # (images, labels, bad_keys[, flips]) from FaceLoader / DataLoader, or a JpegBatch


@dataclass
class TrainInput:
    """What the training loop needs from the data; built by :func:`build_train_input`."""

    dataset: Dataset[Any]
    loader: FaceLoader | DataLoader[Any]
    sampler: DistributedEpochSampler
    num_classes: int
    bins: list[str]  # verification files: the recipe's, plus the generated dataset's own val.bin
    source: str  # what the data is, for logs and error messages
    bad_data: BadDataTracker
    decode: str = "cpu"
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_samples(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # every dataset here is Sized

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One pass over this rank's share of `epoch`, from the sampler's position on (a resumed run's)."""
        self.sampler.set_epoch(epoch)
        return iter(self.loader)

    def to_device(
        self, batch: Batch, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images in [-1, 1] on the device in the backbone's input `dtype` and `memory_format`, labels on the
        device, bad keys on the CPU); the bad keys are counted here (too many stop the run)."""
        if self.decode == "gpu":
            from data.gpu_decode import decode_batch

            images, labels, bad_keys = decode_batch(batch, self._device, dtype)
            images = images.contiguous(memory_format=memory_format)
        else:
            images, labels, bad_keys, *flips = batch  # FaceLoader adds the flips it left to the device
            images = images.to(self._device, non_blocking=True)
            images = normalize_images(images, dtype, memory_format, flips[0] if flips else None)
            labels = labels.to(self._device, non_blocking=True)
        self.bad_data.update(bad_keys)  # a corrupt image was replaced by another sample; too many stop the run
        return images, labels, bad_keys

    def sample_keys(self, epoch: int, position: int, count: int) -> list[int]:
        """The record keys (or image indices) of this rank's samples [position, position + count) in `epoch`: what
        a batch was made of, for a log line about it."""
        indices = self.sampler.rank_indices(epoch)[position : position + count]
        key = getattr(self.dataset, "sample_key", None)
        return [int(key(int(i))) if key else int(i) for i in indices]

    def batch_samples(self, epoch: int, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, whether each is mirrored) of this rank's samples [position, position + count) in
        `epoch`: what a batch was made of. The flips follow from the sampler's augmentation seeds alone (the same
        ones the workers or the device applied); a source without random flips gives none."""
        indices = self.sampler.rank_indices(epoch)[position : position + count]
        flips = getattr(self.dataset, "flips", None)
        if flips is None:
            return indices, np.zeros(len(indices), dtype=bool)
        seeds = augmentation_seeds(self.sampler.seed, epoch, indices)
        return indices, flips(np.stack([indices, seeds], axis=1))

    def state_dict(self) -> dict[str, Any]:
        """This rank's bad-sample counts (the sampler's position is the trainer's: it follows the step)."""
        return {"bad_data": self.bad_data.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "bad_data" in state:
            self.bad_data.load_state_dict(state["bad_data"])

    def close(self) -> None:
        """Stop the loader's worker processes (DataLoader's end with their iterator)."""
        if isinstance(self.loader, FaceLoader):
            self.loader.close()


def build_train_input(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    bins: list[str] | None = None,
) -> TrainInput:
    """The dataset of `cfg.source`, this rank's resumable sampler and the loader, ready to iterate.

    `bins` are the recipe's verification files (already resolved); the generated source adds its own `val.bin`.
    The generated dataset is written on first use: call this on the main process first when several processes
    share a machine (`accelerator.main_process_first()`).
    """
    if cfg.decode == "gpu" and device.type != "cuda":
        raise DataConfigError(f"data.decode 'gpu' needs a CUDA device; this run is on {device.type}")
    dataset, num_classes, bins = _build_dataset(cfg, seed, list(bins or []))
    sampler = DistributedEpochSampler(len(dataset), rank=rank, world_size=world_size, seed=seed, with_seeds=True)
    loader = _build_loader(cfg, dataset, sampler, batch_size, device, seed)
    source = str(getattr(dataset, "source", cfg.source))
    return TrainInput(
        dataset=dataset,
        loader=loader,
        sampler=sampler,
        num_classes=num_classes,
        bins=bins,
        source=source,
        bad_data=BadDataTracker(cfg.max_bad_fraction, source=source),
        decode=cfg.decode,
        _device=device,
    )


class DataConfigError(InputError, ValueError):
    """A `data:` setting this machine or this data cannot honour; the message names the key."""


def _build_dataset(cfg: DataConfig, seed: int, bins: list[str]) -> tuple[Any, int, list[str]]:
    """(dataset, num_classes, verification files). Images come out as uint8 (normalized on the device, 4x fewer
    bytes between processes) or, with `data.decode: gpu`, still JPEG-encoded."""
    num_classes = cfg.num_classes or None
    if cfg.source == "synthetic":
        return SyntheticDataset(cfg.num_images, cfg.num_classes, seed=seed), cfg.num_classes, bins
    if cfg.source == "image_folder":
        folder = ImageFolderDataset(cfg.root, num_classes=num_classes, random_flip=cfg.random_flip, output="uint8")
        return folder, folder.num_classes, bins
    if cfg.source == "generated":
        from data.faces import ensure_dataset

        root = ensure_dataset(cfg.generated)
        bins.append(str(root / "val.bin"))
    else:
        root = Path(cfg.root)
    dataset: RecordFaceDataset
    if cfg.decode == "gpu":
        from data.gpu_decode import JpegRecordDataset

        dataset = JpegRecordDataset(
            root, num_classes=num_classes, random_flip=cfg.random_flip, allow_partial_index=cfg.allow_partial_index
        )
    else:
        dataset = RecordFaceDataset(
            root,
            num_classes=num_classes,
            random_flip=cfg.random_flip,
            output="uint8",
            allow_partial_index=cfg.allow_partial_index,
        )
    return dataset, dataset.num_classes, bins


def _build_loader(
    cfg: DataConfig,
    dataset: Dataset[Any],
    sampler: DistributedEpochSampler,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> FaceLoader | DataLoader[Any]:
    """Face images decoded on the CPU go through `data.loader.FaceLoader` (batch slots in shared memory, allocated
    once: about twice DataLoader's images/s per worker, docs/benchmarks.md); the synthetic source and GPU decoding
    (which ships JPEG bytes, not pixels) through DataLoader. Both yield the same batches for the same sampler.

    On a GPU the random flip is left to the device, where it is one pass with the normalization, and the workers
    only read and decode; on a CPU device a worker flips the uint8 image more cheaply than the device the float
    one (measured in docs/benchmarks.md)."""
    if isinstance(dataset, FaceDataset) and cfg.decode == "cpu":
        return FaceLoader(
            dataset,
            batch_size,
            sampler,
            num_workers=cfg.num_workers,
            prefetch=cfg.prefetch,
            pin_memory=cfg.pin_memory,
            flip_on_device=device.type == "cuda",
        )
    collate: Callable[..., Any] = collate_faces
    if cfg.decode == "gpu":
        from data.gpu_decode import collate_jpeg

        collate = collate_jpeg
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch if cfg.num_workers else None,
        drop_last=True,
        persistent_workers=cfg.num_workers > 0,
        # Its own generator: a DataLoader draws its workers' base seed when an epoch's iterator starts, from the
        # global torch RNG otherwise, which would shift every later draw (Partial FC's negatives) by where a resumed
        # run started its iterator. The workers' randomness comes from the sampler's augmentation seeds anyway.
        generator=torch.Generator().manual_seed(seed),
    )
