"""ElasticFace (Boutros et al., CVPRW 2022) through Partial FC: a random margin per sample, drawn from N(m, std)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from heads.partial_fc import PartialFC

ElasticKind = Literal["arc", "cos"]
PlusPairing = Literal["sorted", "official"]
PAPER_M = {"arc": 0.5, "cos": 0.35}
PAPER_STD = {("arc", False): 0.05, ("cos", False): 0.05, ("arc", True): 0.0175, ("cos", True): 0.02}


def margin_generator(seed: int, draw: int) -> torch.Generator:
    """The CPU generator of the `draw`-th step's margins: a function of (seed, draw) alone, so every rank draws the
    same margins, and a resumed run (which restores `draw`) the margins the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + draw) % 2**63)


class ElasticFacePartialFC(PartialFC):
    """ElasticFace-Arc (target s*cos(theta_y + m_i)) or -Cos (target s*(cos(theta_y) - m_i)), with m_i ~ N(m, std)
    drawn for every sample of the global batch at every step, not clipped, no fallback (as the official code).

    The margins come from `margin_generator(seed, draw)` (seed: the one given to `reset_parameters`, i.e. the
    trainer's; draw: the number of forward passes so far, ``margin_draws``, global state in checkpoints), in the
    order of the gathered batch (rank 0's rows first), so every rank draws the same margin for the same sample.

    ``plus`` (ElasticFace+): the N margins are sorted and paired with the samples by their target cosine (all-reduced
    from the ranks that hold the targets: a collective). ``sorted``: the sample closest to its center gets the
    smallest margin, the farthest the largest: the pairing the official code's two sorts (cosines descending,
    margins ascending) describe. ``official``: that code's own indexing, sample i gets sorted_margins[order[i]]
    (``order`` the descending-cosine permutation, used where its inverse was meant): margins are then not monotone
    in the cosine. Both keep the multiset of margins.
    """

    global_buffers = ("margin_draws",)
    margin_draws: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        kind: ElasticKind = "arc",
        plus: bool = False,
        s: float = 64.0,
        m: float | None = None,
        std: float | None = None,
        plus_pairing: PlusPairing = "sorted",
        sample_rate: float = 1.0,
        dp_average: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        update: str = "dense",
    ) -> None:
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be 'arc' or 'cos', got {kind!r}")
        if plus_pairing not in ("sorted", "official"):
            raise ValueError(f"plus_pairing must be 'sorted' or 'official', got {plus_pairing!r}")
        self.kind, self.plus, self.plus_pairing = kind, bool(plus), plus_pairing
        self.s = float(s)
        self.m = PAPER_M[kind] if m is None else float(m)
        self.std = PAPER_STD[(kind, self.plus)] if std is None else float(std)
        self.seed = 0
        super().__init__(embedding_size, num_classes, None, sample_rate, dp_average, rank, world_size, update)

    def register_state(self) -> None:
        self.register_buffer("margin_draws", torch.zeros((), dtype=torch.int64))

    def reset_state(self, seed: int | None) -> None:
        # Without a seed (an unseeded init) 0: the margins must still agree across ranks.
        self.seed = 0 if seed is None else int(seed)
        self.margin_draws.zero_()

    def draw_margins(self, num_rows: int) -> Tensor:
        """This step's N(m, std) margins for the gathered batch (CPU, float64), advancing ``margin_draws``."""
        generator = margin_generator(self.seed, int(self.margin_draws))
        self.margin_draws.add_(1)
        return torch.randn(num_rows, dtype=torch.float64, generator=generator) * self.std + self.m

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        margins = self.draw_margins(labels.shape[0]).to(cos_theta.device, cos_theta.dtype)
        if self.plus:
            cos_y = self.global_target_cosine(cos_theta, labels)  # collective: before any early return
            order = torch.sort(cos_y, descending=True, stable=True).indices
            ascending = torch.sort(margins, stable=True).values
            if self.plus_pairing == "sorted":
                margins = torch.empty_like(ascending).scatter_(0, order, ascending)
            else:
                margins = ascending[order]
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        column = labels.clamp_min(0).unsqueeze(1)
        cos_target = cos_theta.gather(1, column).squeeze(1)
        if self.kind == "arc":
            eps = torch.finfo(cos_theta.dtype).eps
            target = torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + margins)
        else:
            target = cos_target - margins
        target = torch.where(labels >= 0, target, cos_target)
        return cos_theta.scatter(1, column, target.unsqueeze(1)) * self.s

    def extra_repr(self) -> str:
        plus = f", plus ({self.plus_pairing})" if self.plus else ""
        return f"{super().extra_repr()}, kind={self.kind}{plus}, s={self.s}, m={self.m}, std={self.std}"
