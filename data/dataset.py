"""Face datasets (insightface RecordIO here, image folders in `data.image_folder`), bad-sample handling, the
distributed epoch sampler, and DataLoader seeding.

Sample contract, shared by every face dataset (and `data.synthetic`): ``(image, label, bad_key)``.

* ``image``: ``(3, 112, 112)`` RGB; float32 in ``[-1, 1]`` (``(x / 255 - 0.5) / 0.5``) with ``output="float"``, or
  the raw uint8 pixels with ``output="uint8"``, to be normalized by :func:`normalize_images` on the device.
* ``label``: int64 scalar tensor.
* ``bad_key``: int64 scalar tensor, -1 normally. When the requested record is corrupt (broken framing, an
  undecodable image, not 112x112) the dataset logs a warning naming the file and key and returns the next usable
  sample (index + 1, wrapping) with ``bad_key`` = the corrupt record's key, so every rank's batch keeps its size.
  :class:`BadDataTracker` counts them in the trainer. A label outside ``[0, num_classes)`` is a wrong dataset, not a
  corrupt image: it raises.

Items are an index, or ``(index, augmentation_seed)`` from :class:`DistributedEpochSampler` with
``with_seeds=True``; the horizontal flip is then bit 62 of the seed, a function of (seed, epoch, sample) alone.

Batches: the trainer's loader (:class:`data.loader.FaceLoader`) calls :meth:`FaceDataset.fill_batch`, which decodes
a batch straight into a slot of shared memory that is reused. ``__getitems__`` (which DataLoader calls for a whole
batch) decodes into one new batch tensor and returns a :class:`FaceBatch`; :func:`collate_faces` hands its tensors on
without the copy ``default_collate`` makes. Both give the same batches.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import simplejpeg
import torch
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

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
FaceSample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Output = Literal["float", "uint8"]
_Used = TypeVar("_Used")
# (x / 255 - 0.5) / 0.5 for every uint8 value. A numpy table lookup is exact and stays off torch's intra-op thread
# pool, whose wake-ups cost milliseconds per small image when the main process loads the data (num_workers=0).
_PIXEL_TO_UNIT = ((np.arange(256, dtype=np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)
# How far a bad sample's replacement search goes before giving up: past this the data is broken, not noisy.
_MAX_REPLACEMENTS = 1000
# Records whose framing is checked at start besides the first and last ones (spread evenly over the file).
_SPOT_CHECKS = 64
# The flip is this bit of the augmentation seed: seeds are SplitMix64 outputs, every bit a fair coin.
_FLIP_BIT = 62
# libjpeg-turbo's warnings about damaged data, which simplejpeg's strict mode raises. All make an image bad, even
# "N extraneous bytes before marker", since zeroed or lost scan data shows up as exactly that.
_CORRUPT_JPEG = ("Corrupt JPEG data", "Premature end of JPEG file")
# Byte order of a mirrored (H, W * 3) row: pixels reversed, channels kept.
_FLIP_COLUMNS = (np.arange(IMAGE_SIZE)[::-1, None] * 3 + np.arange(3)).ravel()


class BadSampleError(Exception):
    """One sample cannot be used (corrupt record, undecodable image, wrong size); the message says why."""


def decode_face(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Decode an encoded face to a ``(112, 112, 3)`` uint8 RGB array, into ``out`` when given.

    JPEG goes through simplejpeg (libjpeg-turbo; the fastest decoder measured, see docs/benchmarks.md), anything
    else or a JPEG it refuses (CMYK, arithmetic coding) through Pillow. Raises :class:`BadSampleError`.
    """
    if simplejpeg.is_jpeg(data):
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        except ValueError as error:
            message = str(error)
            if message.startswith(_CORRUPT_JPEG):
                # Pillow would decode it anyway, with grey or smeared blocks: not a face to train on.
                raise BadSampleError(f"corrupt JPEG: {message}") from None
            else:
                image = None  # e.g. CMYK (libjpeg-turbo will not convert it to RGB), or larger than `out`: Pillow
        if image is not None:
            if image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3):
                return image
            raise BadSampleError(_wrong_size(image))
    try:
        image = decode_image(data)
    except RecordIOError as error:
        raise BadSampleError(str(error)) from None
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise BadSampleError(_wrong_size(image))
    if out is None:
        return image
    out[...] = image
    return out


