"""ElasticFace (Boutros et al., CVPRW 2022) through Partial FC: a random margin per sample, drawn from N(m, std)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from heads.base import PartialFCOptions
from heads.margins import margin_logits
from heads.partial_fc import PartialFC, ScaleSettings, require_finite
from heads.registry import register_head
from models.recipe import key

ElasticKind = Literal["arc", "cos"]
PlusPairing = Literal["sorted", "official"]
PAPER_M = {"arc": 0.5, "cos": 0.35}
PAPER_STD = {("arc", False): 0.05, ("cos", False): 0.05, ("arc", True): 0.0175, ("cos", True): 0.02}


def margin_generator(seed: int, draw: int) -> torch.Generator:
    """The CPU generator of the `draw`-th step's margins: a function of (seed, draw) alone, so every rank draws the
    same margins, and a resumed run (which restores `draw`) the margins the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + draw) % 2**63)


@dataclass
class ElasticFaceSettings(ScaleSettings):
    """`elasticface_arc` / `_cos` and their "+" variants (Boutros et al. 2022): a margin per sample from N(m, std).

    None = the paper's: m 0.5 (Arc), 0.35 (Cos); std 0.05 (Arc, Cos), 0.0175 (Arc+), 0.02 (Cos+).
    """

    elastic_m: float | None = key(None, help="mean margin (none: the paper's for the variant)")
    elastic_std: float | None = key(None, help="standard deviation of the margins (none: the paper's)")
    # "+": `sorted` gives the sample closest to its center the smallest margin (the pairing the official code's two
    # sorts describe); `official` repeats that code's indexing, which pairs them by neither order.
    elastic_plus_pairing: PlusPairing = key(
        "sorted", help="the + variants: sorted (closest sample, smallest margin) or the official code's indexing"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_finite(self, "elastic_m", "elastic_std")
        if self.elastic_m is not None and not 0.0 <= self.elastic_m < math.pi / 2:
            raise ValueError(f"elastic_m must be in [0, pi/2), got {self.elastic_m}")
        if self.elastic_std is not None and self.elastic_std < 0:
            raise ValueError(f"elastic_std must be >= 0, got {self.elastic_std}")
        if self.elastic_plus_pairing not in ("sorted", "official"):
            raise ValueError(f"elastic_plus_pairing must be 'sorted' or 'official', got {self.elastic_plus_pairing!r}")


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

    The four variants are the subclasses below, one registered head each; ``kind`` and ``plus`` are theirs.
    """

    kind: ClassVar[ElasticKind]
    plus: ClassVar[bool]

    global_buffers = ("margin_draws",)
    margin_draws: Tensor

    def __init__(self, options: PartialFCOptions, settings: ElasticFaceSettings) -> None:
        self.plus_pairing = settings.elastic_plus_pairing
        self.s = settings.s
        self.m = PAPER_M[self.kind] if settings.elastic_m is None else settings.elastic_m
        self.std = PAPER_STD[(self.kind, self.plus)] if settings.elastic_std is None else settings.elastic_std
        self.seed = 0
        super().__init__(options)

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
        margins = margins.unsqueeze(1)
        kind = self.kind

        def targets(cos_target: Tensor) -> Tensor:
            if kind == "cos":
                return cos_target - margins
            eps = torch.finfo(cos_target.dtype).eps
            return torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + margins)

        column = labels.clamp_min(0).unsqueeze(1)
        return margin_logits(cos_theta, column, self.s, targets, labels >= 0, reuse_grad=True)

    def extra_repr(self) -> str:
        plus = f", plus ({self.plus_pairing})" if self.plus else ""
        return f"{super().extra_repr()}, kind={self.kind}{plus}, s={self.s}, m={self.m}, std={self.std}"


@register_head("elasticface_arc", settings=ElasticFaceSettings)
class ElasticFaceArc(ElasticFacePartialFC):
    """ElasticFace-Arc: target s*cos(theta_y + m_i)."""

    kind, plus = "arc", False


@register_head("elasticface_cos", settings=ElasticFaceSettings)
class ElasticFaceCos(ElasticFacePartialFC):
    """ElasticFace-Cos: target s*(cos(theta_y) - m_i)."""

    kind, plus = "cos", False


@register_head("elasticface_arc_plus", settings=ElasticFaceSettings)
class ElasticFaceArcPlus(ElasticFacePartialFC):
    """ElasticFace-Arc+: ElasticFace-Arc with the margins paired to the samples by their target cosine."""

    kind, plus = "arc", True


@register_head("elasticface_cos_plus", settings=ElasticFaceSettings)
class ElasticFaceCosPlus(ElasticFacePartialFC):
    """ElasticFace-Cos+: ElasticFace-Cos with the margins paired to the samples by their target cosine."""

    kind, plus = "cos", True
