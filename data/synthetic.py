"""Synthetic data for throughput measurements: one random normalized image, random labels.

As insightface's `rec: synthetic`: no decoding cost, so a step's time is the model's. Not for learning.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """`num_images` samples of one fixed random image in [-1, 1], labels drawn once from `num_classes`."""

    def __init__(self, num_images: int, num_classes: int, seed: int = 0) -> None:
        if num_images <= 0 or num_classes <= 0:
            raise ValueError(
                f"synthetic data needs num_images > 0 and num_classes > 0, got {num_images}, {num_classes}"
            )
        generator = torch.Generator().manual_seed(seed)
        self.image = torch.rand(3, 112, 112, generator=generator) * 2 - 1
        self.labels = torch.randint(0, num_classes, (num_images,), generator=generator)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return self.image, self.labels[index], torch.tensor(-1)  # (image, label, bad_key): never bad