def _wrong_size(image: np.ndarray) -> str:
    return f"image is {image.shape[1]}x{image.shape[0]}, expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} faces"


def normalize_images(
    images: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """A batch from any face dataset as ``dtype`` in ``[-1, 1]``, laid out in ``memory_format``: uint8 pixels are
    normalized (``(x - 127.5) / 127.5``, bit-identical to the float path's ``(x / 255 - 0.5) / 0.5``), float passes
    through.

    Meant for the device: ``normalize_images(images.to(device, non_blocking=True))`` moves 4x fewer bytes.
    ``torch.channels_last`` (the trainer's ``speed.channels_last``) keeps the uint8 batches' NHWC strides, so the
    normalization pass is the only one; the default, contiguous NCHW, transposes them on the way. ``flips`` (bool,
    one per image) applies the random flip here instead of in the loader's workers.
    """
    if images.dtype == torch.uint8:
        # Normalize in float32 for exactness, then cast: same values as the float path for every dtype.
        images = images.to(dtype=torch.float32, memory_format=memory_format).sub_(127.5).div_(127.5)
    images = images.to(dtype=dtype, memory_format=memory_format)
    if flips is not None:
        # The random flip, when the loader left it to the device: `flips[i]` mirrors image i left-right. Exact, so
        # the batch equals the one flipped in the workers (FaceLoader(flip_on_device=True), docs/benchmarks.md).
        mask = flips.to(images.device, non_blocking=True).view(-1, 1, 1, 1)
        images = torch.where(mask, mirror_images(images), images).contiguous(memory_format=memory_format)
    return images


def mirror_images(images: torch.Tensor) -> torch.Tensor:
    """The left-right mirror of an ``(N, C, H, W)`` batch: the training flip and the flip of flip-test evaluation
    (verification, IJB, embedding), one definition for all."""
    return images.flip(3)


def split_item(item: int | tuple[int, int] | list[int]) -> tuple[int, int | None]:
    """``(index, augmentation seed or None)`` of a dataset item (a pair may also come as a list)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor; in shared memory inside a DataLoader worker, so sending it to the main process
    copies nothing (what ``default_collate`` does for the tensors it stacks)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


class FaceDataset(Dataset[FaceSample]):
    """The sample contract of the module docstring over any source of encoded images.

    Subclasses set ``num_classes``, ``source`` (the file or folder named in messages) and implement
    :meth:`__len__`, :meth:`encoded`, :meth:`sample_key` and :meth:`describe`.
    """

    num_classes: int
    source: str

    def __init__(self, random_flip: bool, output: Output) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.random_flip = random_flip
        self.output: Output = output
        self._flip_rng: np.random.Generator | None = None
        self._flip_seed: int | None = None
        self._scratch: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def encoded(self, index: int) -> tuple[bytes, int]:
        """``(encoded image, label)`` of sample ``index``; :class:`BadSampleError` if it cannot be read, an error
        of another type (a hard one) if the label is not a class."""
        raise NotImplementedError

    def sample_key(self, index: int) -> int:
        """The number that identifies sample ``index`` in its source (``bad_key``): a record key, a file index."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` lives, for messages."""
        raise NotImplementedError

    def check(self, index: int) -> str | None:
        """Why sample ``index`` is unusable, or None if it decodes (for scanning tools; label errors raise)."""
        try:
            data, _ = self.encoded(index)
            decode_face(data)
        except BadSampleError as error:
            return str(error)
        return None

    def _load(self, index: int, out: np.ndarray | None) -> tuple[np.ndarray, int, int]:
        """``(HWC uint8 image, label, bad key)``: sample ``index``, or the next usable one if it is bad."""
        image, label, bad_key, _ = self.first_usable(index, lambda data: decode_face(data, out))
        return image, label, bad_key

    def first_usable(self, index: int, use: Callable[[bytes], _Used]) -> tuple[_Used, int, int, int]:
        """``(use(encoded image), label, bad key, index used)`` for sample ``index``, or for the next sample
        (index + 1, ..., wrapping) whose record reads and for which ``use`` does not raise :class:`BadSampleError`.

        ``bad key`` is -1, or the key of sample ``index`` when it was bad (logged as a warning).
        """
        bad_key = -1
        size = len(self)
        for attempt in range(min(size, _MAX_REPLACEMENTS)):
            current = (index + attempt) % size
            try:
                data, label = self.encoded(current)
                return use(data), label, bad_key, current
            except BadSampleError as error:
                logger.warning(
                    "%s: %s; skipped, using sample %d instead", self.describe(current), error, (current + 1) % size
                )
                if bad_key < 0:
                    bad_key = self.sample_key(current)
        raise RecordIOError(
            f"{self.source}: {min(size, _MAX_REPLACEMENTS)} consecutive samples from index {index} are unusable "
            "(see the warnings above); the data is broken, not noisy"
        )

    def _flip(self, seed: int | None) -> bool:
        if not self.random_flip:
            return False
        if seed is not None:
            return bool((seed >> _FLIP_BIT) & 1)
        # DataLoader seeds each worker's torch RNG with base_seed + worker_id, so torch.initial_seed() identifies
        # the worker and the epoch's base seed; the global numpy RNG would be identical in every forked worker.
        initial = torch.initial_seed()
        if self._flip_rng is None or self._flip_seed != initial:
            self._flip_rng = np.random.default_rng(initial)
            self._flip_seed = initial
        return bool(self._flip_rng.random() < 0.5)

    def __getitem__(self, item: int | tuple[int, int]) -> FaceSample:
        """One sample; see the module docstring for the item and sample contracts."""
        index, seed = split_item(item)
        image, label, bad_key = self._load(index, None)
        view = image[:, ::-1] if self._flip(seed) else image
        chw = view.transpose(2, 0, 1)
        pixels = np.take(_PIXEL_TO_UNIT, chw) if self.output == "float" else np.ascontiguousarray(chw)
        return torch.from_numpy(pixels), torch.tensor(label, dtype=torch.int64), torch.tensor(bad_key)

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> FaceBatch:
        """A whole batch, decoded into one tensor (see :class:`FaceBatch`)."""
        count = len(items)
        shape = (count, IMAGE_SIZE, IMAGE_SIZE, 3)
        if self.output == "uint8":
            hwc = _batch_tensor(shape, torch.uint8)
            pixels = hwc.numpy()
        else:
            # Decoded into a scratch buffer reused across batches (no page faults), then normalized into the batch.
            if self._scratch is None or self._scratch.shape[0] < count:
                self._scratch = np.empty(shape, dtype=np.uint8)
            pixels = self._scratch[:count]
            hwc = torch.from_numpy(pixels)
        labels, bad_keys = self.fill_batch(items, pixels)
        images = hwc.permute(0, 3, 1, 2)  # (B, 3, H, W) with channels-last strides
        if self.output == "float":
            normalized = _batch_tensor((count, 3, IMAGE_SIZE, IMAGE_SIZE), torch.float32)
            if torch.get_num_threads() == 1:
                images = normalized.copy_(images).sub_(127.5).div_(127.5)  # same values as the table, faster
            else:
                # Off torch's thread pool, as in _flip_in_place (the main process, num_workers=0).
                np.take(_PIXEL_TO_UNIT, pixels.transpose(0, 3, 1, 2), out=normalized.numpy())
                images = normalized
        return FaceBatch(images, torch.from_numpy(labels), torch.from_numpy(bad_keys))

    def fill_batch(self, items: Sequence[Any], pixels: np.ndarray, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Decode (and, with ``flip``, flip) the samples ``items`` into ``pixels[:len(items)]``, a
        ``(>= B, 112, 112, 3)`` uint8 array; returns their ``(labels, bad_keys)`` as int64 arrays. The one batch
        path: ``__getitems__`` and :class:`data.loader.FaceLoader`'s reusable shared-memory slots both go through
        it. ``flip=False`` leaves the flip to the device (see :meth:`flips` and :func:`normalize_images`)."""
        labels, bad_keys = [], []
        for slot, item in enumerate(items):
            index, seed = split_item(item)
            out = pixels[slot]
            try:  # the common case inline: this loop is most of a data worker's time besides decoding
                data, label = self.encoded(index)
                decode_face(data, out)
                bad_key = -1
            except BadSampleError:
                _, label, bad_key = self._load(index, out)  # logs it, finds the replacement
            labels.append(label)
            bad_keys.append(bad_key)
            if flip and self._flip(seed):
                _flip_in_place(out)
        return np.array(labels, dtype=np.int64), np.array(bad_keys, dtype=np.int64)

    def flips(self, items: Sequence[Any]) -> np.ndarray:
        """Which of ``items`` are mirrored (bool), from their augmentation seeds alone: what :meth:`fill_batch`
        with ``flip=True`` would do to them, replacements of bad samples included. Needs ``(index, seed)`` items."""
        if not self.random_flip or not len(items):
            return np.zeros(len(items), dtype=bool)
        seeds = np.asarray(items, dtype=np.int64)
        if seeds.ndim != 2 or seeds.shape[1] != 2:
            raise ValueError("flips need (index, augmentation seed) items: DistributedEpochSampler(with_seeds=True)")
        return ((seeds[:, 1] >> _FLIP_BIT) & 1).astype(bool)


class FaceBatch(Sequence[FaceSample]):
    """A decoded batch, ``(images, labels, bad_keys)``, that reads as the sequence of its samples.

    :func:`collate_faces` returns the batch tensors as they are; ``default_collate`` (or any collate function)
    sees a sequence of ``(image, label, bad_key)`` samples, made on access as views of the batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, bad_keys: torch.Tensor) -> None:
        self.images, self.labels, self.bad_keys = images, labels, bad_keys

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, slot: int) -> FaceSample:  # type: ignore[override]  # no slicing needed
        if not -len(self) <= slot < len(self):
            raise IndexError(slot)
        return self.images[slot], self.labels[slot], self.bad_keys[slot]


