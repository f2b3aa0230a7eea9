"""Training from a folder of aligned face crops: ``root/<identity>/<image>.jpg``, beside RecordIO.

Layout, as torchvision's ``ImageFolder``: one sub-folder per identity; sorted folder names get labels
``0 .. C-1``; inside, ``.jpg``/``.jpeg``/``.png`` files (any case) in sorted order are the samples. Names starting
with ``.`` are ignored. An identity folder without images is an error (it would be a class without samples).

Images must be **aligned 112x112 face crops**, as in every insightface dataset: nothing is resized, because
resizing an unaligned photo does not make it a usable face crop (align with five landmarks first, e.g.
``evaluation.alignment.align_face``). The first image is checked at start, so a folder of raw photos fails at once;
later images of another size are bad samples, skipped and counted like corrupt ones.

Per-file reads suit small and medium datasets; for millions of images pack the folder into a ``.rec``
(``python -m data.tools pack``): one file, sequential layout, no per-image ``open``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from data.dataset import IMAGE_SIZE, BadSampleError, FaceDataset, Output
from models.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageFolderError(InputError, ValueError):
    """A missing or unusable image folder; the message names the path."""


def list_image_folder(root: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(identity names, image paths relative to root, int64 labels)`` of an image folder, in label order."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image folder not found: {root}")
    identities = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not identities:
        raise ImageFolderError(f"{root} has no identity sub-folders (expected root/<identity>/<image>.jpg)")
    paths: list[str] = []
    counts: list[int] = []
    for name in identities:
        files = sorted(
            entry.name
            for entry in os.scandir(root / name)
            if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ImageFolderError(f"{root / name} has no {'/'.join(IMAGE_EXTENSIONS)} image")
        paths.extend(f"{name}/{file}" for file in files)
        counts.append(len(files))
    labels = np.repeat(np.arange(len(identities), dtype=np.int64), counts)
    return identities, paths, labels


class ImageFolderDataset(FaceDataset):
    """An image folder (see the module docstring) with the sample and item contracts of ``data.dataset``.

    ``bad_key`` of a skipped image is its sample index (``paths[bad_key]`` names the file). ``num_classes`` is the
    number of identity folders, or the given ``num_classes`` when that is larger.
    """

    def __init__(
        self, root: str | Path, num_classes: int | None = None, random_flip: bool = True, output: Output = "float"
    ) -> None:
        super().__init__(random_flip, output)
        self.root = Path(root)
        self.source = str(self.root)
        self.identities, self.paths, self._labels = list_image_folder(self.root)
        found = len(self.identities)
        if num_classes is not None:
            if num_classes <= 0:
                raise ValueError(f"num_classes must be positive, got {num_classes}")
            if found > num_classes:
                raise ImageFolderError(f"{self.root} has {found} identity folders, more than num_classes={num_classes}")
        self.num_classes = int(num_classes) if num_classes is not None else found
        problem = self.check(0)
        if problem is not None:
            raise ImageFolderError(
                f"{self.describe(0)}: {problem}; an image folder must hold aligned {IMAGE_SIZE}x{IMAGE_SIZE} face "
                "crops (align with five landmarks first, e.g. evaluation.alignment.align_face)"
            )
        logger.info("%s: %d images, %d classes", self.root, len(self), self.num_classes)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> np.ndarray:
        """The int64 label of every sample."""
        return self._labels

    def encoded(self, index: int) -> tuple[bytes, int]:
        try:
            data = (self.root / self.paths[index]).read_bytes()
        except OSError as error:
            raise BadSampleError(f"cannot read: {error.strerror or error}") from None
        return data, int(self._labels[index])

    def sample_key(self, index: int) -> int:
        return int(index)

    def describe(self, index: int) -> str:
        return str(self.root / self.paths[index])
