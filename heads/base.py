"""The head contract: what the trainer, checkpoints and resharding rely on, and nothing more.

A head turns this rank's embeddings (N, E) and labels (N,) into the global batch's loss (a scalar, identical on
every rank). Its class centers are sharded by class: rank r holds the contiguous range
[class_start, class_start + num_local) of the num_classes classes. A new head is one file in `heads/`: its class,
its settings dataclass and a `@register_head("name", settings=...)` line (docs/architecture.md, "A new head is one
file"); the trainer never names a head's class or its constructor arguments.

How a head is built: `heads.build_head` calls the registered class as `cls(options=PartialFCOptions(...),
settings=<its settings>)`. `PartialFCOptions` (below) is what every head shares (shape, shard, sampling, how the
centers move); the settings are the head's own recipe keys.

State, and how it survives a checkpoint and a resume on another number of ranks:

* **Row state** (`row_tensors()`): every `nn.Parameter` of the head and any per-class buffer, each with the class
  as dim 0 (`num_local` rows on this rank; further dims are free, e.g. K sub-centers per class as (num_local, K, E)).
  Checkpoints write each rank's rows with its `shard_info()`; a resume on W' ranks copies each rank's class range
  out of the shards that overlap it. The optimizer state of the parameters is resharded the same way.
* **Global state** (`global_tensors()` / `load_global_tensors()`): running statistics that every rank holds
  identically (AdaFace's norm EMA, CurricularFace's t). Saved once, restored on every rank whatever the world size.
  A head must keep them identical across ranks itself (compute them from the gathered global batch, or all-reduce).
* **Randomness** comes from the global torch RNG (or a generator derived from the trainer's seed and step), which
  the checkpoint saves per rank: a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor, nn

# How the centers move when sample_rate < 1 (`head.update`; README, "Partial FC at millions of classes").
HeadUpdate = Literal["dense", "lazy", "sparse"]
UPDATES: tuple[HeadUpdate, ...] = get_args(HeadUpdate)


# `head.sample_rate`: one rate for the whole run, or a schedule of [epoch, rate] points (the rate from each epoch
# on; the first point at epoch 0), e.g. [[0, 0.1], [18, 1.0]]: Partial FC sampling, then the full softmax (LVFace).
SampleRate = float | Sequence[Sequence[float]]


def sample_rate_at(sample_rate: SampleRate, epoch: int) -> float:
    """The rate in force during `epoch`."""
    if isinstance(sample_rate, int | float):
        return float(sample_rate)
    rate = float(sample_rate[0][1])
    for start, value in sample_rate:
        if epoch >= start:
            rate = float(value)
    return rate


def freeze_sample_rate(sample_rate: SampleRate) -> float | tuple[tuple[int, float], ...]:
    """A rate, or the schedule as a tuple of (epoch, rate) pairs (hashable, for the frozen options)."""
    if isinstance(sample_rate, int | float):
        return float(sample_rate)
    return tuple((int(epoch), float(rate)) for epoch, rate in sample_rate)


def check_sample_rate(sample_rate: SampleRate) -> None:
    """A rate in (0, 1], or [epoch, rate] points: the first at epoch 0, whole epochs increasing, rates in (0, 1]."""
    if isinstance(sample_rate, bool):
        raise ValueError(f"sample_rate must be a number or [epoch, rate] points, got {sample_rate!r}")
    if isinstance(sample_rate, int | float):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        return
    points = [list(point) for point in sample_rate]
    if not points or any(len(point) != 2 for point in points):
        raise ValueError(f"sample_rate must be a number or a list of [epoch, rate] points, got {sample_rate!r}")
    epochs = [point[0] for point in points]
    if (
        epochs[0] != 0
        or any(e != int(e) for e in epochs)
        or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False))
    ):
        raise ValueError(f"sample_rate points must start at epoch 0 with whole, increasing epochs, got {epochs}")
    for _, rate in points:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] at every point, got {rate!r}")


def check_sampling(sample_rate: SampleRate, update: str, lazy_sync_every: int) -> None:
    """The checks of the keys every head shares (the recipe's and `PartialFCOptions`'): "<key> must ..."."""
    check_sample_rate(sample_rate)
    if update not in UPDATES:
        raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
    if lazy_sync_every < 1:
        raise ValueError(f"lazy_sync_every must be >= 1, got {lazy_sync_every!r}")


@dataclass(frozen=True)
class PartialFCOptions:
    """What every head shares, given once to its constructor: the class table's shape and this rank's shard of it,
    how many centers a step scores and how they move.

    ``rank`` / ``world_size``: None takes the process group's (one process without one). ``sample_rate``: the
    fraction of this rank's centers scored each step (every positive, plus random negatives), or a schedule of
    (epoch, rate) points, the rate from each epoch on (`sample_rate_at`). ``update``: how they
    move when sampled (`heads.partial_fc.PartialFC`); ``lazy_sync_every``: with ``lazy``, the optimizer's steps
    between catching every center up (the head owns its update mode, the optimizer reads both from it).
    ``dp_average``: the backbone gradient, after DDP/ZeRO averaging, is one process's on the global batch
    (`heads.distributed.all_gather_with_grad`).
    """

    embedding_size: int
    num_classes: int
    rank: int | None = None
    world_size: int | None = None
    sample_rate: float | tuple[tuple[int, float], ...] = 1.0
    update: HeadUpdate = "dense"
    lazy_sync_every: int = 100
    dp_average: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", freeze_sample_rate(self.sample_rate))
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {self.embedding_size!r}")
        check_sampling(self.sample_rate, self.update, self.lazy_sync_every)


@runtime_checkable
class Head(Protocol):
    """What every registered head provides (PartialFC is the reference implementation)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def num_local(self) -> int:
        """Class centers on this rank."""
        ...

    @property
    def class_start(self) -> int:
        """Global id of this rank's first class."""
        ...

    def __call__(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """The global batch's mean loss; every rank must call it at the same step with the same batch size."""
        ...

    def shard_info(self) -> dict[str, int]:
        """class_start, num_local, num_classes, rank, world_size: what a checkpoint shard records."""
        ...

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialize; with `seed`, a class's initial center must not depend on the number of ranks."""
        ...

    def row_tensors(self) -> dict[str, Tensor]:
        """Per-class state by name (parameters included), class as dim 0."""
        ...

    def global_tensors(self) -> dict[str, Tensor]:
        """State identical on every rank (running statistics); empty for a stateless head."""
        ...

    def load_global_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what `global_tensors` returned."""
        ...

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (e.g. sub-center ArcFace drops sub-centers)."""
        ...

    # How the centers move (`head.update`): "dense", or "lazy" / "sparse" (a sparse gradient of the scored rows,
    # for trainer.row_sgd.RowSGD, which then registers its catch-up here: forward calls it with the rows it is
    # about to read, None meaning all). Only `weight` is trained in the row-wise modes. The optimizer reads the
    # mode and, for lazy, the steps between full catch-ups from the head (`PartialFCOptions`).
    update: HeadUpdate
    lazy_sync_every: int
    sample_rate: float  # the rate in force (a schedule's: set by start_epoch)

    def set_row_sync(self, sync: Callable[[Tensor | None], None] | None) -> None: ...

    # nn.Module's own, which the optimizer, the guard and checkpoints use.
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]: ...

    def to(
        self, device: str | torch.device | int | None = ..., dtype: torch.dtype | None = ..., non_blocking: bool = ...
    ) -> Any: ...