def _flip_in_place(pixels: np.ndarray) -> None:
    """Mirror one ``(H, W, 3)`` uint8 image left-right, in place."""
    if torch.get_num_threads() == 1:
        # torch.flip is ~5x faster than numpy on 3-byte pixels, but only where torch is single-threaded (DataLoader
        # workers): elsewhere each small op pays a thread-pool wake-up, milliseconds on a busy machine.
        image = torch.from_numpy(pixels)
        image.copy_(image.flip(1))
    else:
        rows = pixels.reshape(IMAGE_SIZE, 3 * IMAGE_SIZE)
        rows[...] = rows[:, _FLIP_COLUMNS]


def collate_faces(samples: Sequence[FaceSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for face datasets: ``(images, labels, bad_keys)``.

    A :class:`FaceBatch` (what ``__getitems__`` returns) is handed on without a copy; other samples (e.g. from
    :class:`data.synthetic.SyntheticDataset`) go through ``default_collate``.
    """
    if isinstance(samples, FaceBatch):
        return samples.images, samples.labels, samples.bad_keys
    images, labels, bad_keys = default_collate(list(samples))
    return images, labels, bad_keys


class RecordFaceDataset(FaceDataset):
    """``root/train.rec`` + ``root/train.idx`` (insightface layout or plain im2rec) as face samples.

    The class count comes from ``num_classes``, else record 0's layout, else the ``property`` file, else (plain
    im2rec without ``property``) the largest label + 1, which reads every header. At start, besides the reader's
    own checks (files exist, ``.idx`` offsets inside the ``.rec``, first and last records well framed), the framing
    of up to 64 records spread over the file is checked, so an ``.idx`` that does not belong to its ``.rec`` fails
    here, naming the file and offset (``spot_check=False`` skips this, for tools that list every broken record).
    A broken record found later is a bad sample (skipped and counted).

    Data that disagrees with itself is refused at start, naming both sides: an ``.idx`` that lists fewer records
    than the ``.rec`` holds (counted from the frame headers; ``allow_partial_index=True`` makes it a warning and
    trains on the listed records), and a ``property`` file whose class count differs from record 0's identity
    count or, for a plain im2rec ``.rec``, from the span of the labels (largest + 1; reading every header).
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int | None = None,
        random_flip: bool = True,
        output: Output = "float",
        spot_check: bool = True,
        allow_partial_index: bool = False,
    ) -> None:
        super().__init__(random_flip, output)
        self.root = Path(root)
        self.reader = RecordReader(self.root / "train.rec", self.root / "train.idx")
        self.source = str(self.reader.rec_path)
        layout = read_insightface_layout(self.reader, with_identity_ranges=False)
        self.image_keys: np.ndarray = layout.image_keys
        self._labels: np.ndarray | None = None
        if spot_check:
            self._spot_check()
        self._check_index_complete(allow_partial_index)

        known, source = layout.num_classes, f"record 0 of {self.reader.rec_path}"
        property_path = self.root / "property"
        if property_path.is_file():
            stated = read_property_file(property_path)[0]
            if known is not None and stated != known:
                raise RecordIOError(
                    f"{property_path} says {stated} classes, but {source} lists {known} identities; "
                    "fix or delete the property file"
                )
            if known is None:
                # Plain im2rec: nothing but the labels themselves can confirm the property file.
                self._labels = self._read_labels(upper=None)
                span = int(self._labels.max()) + 1 if self._labels.size else 0
                if span != stated:
                    raise RecordIOError(
                        f"{property_path} says {stated} classes, but the labels of {self.reader.rec_path} span "
                        f"{span} (0..{span - 1}); fix or delete the property file"
                    )
                known, source = stated, str(property_path)
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

    def _check_index_complete(self, allow_partial: bool) -> None:
        """The ``.idx`` lists every record of the ``.rec`` (a cut-short copy, or an ``.idx`` of another build of
        the data, would otherwise train on part of it without a word)."""
        stored, listed = self.reader.count_records(), self.reader.indexed_records
        if stored == listed:
            return
        message = (
            f"{self.reader.idx_path} lists {listed} records, but {self.reader.rec_path} holds {stored} (counted "
            "from its frame headers)"
        )
        if not allow_partial:
            raise RecordIOError(
                f"{message}: the .idx is incomplete or belongs to another .rec; rebuild it, or set "
                f"data.allow_partial_index: true to train on the {listed} listed records only"
            )
        logger.warning("%s; training on the listed records only (data.allow_partial_index)", message)

    def _spot_check(self) -> None:
        picks = np.unique(np.linspace(0, len(self) - 1, num=min(len(self), _SPOT_CHECKS)).astype(np.int64))
        for key in self.image_keys[picks].tolist():
            try:
                self.reader.read_header(key)
            except RecordIOError as error:
                raise RecordIOError(
                    f"{error} (found at start, checking records spread over the file: the .idx and .rec disagree; "
                    f"`python -m data.tools scan {self.root}` lists every broken record)"
                ) from None

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def _label(self, key: int, header: IRHeader, upper: int | None) -> int:
        """The class of an image record (its float label, or an array label's first value), checked < ``upper``."""
        label = header.label
        value = label if isinstance(label, float) else float(np.asarray(label, dtype=np.float64).reshape(-1)[0])
        if not value.is_integer() or value < 0 or (upper is not None and value >= upper):
            self._bad_label(key, value, upper)
        return int(value)

    def _bad_label(self, key: int, value: float, upper: int | None) -> None:
        raise RecordIOError(
            f"{self.reader.rec_path}: key {key} (byte offset {self.reader.offset(key)}) has label {value:g}, "
            f"not a class id in [0, {upper if upper is not None else 'inf'})"
        )

    @property
    def labels(self) -> np.ndarray:
        """The int64 label of every sample. The first call reads every image header (one small read each)."""
        if self._labels is None:
            self._labels = self._read_labels(self.num_classes)
        return self._labels

    def _read_labels(self, upper: int | None) -> np.ndarray:
        values = self.reader.read_labels(self.image_keys)
        good = (values == np.floor(values)) & (values >= 0) & (values < (np.inf if upper is None else upper))
        if not good.all():  # NaN is not good either
            first = int(np.flatnonzero(~good)[0])
            self._bad_label(int(self.image_keys[first]), float(values[first]), upper)
        return values.astype(np.int64)

    def encoded(self, index: int) -> tuple[bytes, int]:
        key = int(self.image_keys[index])
        try:
            header, payload = self.reader.read_record(key)
        except RecordIOError as error:
            raise BadSampleError(f"unreadable record: {error}") from None
        return payload, self._label(key, header, self.num_classes)

    def sample_key(self, index: int) -> int:
        return int(self.image_keys[index])

    def describe(self, index: int) -> str:
        key = int(self.image_keys[index])
        return f"{self.reader.rec_path}: key {key} (byte offset {self.reader.offset(key)})"


