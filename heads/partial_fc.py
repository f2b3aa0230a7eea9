"""Partial FC: a margin-softmax classifier whose class centers are sharded by class across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    distributed_softmax_cross_entropy,
    world_info,
)
from heads.margins import MarginSoftmax


class PartialFC(nn.Module):
    """Margin softmax over ``num_classes`` centers, each rank holding a contiguous range of them (Partial FC).

    Sharding (insightface's split): with C classes and W ranks, rank r holds ``num_local = C // W + (r < C % W)``
    centers starting at ``class_start = (C // W) * r + min(r, C % W)``; the first ``C % W`` ranks get one extra.

    ``forward`` all-gathers embeddings (with gradient) and labels, so every rank scores the global batch against its
    own centers; a distributed softmax cross-entropy returns the same scalar on every rank: the mean loss over the
    global batch. The head is not data-parallel: keep it out of DDP/ZeRO and give it its own optimizer, since
    its gradients are per shard and must not be averaged. ``dp_average`` (see ``all_gather_with_grad``) makes the
    backbone gradient, after DDP/ZeRO averaging, equal to one process's on the global batch.

    With ``sample_rate < 1``, each step uses ``num_sample = max(int(sample_rate * num_local), #positives)`` of
    this rank's centers: every positive (a class of this shard present in the global batch) plus random negatives
    drawn from the global torch RNG on the weight's device, so the trainer's seeding and RNG checkpointing cover
    them. Ranks may draw different negatives (different seeds or shard sizes): that is fine, the shards are
    disjoint and the softmax denominator just sums whatever columns each rank contributes; ranks only have to
    agree on the rows (the gathered batch), not on the columns.

    Unsampled centers get an exact zero gradient (a tensor, not ``None``), so optimizers still visit them: SGD
    weight decay shrinks them (``w -= lr * wd * w``) and a momentum buffer keeps moving them
    (``buf = momentum * buf + wd * w``), exactly as in insightface's Partial FC v2.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: MarginSoftmax | None = None,
        sample_rate: float = 1.0,
        dp_average: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        default_rank, default_world = world_info()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if num_classes < world_size:
            raise ValueError(f"num_classes ({num_classes!r}) must be >= world size ({world_size}): one class per rank")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")

        self.embedding_size = embedding_size
        self._num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.dp_average = dp_average
        self.rank = rank
        self.world_size = world_size
        self.margin = MarginSoftmax.arcface(s=64.0, m=0.5) if margin is None else margin

        per_rank, remainder = divmod(num_classes, world_size)
        self._num_local = per_rank + int(rank < remainder)
        self._class_start = per_rank * rank + min(rank, remainder)
        self.weight = nn.Parameter(torch.empty(self._num_local, embedding_size))
        # Set by forward when sample_rate < 1 (rank-local, for tests and logging); None otherwise.
        self.last_sampled_index: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """normal(0, 0.01). Without `seed`, from the global RNG (seed ranks differently to get different shards).

        With `seed`, rows are drawn in fixed chunks of classes, each chunk from its own generator seeded by
        (seed, chunk), and this rank keeps its rows: a class's initial center does not depend on the number of
        ranks, so a 2-process run starts from exactly the weights of a 1-process run (and a resharded resume
        of an untrained head is consistent). At most two partial chunks are drawn beyond this rank's rows.
        """
        if seed is None:
            nn.init.normal_(self.weight, mean=0.0, std=0.01)
            return
        chunk = 1 << 14
        rows, dim = self.weight.shape
        start = self._class_start
        with torch.no_grad():
            for c in range(start // chunk, (start + rows - 1) // chunk + 1 if rows else 0):
                generator = torch.Generator().manual_seed(seed * 7919 + c)
                block = torch.empty(chunk, dim).normal_(0.0, 0.01, generator=generator)
                lo, hi = max(start, c * chunk), min(start + rows, (c + 1) * chunk)
                self.weight[lo - start : hi - start].copy_(block[lo - c * chunk : hi - c * chunk])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_local(self) -> int:
        return self._num_local

    @property
    def class_start(self) -> int:
        return self._class_start

    def shard_info(self) -> dict[str, int]:
        """Where this rank's rows sit in the global class table (what a checkpoint shard must record)."""
        return {
            "class_start": self._class_start,
            "num_local": self._num_local,
            "num_classes": self._num_classes,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def row_tensors(self) -> dict[str, Tensor]:
        """The class centers (class as dim 0); what checkpoints shard and reshard (heads.base.Head)."""
        return {"weight": self.weight}

    def global_tensors(self) -> dict[str, Tensor]:
        """No running statistics: the combined margin is stateless."""
        return {}

    def load_global_tensors(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no global state, got {sorted(tensors)}")

    def start_epoch(self, epoch: int) -> None:
        """Nothing changes with the epoch."""

    def _sample_centers(self, local_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Pick the centers to score this step; return (sampled row indices, labels remapped to them)."""
        with torch.no_grad():
            # Host sync: unique() and the top-k size depend on the data.
            positives = torch.unique(local_labels[local_labels >= 0])  # sorted
            num_sample = max(int(self.sample_rate * self._num_local), positives.numel())
            scores = torch.rand(self._num_local, device=self.weight.device)  # global RNG, in [0, 1)
            scores[positives] = 2.0  # outranks every random score: positives are always kept
            index = torch.topk(scores, k=num_sample).indices.sort().values
            remapped = torch.where(local_labels >= 0, torch.searchsorted(index, local_labels.clamp_min(0)), -1)
        return index, remapped

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """Loss (scalar, identical on every rank) of this rank's embeddings (N, E) and labels (N,) in [0, C).

        Every rank must call it with the same N (checked). A label outside [0, C) gives a NaN loss.
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"local_embeddings must have shape (N, {self.embedding_size}), got {tuple(local_embeddings.shape)}"
            )
        if local_labels.numel() != local_embeddings.shape[0]:
            raise ValueError(
                f"need one label per embedding: {local_labels.numel()} labels for {local_embeddings.shape[0]} rows"
            )
        _, world_size = world_info()
        if world_size != self.world_size:
            raise RuntimeError(
                f"PartialFC was built for world_size={self.world_size}, but the process group has {world_size}"
            )

        # fp32 (fp64 if the head was cast to it) with autocast off: the softmax spans up to millions of classes and
        # logits scaled by s=64, beyond fp16/bf16 precision; the head's gradients stay independent of any loss
        # scale, because the backbone's mixed precision never reaches here.
        compute_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            embeddings = all_gather_with_grad(local_embeddings.to(compute_dtype), dp_average=self.dp_average)
            labels = all_gather_no_grad(local_labels.reshape(-1).long())

            # Global class ids -> rows of this shard, -1 for classes held by another rank.
            in_shard = (labels >= self._class_start) & (labels < self._class_start + self._num_local)
            local_labels_global_batch = torch.where(in_shard, labels - self._class_start, -1)

            if self.sample_rate < 1.0:
                index, local_labels_global_batch = self._sample_centers(local_labels_global_batch)
                self.last_sampled_index = index
                # Indexing the Parameter: backward scatters into a zero tensor, so unsampled rows get exact zeros.
                weight = self.weight[index]
            else:
                weight = self.weight

            cos_theta = F.linear(F.normalize(embeddings), F.normalize(weight.to(compute_dtype))).clamp(-1.0, 1.0)
            logits = self.margin(cos_theta, local_labels_global_batch)
            return distributed_softmax_cross_entropy(logits, local_labels_global_batch)

    def extra_repr(self) -> str:
        info: dict[str, Any] = {
            "embedding_size": self.embedding_size,
            **self.shard_info(),
            "sample_rate": self.sample_rate,
            "dp_average": self.dp_average,
        }
        return ", ".join(f"{key}={value}" for key, value in info.items())
