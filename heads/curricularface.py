"""CurricularFace (Huang et al., CVPR 2020) through Partial FC: hard negatives weighted by a running curriculum t."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from heads.partial_fc import PartialFC


class CurricularFacePartialFC(PartialFC):
    """CurricularFace's logits, with one running ``t`` for all ranks.

    Per step, t <- t_alpha * mean(cos(theta_y)) + (1 - t_alpha) * t over the **global** batch, before use (no
    gradient). The target logit is ArcFace's with the official fallback, s*cos(theta_y + m) while
    cos(theta_y) > cos(pi - m), else s*(cos(theta_y) - m*sin(pi - m)); a negative j is hard when
    cos(theta_j) > cos(theta_y + m), and its logit becomes s*cos(theta_j)*(t + cos(theta_j)) (gradient through both
    factors), the others stay s*cos(theta_j).

    A row's target cosine lives on one rank only; every rank needs it (for t and for the hard-negative threshold of
    its own columns), so it is all-reduced (a collective, N numbers). ``t`` is global state: every rank computes it
    from the same numbers. The official code, fed one GPU's batch under DDP, lets t follow rank 0's batch instead.
    """

    global_buffers = ("t",)
    t: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        t_alpha: float = 0.01,
        sample_rate: float = 1.0,
        dp_average: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        update: str = "dense",
    ) -> None:
        self.s, self.m, self.t_alpha = float(s), float(m), float(t_alpha)
        super().__init__(embedding_size, num_classes, None, sample_rate, dp_average, rank, world_size, update)

    def register_state(self) -> None:
        self.register_buffer("t", torch.zeros(()))

    def reset_state(self, seed: int | None) -> None:
        self.t.zero_()

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        cos_y = self.global_target_cosine(cos_theta, labels)  # collective: before any early return
        with torch.no_grad():
            self.t.mul_(1 - self.t_alpha).add_(self.t_alpha * cos_y.mean().to(self.t.dtype))
            # cos(theta_y + m) without arccos: exact for every theta_y in [0, pi].
            sin_y = (1.0 - cos_y * cos_y).clamp_min(0).sqrt()
            hard_threshold = cos_y * math.cos(self.m) - sin_y * math.sin(self.m)
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        t = self.t.to(cos_theta.dtype)
        hard = cos_theta.detach() > hard_threshold.unsqueeze(1)
        out = torch.where(hard, cos_theta * (t + cos_theta), cos_theta)

        column = labels.clamp_min(0).unsqueeze(1)
        cos_target = cos_theta.gather(1, column).squeeze(1)
        eps = torch.finfo(cos_theta.dtype).eps
        margined = torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + self.m)
        fallback = cos_target - self.m * math.sin(math.pi - self.m)
        target = torch.where(cos_target > math.cos(math.pi - self.m), margined, fallback)
        # Rows without a target here write back their (possibly hard-negative) value unchanged.
        target = torch.where(labels >= 0, target, out.gather(1, column).squeeze(1))
        return out.scatter(1, column, target.unsqueeze(1)) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, t_alpha={self.t_alpha}"