class BadDataTracker:
    """Counts the bad samples in one rank's batches and stops the run when there are too many.

    Call :meth:`update` with each batch's ``bad_keys`` (the CPU tensor from the loader: no device sync) on the
    main process of every rank. The run stops with :class:`RecordIOError` once ``bad > max_fraction * max(seen,
    min_samples)``: past ``min_samples`` samples that is "the bad fraction exceeds ``max_fraction``"; before, a
    burst of bad samples early in a run is judged against ``min_samples`` so one bad image in the first batch does
    not stop it. ``max_fraction=0`` stops at the first bad sample. Counts are this rank's.
    """

    def __init__(self, max_fraction: float, source: str, min_samples: int = 1000) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_fraction = float(max_fraction)
        self.source = source
        self.min_samples = int(min_samples)
        self.seen = 0
        self.count = 0
        self.keys: set[int] = set()

    def update(self, bad_keys: torch.Tensor) -> None:
        """Count one batch; raises :class:`RecordIOError` past the limit."""
        keys = bad_keys.reshape(-1)
        self.seen += int(keys.numel())
        bad = keys[keys >= 0]
        if bad.numel() == 0:
            return
        self.count += int(bad.numel())
        self.keys.update(bad.tolist())
        if self.count > self.max_fraction * max(self.seen, self.min_samples):
            first = ", ".join(str(key) for key in sorted(self.keys)[:10])
            more = ", ..." if len(self.keys) > 10 else ""
            raise RecordIOError(
                f"{self.source}: {self.count} bad samples in {self.seen} ({self.count / self.seen:.2%}), more than "
                f"the limit data.max_bad_fraction={self.max_fraction:g}; {len(self.keys)} distinct keys: "
                f"{first}{more}; `python -m data.tools scan` lists every broken record"
            )

    def summary(self) -> dict[str, Any]:
        """``{"seen", "count", "fraction", "keys"}``: samples seen, bad ones, their fraction, the distinct keys."""
        return {
            "seen": self.seen,
            "count": self.count,
            "fraction": self.count / self.seen if self.seen else 0.0,
            "keys": sorted(self.keys),
        }

    def state_dict(self) -> dict[str, Any]:
        """The counts, for a checkpoint."""
        return {"seen": self.seen, "count": self.count, "keys": sorted(self.keys)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue counting from a checkpoint's :meth:`state_dict`."""
        self.seen, self.count, self.keys = int(state["seen"]), int(state["count"]), {int(k) for k in state["keys"]}


class DistributedEpochSampler(Sampler[int | tuple[int, int]]):
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

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        self._iteration += 1
        return self._iterate(self._iteration, self.epoch, self.position)

    def _iterate(self, iteration: int, epoch: int, start: int) -> Iterator[int | tuple[int, int]]:
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
    ``generator``: pass a seeded ``torch.Generator`` to make runs reproducible per worker.
    """
    del worker_id  # already part of torch.initial_seed()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
