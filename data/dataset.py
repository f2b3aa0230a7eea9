"""Training samples from an insightface RecordIO folder, the distributed epoch sampler, and DataLoader seeding."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data.recordio import (
    IRHeader,
    RecordIOError,
    RecordReader,
    decode_image,
    read_insightface_layout,
    read_property_file,
)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 112
# (x / 255 - 0.5) / 0.5 for every uint8 value. A numpy table lookup is exact and stays off torch's intra-op thread
# pool, whose wake-ups cost milliseconds per small image when the main process loads the data (num_workers=0).
_PIXEL_TO_UNIT = ((np.arange(256, dtype=np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)


class RecordFaceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``root/train.rec`` + ``root/train.idx`` (insightface layout or plain im2rec) as ``(image, label)`` pairs.

    ``image`` is a float32 ``(3, 112, 112)`` RGB tensor scaled to ``[-1, 1]`` (``(x / 255 - 0.5) / 0.5``) and
    ``label`` an int64 scalar tensor. The class count comes from ``num_classes``, else record 0's layout, else the
    ``property`` file, else (plain im2rec without ``property``) the largest label + 1, which reads every header.
    """

    def __init__(self, root: str | Path, num_classes: int | None = None, random_flip: bool = True) -> None:
        self.root = Path(root)
        self.reader = RecordReader(self.root / "train.rec", self.root / "train.idx")
        self.random_flip = random_flip
        layout = read_insightface_layout(self.reader, with_identity_ranges=False)
        self.image_keys: np.ndarray = layout.image_keys
        self._labels: np.ndarray | None = None
        self._flip_rng: np.random.Generator | None = None
        self._flip_seed: int | None = None

        known, source = layout.num_classes, f"record 0 of {self.reader.rec_path}"
        property_path = self.root / "property"
        if known is None and property_path.is_file():
            known, source = read_property_file(property_path)[0], str(property_path)
        if num_classes is not None:
            if num_classes <= 0:
                raise ValueError(f"num_classes must be positive, got {num_classes}")
            if known is not None and known > num_classes:
                raise RecordIOError(f"{source} lists {known} identities, more than num_classes={num_classes}")
            self.num_classes = int(num_classes)
        elif known is not None:
            self.num_classes = int(known)
        else:
            logger.info("%s: no class count in the layout or a property file; reading every label", self.root)
            self._labels = self._read_labels(upper=None)
            self.num_classes = int(self._labels.max()) + 1 if self._labels.size else 0
        logger.info("%s: %d images, %d classes", self.root, len(self), self.num_classes)

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def _label(self, key: int, header: IRHeader, upper: int | None) -> int:
        """The class of an image record (its float label, or an array label's first value), checked < ``upper``."""
        value = float(np.asarray(header.label, dtype=np.float64).reshape(-1)[0])
        if not value.is_integer() or value < 0 or (upper is not None and value >= upper):
            raise RecordIOError(
                f"{self.reader.rec_path}: key {key} (byte offset {self.reader.offset(key)}) has label {value:g}, "
                f"not a class id in [0, {upper if upper is not None else 'inf'})"
            )
        return int(value)

    @property
    def labels(self) -> np.ndarray:
        """The int64 label of every sample. The first call reads every image header (one small read each)."""
        if self._labels is None:
            self._labels = self._read_labels(self.num_classes)
        return self._labels

    def _read_labels(self, upper: int | None) -> np.ndarray:
        keys = self.image_keys.tolist()
        labels = (self._label(key, self.reader.read_header(key), upper) for key in keys)
        return np.fromiter(labels, dtype=np.int64, count=len(keys))

    def _rng(self) -> np.random.Generator:
        # DataLoader seeds each worker's torch RNG with base_seed + worker_id, so torch.initial_seed() identifies the
        # worker and the epoch's base seed; the global numpy RNG would be identical in every forked worker.
        seed = torch.initial_seed()
        if self._flip_rng is None or self._flip_seed != seed:
            self._flip_rng = np.random.default_rng(seed)
            self._flip_seed = seed
        return self._flip_rng

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``item`` is an index, or ``(index, augmentation_seed)`` from a sampler built with ``with_seeds=True``:
        then the flip is a function of the seed alone (reproducible across workers and resumes)."""
        index, aug_seed = item if isinstance(item, tuple) else (item, None)
        key = int(self.image_keys[index])
        header, payload = self.reader.unpack_idx(key)
        label = self._label(key, header, self.num_classes)
        try:
            image = decode_image(payload)
        except RecordIOError as error:
            raise RecordIOError(f"{self.reader.rec_path}: key {key}: {error}") from None
        if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise RecordIOError(
                f"{self.reader.rec_path}: key {key}: image is {image.shape[1]}x{image.shape[0]}, "
                f"expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} faces"
            )
        rng = self._rng() if aug_seed is None else np.random.default_rng(aug_seed)
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        chw = _PIXEL_TO_UNIT[np.ascontiguousarray(image.transpose(2, 0, 1))]
        return torch.from_numpy(chw), torch.tensor(label, dtype=torch.int64)


class DistributedEpochSampler(Sampler[int]):
    """Each rank's share of one shuffled pass over the dataset, resumable mid-epoch.

    Ordering contract, shared by every rank (they must agree on ``num_samples_total``, ``world_size``, ``seed``
    and ``epoch``, or samples are repeated and skipped):

    1. The epoch's global order is ``torch.randperm(num_samples_total)`` from a CPU generator seeded with
       ``seed + epoch`` (``0, 1, ...`` without shuffle).
    2. It is cut to ``num_samples * world_size`` entries (``drop_last``) or repeated from its start up to that
       length, so every rank gets ``num_samples`` indices.
    3. Rank ``r`` takes entries ``r, r + world_size, r + 2 * world_size, ...``: disjoint across ranks.

    ``position`` counts the indices this rank has consumed in the current epoch. Iterating advances it as indices
    are yielded; a DataLoader prefetches, so the trainer should ``set_position(consumed)`` before ``state_dict()``.
    An iteration starts at ``position`` (after ``load_state_dict`` that resumes mid-epoch); ``set_epoch`` with a new
    epoch resets it to 0. ``len()`` is always the full per-epoch count.
    """

    def __init__(
        self,
        num_samples_total: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        with_seeds: bool = False,
    ) -> None:
        if num_samples_total < 0:
            raise ValueError(f"num_samples_total must be >= 0, got {num_samples_total}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples_total = int(num_samples_total)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.with_seeds = with_seeds
        if drop_last:
            self.num_samples = self.num_samples_total // self.world_size
        else:
            self.num_samples = math.ceil(self.num_samples_total / self.world_size)
        if self.num_samples == 0 and self.num_samples_total > 0:
            logger.warning("%d samples over %d ranks: every rank gets none", self.num_samples_total, world_size)
        self.epoch = 0
        self.position = 0
        self._iteration = 0

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order (int64)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples_total, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples_total, dtype=np.int64)
        total = self.num_samples * self.world_size
        # np.resize repeats the order cyclically when padding (drop_last=False) and cuts it otherwise.
        order = np.resize(order, total) if total > order.size else order[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        self._iteration += 1
        return self._iterate(self._iteration, self.epoch, self.position)

    def _iterate(self, iteration: int, epoch: int, start: int) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self.rank_indices(epoch)[start:]
        items = zip(indices.tolist(), augmentation_seeds(self.seed, epoch, indices).tolist(), strict=True)
        for consumed, item in enumerate(items, start=start + 1):
            # An abandoned iterator (a DataLoader re-created, set_epoch called) must not move the position.
            if iteration == self._iteration and epoch == self.epoch:
                self.position = consumed
            yield item if self.with_seeds else item[0]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order); a different epoch than the current one starts at position 0."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def set_position(self, position: int) -> None:
        """Record that this rank consumed ``position`` indices of the current epoch (the next iteration skips them)."""
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position must be in [0, {self.num_samples}], got {position}")
        self.position = int(position)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``: enough to resume when the contract's other inputs are unchanged."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume: the next iteration yields epoch ``state["epoch"]``'s indices from ``state["position"]`` on."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.set_position(position)


def augmentation_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One 63-bit seed per (seed, epoch, sample index): SplitMix64 of the three, vectorized.

    A sample's augmentation then depends on what it is and when, not on which worker or process drew it, so a
    resumed run, or a run with another `num_workers`, flips exactly the images the uninterrupted run flipped.
    """
    with np.errstate(over="ignore"):
        x = indices.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(1)).astype(np.int64)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy's and Python's global RNGs from this worker's torch seed.

    DataLoader gives worker ``w`` the torch seed ``base_seed + w``, ``base_seed`` drawn from the DataLoader's
    ``generator``: pass ``generator=loader_generator(seed, rank)`` to make runs reproducible per (seed, rank,
    worker).
    """
    del worker_id  # already part of torch.initial_seed()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """A DataLoader generator whose stream depends on both ``seed`` and ``rank`` (no overlap between ranks)."""
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0]))
    return generator
