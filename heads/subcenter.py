"""Sub-center ArcFace (Deng et al., ECCV 2020) through Partial FC: K centers per class, a class scores its closest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.base import PartialFCOptions
from heads.partial_fc import MarginSettings, PartialFC
from heads.registry import register_head
from heads.rows import best_center_cosine
from models.recipe import key


@dataclass
class SubCenterSettings(MarginSettings):
    """`subcenter_arcface` (Deng et al. 2020): the combined margin's keys, plus K sub-centers per class."""

    num_subcenters: int = key(3, help="sub-centers per class (K); a class scores its closest one", structural=True)
    # From this epoch on each class keeps only its dominant sub-center (the one that won the most of its samples
    # during the previous epoch).
    subcenter_drop_epoch: int = key(0, help="> 0: from this epoch on keep each class's dominant sub-center (0 = all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_subcenters < 1:
            raise ValueError(f"num_subcenters must be >= 1, got {self.num_subcenters}")
        if self.subcenter_drop_epoch < 0:
            raise ValueError(f"subcenter_drop_epoch must be >= 0 (0 = never), got {self.subcenter_drop_epoch}")


@register_head("subcenter_arcface", settings=SubCenterSettings)
class SubCenterPartialFC(PartialFC):
    """K sub-centers per class; a row's cosine with a class is the max over the class's sub-centers, then the
    combined margin (`MarginSoftmax`, ArcFace by default) on the target, as insightface's `subcenter_arcface`.

    ``weight`` is (num_local, K, E): class-major, so checkpoints shard and reshard it by class like any center table
    (insightface's flat layout is the same memory, rows c*K ... c*K + K - 1).

    Dropping (``subcenter_drop_epoch`` > 0): during each epoch, ``subcenter_hits`` (num_local, K) counts, per
    class, which sub-center won each of the class's samples (counted over the global batch, so the same on any number
    of ranks). At the start of epoch ``subcenter_drop_epoch`` (`start_epoch`) each class keeps only its dominant
    sub-center, the one with the most wins in the previous epoch (the lowest index on a tie, 0 for a class never
    seen), and the others are masked out of the max for the rest of training (``subcenter_active``,
    (num_local, K)); their rows stay in ``weight`` (the table keeps its shape, and so do checkpoints and optimizer
    state) but get zero gradient. The official pipeline then also drops the training images far from their dominant
    center and retrains; that data cleaning is not done here.
    """

    row_buffers = ("subcenter_hits", "subcenter_active")
    # The epoch whose wins `subcenter_hits` counts: `start_epoch` is idempotent for it, so calling it again after a
    # resume in the middle of that epoch keeps the counts.
    global_buffers = ("hits_epoch",)
    subcenter_hits: Tensor
    subcenter_active: Tensor
    hits_epoch: Tensor

    def __init__(self, options: PartialFCOptions, settings: SubCenterSettings) -> None:
        # Plain attributes before nn.Module.__init__: PartialFC.__init__ needs them (center_shape, register_state).
        self.num_subcenters = settings.num_subcenters
        self.drop_epoch = settings.subcenter_drop_epoch
        super().__init__(options, settings)

    def center_shape(self, embedding_size: int) -> tuple[int, ...]:
        return (self.num_subcenters, embedding_size)

    def register_state(self) -> None:
        k = self.num_subcenters
        self.register_buffer("subcenter_hits", torch.zeros(self.num_local, k, dtype=torch.int64))
        self.register_buffer("subcenter_active", torch.ones(self.num_local, k, dtype=torch.bool))
        self.register_buffer("hits_epoch", torch.zeros((), dtype=torch.int64))

    def reset_state(self, seed: int | None) -> None:
        self.subcenter_hits.zero_()
        self.subcenter_active.fill_(True)
        self.hits_epoch.zero_()

    def start_epoch(self, epoch: int) -> None:
        """At a new epoch: drop the non-dominant sub-centers if it is time (idempotent), then count afresh."""
        super().start_epoch(epoch)  # the sample rate of this epoch
        if epoch == int(self.hits_epoch):
            return  # the same epoch again (a resume inside it): keep counting
        with torch.no_grad():
            if self.drop_epoch and epoch >= self.drop_epoch:
                # Among the active sub-centers only: once dropped, the survivor stays the dominant one.
                hits = torch.where(self.subcenter_active, self.subcenter_hits, -1)
                dominant = hits.argmax(dim=1)  # first maximum on ties
                self.subcenter_active.copy_(F.one_hot(dominant, self.num_subcenters).bool())
            self.subcenter_hits.zero_()
            self.hits_epoch.fill_(epoch)

    def cosine(self, unit_embeddings: Tensor, index: Tensor | None, labels: Tensor) -> Tensor:
        active = self.subcenter_active if index is None else self.subcenter_active[index]
        # (N, C): every row against each class's best active sub-center, the gradient to the winner only; computed
        # chunk by chunk of classes, never as (N, C, K) (heads.rows.best_center_cosine).
        cos_theta, winner = best_center_cosine(unit_embeddings, self.weight, index, self.row_gradient, active)
        with torch.no_grad():
            rows = labels >= 0
            columns = labels[rows]
            classes = columns if index is None else index[columns]
            won = winner[rows, columns].long()
            self.subcenter_hits.index_put_((classes, won), torch.ones_like(classes), accumulate=True)
        return cos_theta
