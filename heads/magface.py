"""MagFace (Meng et al., CVPR 2021) through Partial FC: a margin that grows with the feature magnitude."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from heads.distributed import all_reduce_sum_no_grad
from heads.partial_fc import PartialFC


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

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        sample_rate: float = 1.0,
        dp_average: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        update: str = "dense",
    ) -> None:
        if not 0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a!r}, u_a={u_a!r}")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = float(s), float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g, self.easy_margin = float(lambda_g), bool(easy_margin)
        super().__init__(embedding_size, num_classes, None, sample_rate, dp_average, rank, world_size, update)

    def magnitude(self, embeddings: Tensor) -> Tensor:
        """a = clamp(||x||, l_a, u_a), differentiable inside the range."""
        return embeddings.norm(dim=1).clamp(self.l_a, self.u_a)

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        a = self.magnitude(embeddings)
        m = self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)
        column = labels.clamp_min(0).unsqueeze(1)
        cos_target = cos_theta.gather(1, column).squeeze(1)
        eps = torch.finfo(cos_theta.dtype).eps
        # arccos is clamped off +-1, where its derivative is infinite (zero gradient from the margin there).
        margined = torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + m)
        if self.easy_margin:
            target = torch.where(cos_target > 0, margined, cos_target)
        else:
            target = torch.where(cos_target > torch.cos(math.pi - m), margined, cos_target - m * torch.sin(math.pi - m))
        target = torch.where(labels >= 0, target, cos_target)
        return cos_theta.scatter(1, column, target.unsqueeze(1)) * self.s

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
