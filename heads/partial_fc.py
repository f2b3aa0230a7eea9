"""Partial FC: a margin-softmax classifier whose class centers are sharded by class across ranks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.base import HeadUpdate, PartialFCOptions, sample_rate_at
from heads.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum_no_grad,
    distributed_softmax_cross_entropy,
    world_info,
)
from heads.margins import MarginGrad, MarginSoftmax
from heads.registry import register_head
from heads.rows import Gradient, center_cosine
from models.recipe import key

RowSync = Callable[[Tensor | None], None]

logger = logging.getLogger(__name__)


def require_finite(settings: object, *names: str) -> None:
    """Refuse a NaN or infinite value among the fields ``names`` of ``settings`` (None, "the paper's", passes)."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass
class ScaleSettings:
    """The logit scale: every head's settings start from this class, so that the key is declared once."""

    s: float = key(64.0, help="logit scale, every head")

    def __post_init__(self) -> None:
        require_finite(self, "s")
        if not self.s > 0:
            raise ValueError(f"s must be > 0, got {self.s}")


@dataclass
class MarginSettings(ScaleSettings):
    """`partial_fc`: the combined margin, target logit s*cos(m1*theta + m2) - s*m3 (`heads.margins.MarginSoftmax`).

    ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.4); the options match insightface HEAD by default.
    """

    m1: float = key(1.0, help="combined margin: multiplicative angular margin")
    m2: float = key(0.5, help="combined margin: additive angular margin (ArcFace's m)")
    m3: float = key(0.0, help="combined margin: additive cosine margin (CosFace's m)")
    # Past theta + m2 > pi, insightface's pre-2023 fallback cos(theta) - m2*sin(pi - m2); off = cos(theta + m2).
    arcface_fallback: bool = key(False, help="ArcFace past theta + m2 > pi: insightface's pre-2023 fallback")
    # `exact`: differentiate through the margin; `constant`: as insightface, the margin is a constant in backward.
    margin_grad: MarginGrad = key("exact", help="exact: differentiate through the margin; constant: insightface's")
    # > 0: non-target cosines above it count as mislabelled duplicates: set to 0, no gradient (insightface: 0.4).
    interclass_filtering_threshold: float = key(
        0.0, help="> 0: non-target cosines above it are dropped as duplicate identities (0 = off)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_finite(self, "m1", "m2", "m3", "interclass_filtering_threshold")
        if not self.m1 > 0:
            raise ValueError(f"m1 must be > 0, got {self.m1}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {self.m2}")
        if self.m3 < 0:
            raise ValueError(f"m3 must be >= 0, got {self.m3}")
        if not 0.0 <= self.interclass_filtering_threshold < 1.0:
            raise ValueError(
                f"interclass_filtering_threshold must be in [0, 1) (0 = off), got {self.interclass_filtering_threshold}"
            )

    def margin(self) -> MarginSoftmax:
        return MarginSoftmax(
            s=self.s,
            m1=self.m1,
            m2=self.m2,
            m3=self.m3,
            arcface_fallback=self.arcface_fallback,
            margin_grad=self.margin_grad,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
        )


@register_head("partial_fc", settings=MarginSettings)
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

    ``options`` (`heads.base.PartialFCOptions`) are what every head shares; ``settings`` the combined margin
    (`MarginSettings`, ArcFace with s = 64 and m = 0.5 by default).

    ``update`` says how the centers move when ``sample_rate < 1`` (README, "Partial FC at millions of classes"):

    * ``dense``: unsampled centers get an exact zero gradient (a table-sized tensor), so optimizers still visit
      them: SGD weight decay shrinks them (``w -= lr * wd * w``) and a momentum buffer keeps moving them
      (``buf = momentum * buf + wd * w``), exactly as in insightface's Partial FC v2.
    * ``lazy`` and ``sparse``: the gradient is a sparse tensor of the sampled rows (no table-sized gradient);
      `trainer.row_sgd.RowSGD` applies it. ``lazy`` gives ``dense``'s result (the unsampled rows' updates are
      caught up in closed form, see there); ``sparse`` moves only the sampled rows (insightface Partial FC v1).
      The optimizer registers a hook (`set_row_sync`) that brings the rows about to be scored up to date: forward
      calls it with the sampled rows before reading them.

    With ``sample_rate == 1`` every row is scored every step and the three modes are the same (a dense gradient).

    The other heads (`heads.subcenter`, `heads.adaface`, ...) are this class with its hooks overridden: `cosine`
    (how a row scores a class), `logits` (the margin), `extra_loss`, `register_state` / `reset_state` (their
    buffers, named in `row_buffers` and `global_buffers` so that checkpoints find them) and `start_epoch`. Gathering,
    sharding, sampling and the distributed cross-entropy stay here, the same for all. Their constructors take
    (options, their settings), set their plain hyperparameters and then call ``PartialFC.__init__(options)``.
    """

    # Names of the buffers that are per-class state (class as dim 0) and global state (identical on every rank).
    row_buffers: tuple[str, ...] = ()
    global_buffers: tuple[str, ...] = ()

    def __init__(self, options: PartialFCOptions, settings: MarginSettings | None = None) -> None:
        super().__init__()
        default_rank, default_world = world_info()
        rank = default_rank if options.rank is None else options.rank
        world_size = default_world if options.world_size is None else options.world_size
        num_classes = options.num_classes
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if num_classes < world_size:
            raise ValueError(f"num_classes ({num_classes!r}) must be >= world size ({world_size}): one class per rank")

        self.embedding_size = options.embedding_size
        self._num_classes = num_classes
        self.sample_rates = options.sample_rate  # one rate, or the schedule of (epoch, rate) points
        self.sample_rate = sample_rate_at(self.sample_rates, 0)
        self.dp_average = options.dp_average
        self.update: HeadUpdate = options.update
        self.lazy_sync_every = options.lazy_sync_every
        self._row_sync: RowSync | None = None
        self.rank = rank
        self.world_size = world_size
        self.margin = (MarginSettings() if settings is None else settings).margin()

        per_rank, remainder = divmod(num_classes, world_size)
        self._num_local = per_rank + int(rank < remainder)
        self._class_start = per_rank * rank + min(rank, remainder)
        self.weight = nn.Parameter(torch.empty(self._num_local, *self.center_shape(self.embedding_size)))
        # The rows the last forward scored when it sampled (rank-local, for tests and logging); None: all of them.
        self.last_sampled_index: Tensor | None = None
        self.register_state()
        self.reset_parameters()

    def register_state(self) -> None:
        """Register the buffers named in `row_buffers` / `global_buffers` (heads that keep state override this; their
        plain hyperparameters are set before `PartialFC.__init__`, which calls this, then `reset_parameters`)."""

    def reset_parameters(self, seed: int | None = None) -> None:
        """normal(0, 0.01). Without `seed`, from the global RNG (seed ranks differently to get different shards).

        With `seed`, rows are drawn in fixed chunks of classes, each chunk from its own generator seeded by
        (seed, chunk), and this rank keeps its rows: a class's initial center does not depend on the number of
        ranks, so a 2-process run starts from exactly the weights of a 1-process run (and a resharded resume
        of an untrained head is consistent). At most two partial chunks are drawn beyond this rank's rows.
        """
        self.reset_state(seed)
        if seed is None:
            nn.init.normal_(self.weight, mean=0.0, std=0.01)
            return
        chunk = 1 << 14
        rows = self.weight.shape[0]
        rest = self.weight.shape[1:]  # (E,), or (K, E) for sub-centers: a class's whole row is drawn at once
        start = self._class_start
        with torch.no_grad():
            for c in range(start // chunk, (start + rows - 1) // chunk + 1 if rows else 0):
                generator = torch.Generator().manual_seed(seed * 7919 + c)
                block = torch.empty(chunk, *rest).normal_(0.0, 0.01, generator=generator)
                lo, hi = max(start, c * chunk), min(start + rows, (c + 1) * chunk)
                self.weight[lo - start : hi - start].copy_(block[lo - c * chunk : hi - c * chunk])

    def reset_state(self, seed: int | None) -> None:
        """Reset running statistics and per-class buffers (heads that keep some override this)."""

    def center_shape(self, embedding_size: int) -> tuple[int, ...]:
        """One class's row of `weight` (sub-center ArcFace: (K, E))."""
        return (embedding_size,)

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
        """The class centers and any per-class buffer (class as dim 0); what checkpoints shard and reshard."""
        return {"weight": self.weight, **{name: getattr(self, name) for name in self.row_buffers}}

    def global_tensors(self) -> dict[str, Tensor]:
        """Running statistics, identical on every rank (none for the stateless combined margin)."""
        return {name: getattr(self, name) for name in self.global_buffers}

    def load_global_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != set(self.global_buffers):
            raise ValueError(
                f"{type(self).__name__} keeps global state {sorted(self.global_buffers)}, got {sorted(tensors)}"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(self, name).copy_(tensor)

    def start_epoch(self, epoch: int) -> None:
        """The sample rate of `epoch` (`head.sample_rate` as a schedule); at a switch, a lazily updated table is
        caught up first (every center current, as `dense` would have it). Heads that change with the epoch
        (sub-center ArcFace) extend this."""
        rate = sample_rate_at(self.sample_rates, epoch)
        if rate != self.sample_rate:
            if self._row_sync is not None:
                self._row_sync(None)
            logger.info("head.sample_rate: %g from epoch %d (was %g)", rate, epoch, self.sample_rate)
            self.sample_rate = rate

    def set_row_sync(self, sync: RowSync | None) -> None:
        """`sync(index)` is called in forward before the rows `index` (None: all) are read (`head.update: lazy`)."""
        self._row_sync = sync

    @property
    def row_gradient(self) -> Gradient:
        """What the table's gradient is when rows are sampled: "dense" (table-sized) or "sparse" (sampled rows)."""
        return "dense" if self.update == "dense" else "sparse"

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

            index: Tensor | None = None
            if self.sample_rate < 1.0:
                index, local_labels_global_batch = self._sample_centers(local_labels_global_batch)
            self.last_sampled_index = index
            if self._row_sync is not None:
                self._row_sync(index)  # lazy update: the rows read below must be up to date first

            cos_theta = self.cosine(F.normalize(embeddings), index, local_labels_global_batch)
            logits = self.logits(cos_theta, local_labels_global_batch, embeddings)
            loss = distributed_softmax_cross_entropy(logits, local_labels_global_batch)
            extra = self.extra_loss(embeddings)
            return loss if extra is None else loss + extra

    # Hooks of the heads built on this one (each is called once per forward, on every rank, in this order).

    def cosine(self, unit_embeddings: Tensor, index: Tensor | None, labels: Tensor) -> Tensor:
        """Cosines (N, C_scored) of the gathered unit embeddings with this rank's scored centers: all of them, or the
        sampled rows ``index``. ``labels``: each row's column here, or -1."""
        # No normalized copy of the table; unsampled rows get exact zeros (dense) or no gradient (sparse).
        return center_cosine(unit_embeddings, self.weight, index, self.row_gradient)

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """Scaled, margined logits from the cosines; ``embeddings`` are the gathered ones, not normalized."""
        # The logits go to the cross-entropy alone, whose backward hands over its buffer: reused in place.
        return self.margin(cos_theta, labels, reuse_grad=True)

    def extra_loss(self, embeddings: Tensor) -> Tensor | None:
        """A term added to the loss (MagFace's regularizer); identical on every rank. None: nothing."""
        return None

    def global_target_cosine(self, cos_theta: Tensor, labels: Tensor) -> Tensor:
        """Every gathered row's target cosine (N,), without gradient, identical on every rank: only the rank holding
        the row's class knows it, the others add zeros (a collective)."""
        if cos_theta.shape[1] == 0:
            own = cos_theta.new_zeros(labels.shape[0])
        else:
            own = cos_theta.detach().gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
            own = torch.where(labels >= 0, own, 0.0)
        return all_reduce_sum_no_grad(own)

    def own_rows(self, gathered: Tensor) -> Tensor:
        """This rank's rows of a tensor computed from the gathered batch (rank-major, equal batch per rank)."""
        per_rank = gathered.shape[0] // self.world_size
        return gathered[self.rank * per_rank : (self.rank + 1) * per_rank]

    def extra_repr(self) -> str:
        info: dict[str, Any] = {
            "embedding_size": self.embedding_size,
            **self.shard_info(),
            "sample_rate": self.sample_rate,
            "dp_average": self.dp_average,
            "update": self.update,
            "lazy_sync_every": self.lazy_sync_every,
        }
        return ", ".join(f"{key}={value}" for key, value in info.items())
