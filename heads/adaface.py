"""AdaFace (Kim, Jain and Liu, CVPR 2022) through Partial FC: a margin adapted to the feature norm."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from heads.partial_fc import PartialFC

NORM_MIN, NORM_MAX = 1e-3, 100.0  # the official clip of the feature norm
EPS = 1e-3  # the official clamp of cosines and angles, and the std's offset


class AdaFacePartialFC(PartialFC):
    """AdaFace's target logit, with the norm statistics of the global batch.

    Per gathered row i, with n_i = clip(||x_i||, 1e-3, 100) (no gradient: the norm steers the margin, it is not
    trained by it), the running mean and std are first updated (EMA weight ``t_alpha``, as the official code: before
    use) with the mean and unbiased std of all n over the global batch, then

        ms_i = clip(h * (n_i - mean) / (std + 1e-3), -1, 1)
        target = s * [cos(clip(theta_y - m * ms_i, 1e-3, pi - 1e-3)) - (m + m * ms_i)]

    and ``s * cos`` elsewhere, every cosine clamped to +-(1 - 1e-3) first. A high-norm (high-quality) sample gets the
    angular margin, a low-norm one the additive margin. ``batch_mean`` / ``batch_std`` (initially 20 and 100, as the
    official buffers) are global state: every rank computes them from the same gathered norms. The official head is
    fed one GPU's batch under DDP, so its statistics are per GPU; here they are the global batch's, whatever the
    number of ranks. The global batch must hold at least 2 samples (an unbiased std).
    """

    global_buffers = ("batch_mean", "batch_std")
    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        sample_rate: float = 1.0,
        dp_average: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        update: str = "dense",
    ) -> None:
        self.s, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        super().__init__(embedding_size, num_classes, None, sample_rate, dp_average, rank, world_size, update)

    def register_state(self) -> None:
        self.register_buffer("batch_mean", torch.zeros(()))
        self.register_buffer("batch_std", torch.zeros(()))

    def reset_state(self, seed: int | None) -> None:
        self.batch_mean.fill_(20.0)
        self.batch_std.fill_(100.0)

    def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        if embeddings.shape[0] < 2:
            raise ValueError("AdaFace needs a global batch of at least 2 samples (its norm std is unbiased)")
        with torch.no_grad():
            norms = embeddings.norm(dim=1).clamp(NORM_MIN, NORM_MAX)
            alpha = self.t_alpha
            # Every rank holds the same gathered norms, so the same statistics: no collective needed.
            self.batch_mean.mul_(1 - alpha).add_(alpha * norms.mean().to(self.batch_mean.dtype))
            self.batch_std.mul_(1 - alpha).add_(alpha * norms.std().to(self.batch_std.dtype))
            scaler = ((norms - self.batch_mean) / (self.batch_std + EPS) * self.h).clamp(-1.0, 1.0)
        cos_theta = cos_theta.clamp(-1.0 + EPS, 1.0 - EPS)
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        column = labels.clamp_min(0).unsqueeze(1)
        cos_target = cos_theta.gather(1, column).squeeze(1)
        theta = torch.arccos(cos_target) - self.m * scaler
        target = torch.cos(theta.clamp(EPS, math.pi - EPS)) - (self.m + self.m * scaler)
        target = torch.where(labels >= 0, target, cos_target)
        return cos_theta.scatter(1, column, target.unsqueeze(1)) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
