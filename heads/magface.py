"""MagFace (Meng et al., CVPR 2021) through Partial FC: a margin that grows with the feature magnitude."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from heads.base import PartialFCOptions
from heads.distributed import all_reduce_sum_no_grad
from heads.margins import margin_logits
from heads.partial_fc import PartialFC, ScaleSettings, require_finite
from heads.registry import register_head
from models.recipe import key


@dataclass
class MagFaceSettings(ScaleSettings):
    """`magface` (Meng et al. 2021): a margin linear in the feature magnitude a in [l_a, u_a], from l_m to u_m."""

    magface_l_a: float = key(10.0, help="lowest feature magnitude the margin follows")
    magface_u_a: float = key(110.0, help="highest feature magnitude the margin follows")
    magface_l_m: float = key(0.45, help="margin at magnitude magface_l_a")
    magface_u_m: float = key(0.8, help="margin at magnitude magface_u_a")
    # The paper's; MagFace's trainer.py uses 20.
    magface_lambda_g: float = key(35.0, help="weight of the magnitude regularizer")
    magface_easy_margin: bool = key(True, help="margin only where cos(theta_y) > 0, as MagFace's code")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_finite(self, "magface_l_a", "magface_u_a", "magface_l_m", "magface_u_m", "magface_lambda_g")
        if not 0.0 < self.magface_l_a < self.magface_u_a:
            raise ValueError(f"magface_l_a must be in (0, magface_u_a={self.magface_u_a}), got {self.magface_l_a}")
        if not 0.0 <= self.magface_l_m <= self.magface_u_m < math.pi / 2:
            raise ValueError(
                f"magface_l_m must be in [0, magface_u_m] and magface_u_m below pi/2, got {self.magface_l_m} and "
                f"{self.magface_u_m}"
            )
        if self.magface_lambda_g < 0:
            raise ValueError(f"magface_lambda_g must be >= 0, got {self.magface_lambda_g}")


@register_head("magface", settings=MagFaceSettings)
class MagFacePartialFC(PartialFC):
    """MagFace's loss: cross-entropy with a magnitude-dependent ArcFace margin, plus the magnitude regularizer.

    Per gathered row i, a_i = clamp(||x_i||, l_a, u_a) **with** gradient (the backbone's output must reach the head
    un-normalized: the magnitude is what is trained), the margin m(a) = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a),
    and the target logit s*cos(theta_y + m(a_i)): with ``easy_margin`` (MagFace's default) only where
    cos(theta_y) > 0, else s*cos(theta_y); without it, ArcFace's fallback cos(theta_y) - m(a)*sin(pi - m(a)) past
    cos(pi - m(a)). The loss adds lambda_g * mean_i g(a_i), g(a) = a / u_a^2 + 1 / a, over the global batch.

    The regularizer of a row is differentiated on the rank that owns the row only (its slice of the gathered batch),
    so the all-gather's backward, which sums every rank's gradient for every row, counts it once; its value is then
    summed over ranks (a collective) so that every rank returns the same loss.
    """

    def __init__(self, options: PartialFCOptions, settings: MagFaceSettings) -> None:
        self.s, self.l_a, self.u_a = settings.s, settings.magface_l_a, settings.magface_u_a
        self.l_m, self.u_m = settings.magface_l_m, settings.magface_u_m
        self.lambda_g, self.easy_margin = settings.magface_lambda_g, settings.magface_easy_margin
        super().__init__(options)

    def magnitude(self, embeddings: Tensor) -> Tensor:
        """a = clamp(||x||, l_a, u_a), differentiable inside the range."""
        return embeddings.norm(dim=1).clamp(self.l_a, self.u_a)

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        a = self.magnitude(embeddings)
        # The margin of each row, with gradient: `margin_logits` differentiates the targets through it.
        margin = (self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)).unsqueeze(1)
        easy_margin = self.easy_margin

        def targets(cos_target: Tensor, m: Tensor) -> Tensor:
            eps = torch.finfo(cos_target.dtype).eps
            # arccos is clamped off +-1, where its derivative is infinite (zero gradient from the margin there).
            margined = torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + m)
            if easy_margin:
                return torch.where(cos_target > 0, margined, cos_target)
            fallback = cos_target - m * torch.sin(math.pi - m)
            return torch.where(cos_target > torch.cos(math.pi - m), margined, fallback)

        column = labels.clamp_min(0).unsqueeze(1)
        return margin_logits(cos_theta, column, self.s, targets, labels >= 0, extra=(margin,), reuse_grad=True)

    def extra_loss(self, embeddings: Tensor) -> Tensor:
        a = self.own_rows(self.magnitude(embeddings))
        mine = self.lambda_g * (a / self.u_a**2 + 1.0 / a).sum() / embeddings.shape[0]
        # Value: the whole global batch's (every rank's share); gradient: this rank's rows only.
        return mine + (all_reduce_sum_no_grad(mine) - mine.detach())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
            f"lambda_g={self.lambda_g}, easy_margin={self.easy_margin}"
        )
