"""Batched JPEG decoding on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``), reading the same ``.rec``.

The CPU path decodes in the worker processes of ``data.loader.FaceLoader`` and ships uint8 pixels; here the workers
of a ``torch.utils.data.DataLoader`` only read records and ship JPEG bytes, and the GPU decodes a whole batch in one
call (``data.pipeline`` chooses between the two). Optional: torchvision is imported on first use (it is not a CPU
dependency)::

    dataset = JpegRecordDataset(root)                       # same arguments as RecordFaceDataset, less `output`
    loader = DataLoader(dataset, batch_size=B, sampler=sampler, collate_fn=collate_jpeg, num_workers=W)
    for batch in loader:
        images, labels, bad_keys = decode_batch(batch, device)   # (B, 3, 112, 112) in [-1, 1] on device, flipped

Samples, flips and bad data follow the CPU contract (``data.dataset``): the flip comes from the same augmentation
seed bit, a record that cannot be read, or whose JPEG header is broken or not 112x112, is replaced by the next
sample at read time; an image that nvJPEG then fails to decode is decoded on the CPU (PNG, CMYK), and if that fails
too it is replaced by the next usable image of the batch, its label with it. Either way ``bad_keys`` names the bad
record and the batch keeps its size. nvJPEG and libjpeg-turbo round differently (a few grey levels at most), and
nvJPEG may decode damaged scan data that the CPU path rejects (``python -m data.tools scan`` lists those records).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import simplejpeg
import torch

from data.dataset import (
    IMAGE_SIZE,
    BadSampleError,
    RecordFaceDataset,
    decode_face,
    normalize_images,
    split_item,
)
from data.recordio import RecordIOError

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

JpegSample = tuple[torch.Tensor, int, bool, int, int]


class JpegBatch(NamedTuple):
    """A batch of encoded images, as :func:`collate_jpeg` makes it."""

    data: torch.Tensor  # uint8 (total bytes,): the batch's encoded images back to back
    offsets: torch.Tensor  # int64 (B + 1,): image i is data[offsets[i]:offsets[i + 1]]
    labels: torch.Tensor  # int64 (B,)
    flips: torch.Tensor  # bool (B,)
    keys: torch.Tensor  # int64 (B,): the record each image was read from
    bad_keys: torch.Tensor  # int64 (B,): -1, or the key of the bad record this sample stands in for


def _check_header(data: bytes) -> bytes:
    """``data`` if its JPEG header says 112x112 (or it is not a JPEG: decoded on the CPU later), else raise."""
    if simplejpeg.is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            raise BadSampleError(f"corrupt JPEG header: {error}") from None
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            raise BadSampleError(f"image is {width}x{height}, expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} faces")
    return data


class JpegRecordDataset(RecordFaceDataset):
    """:class:`RecordFaceDataset` whose samples are ``(encoded image, label, flip, key, bad_key)``, for
    :func:`collate_jpeg` and :func:`decode_batch`."""

    # DataLoader calls __getitems__ when a dataset has one; the CPU batch decoder must not run here.
    __getitems__ = None  # type: ignore[assignment]

    def __init__(
        self,
        root: str | Path,
        num_classes: int | None = None,
        random_flip: bool = True,
        spot_check: bool = True,
        allow_partial_index: bool = False,
    ) -> None:
        super().__init__(
            root,
            num_classes=num_classes,
            random_flip=random_flip,
            spot_check=spot_check,
            allow_partial_index=allow_partial_index,
        )

    def __getitem__(self, item: int | tuple[int, int]) -> JpegSample:  # type: ignore[override]
        index, seed = split_item(item)
        data, label, bad_key, used = self.first_usable(index, _check_header)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return encoded, label, self._flip(seed), self.sample_key(used), bad_key


def collate_jpeg(samples: Sequence[JpegSample]) -> JpegBatch:
    """DataLoader ``collate_fn`` for :class:`JpegRecordDataset`: one byte tensor for the whole batch (one shared
    memory block per batch between processes, not one per image)."""
    data, labels, flips, keys, bad_keys = zip(*samples, strict=True)
    lengths = torch.tensor([0] + [len(item) for item in data], dtype=torch.int64)
    return JpegBatch(
        data=torch.cat(data),
        offsets=torch.cumsum(lengths, 0),
        labels=torch.tensor(labels, dtype=torch.int64),
        flips=torch.tensor(flips, dtype=torch.bool),
        keys=torch.tensor(keys, dtype=torch.int64),
        bad_keys=torch.tensor(bad_keys, dtype=torch.int64),
    )


def _gpu_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG decode of a list of JPEGs to ``(3, H, W)`` uint8 RGB on ``device``; raises if any one fails."""
    from torchvision.io import ImageReadMode, decode_jpeg  # optional dependency: only when GPU decode is chosen

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image: nvJPEG, else the CPU decoders (PNG, CMYK, ...), else None."""
    try:
        image = _gpu_decode([encoded], device)[0]
    except RuntimeError:
        try:
            pixels = decode_face(encoded.numpy().tobytes())
        except BadSampleError:
            return None
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(device)
    return image if image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) else None


def decode_batch(
    batch: JpegBatch, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, labels, bad_keys)``: images ``(B, 3, 112, 112)`` ``dtype`` in ``[-1, 1]`` and labels on
    ``device``; ``bad_keys`` stays on the CPU (for :class:`data.dataset.BadDataTracker`, no device sync)."""
    device = torch.device(device)
    offsets = batch.offsets.tolist()
    encoded = [batch.data[start:stop] for start, stop in itertools.pairwise(offsets)]
    try:
        decoded: list[torch.Tensor | None] = list(_gpu_decode(encoded, device))
    except RuntimeError:
        # One undecodable image fails the whole batched call: decode one by one to find it.
        decoded = [_decode_one(item, device) for item in encoded]
    decoded = [None if image is None or image.shape != (3, IMAGE_SIZE, IMAGE_SIZE) else image for image in decoded]
    labels, bad_keys = batch.labels.clone(), batch.bad_keys.clone()
    usable = [slot for slot, image in enumerate(decoded) if image is not None]
    if not usable:
        raise RecordIOError(f"no image of a batch of {len(decoded)} decodes (keys {batch.keys.tolist()})")
    for slot, image in enumerate(decoded):
        if image is None:
            # The next usable image of the batch stands in, so that every rank keeps the same batch size.
            stand_in = min((other for other in usable if other > slot), default=usable[0])
            logger.warning(
                "record key %d: undecodable image; key %d of the batch stands in",
                int(batch.keys[slot]),
                int(batch.keys[stand_in]),
            )
            decoded[slot] = decoded[stand_in]
            labels[slot] = batch.labels[stand_in]
            if bad_keys[slot] < 0:
                bad_keys[slot] = batch.keys[slot]
    images = torch.stack([image for image in decoded if image is not None])
    return normalize_images(images, dtype, flips=batch.flips), labels.to(device, non_blocking=True), bad_keys
