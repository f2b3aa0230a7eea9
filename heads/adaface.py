"""AdaFace (Kim, Jain and Liu, CVPR 2022) through Partial FC: a margin adapted to the feature norm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from heads.base import PartialFCOptions
from heads.margins import margin_logits
from heads.partial_fc import PartialFC, ScaleSettings, require_finite
from heads.registry import register_head
from models.recipe import key

NORM_MIN, NORM_MAX = 1e-3, 100.0  # the official clip of the feature norm
EPS = 1e-3  # the official clamp of cosines and angles, and the std's offset


@dataclass
class AdaFaceSettings(ScaleSettings):
    """`adaface` (Kim et al. 2022): a margin adapted to the feature norm, normalized by the batch's norm statistics."""

    adaface_m: float = key(0.4, help="AdaFace's margin")
    adaface_h: float = key(0.333, help="how far the norm moves the margin (0 = CosFace with adaface_m)")
    adaface_t_alpha: float = key(0.01, help="EMA weight of the new global batch's norm mean and std")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_finite(self, "adaface_m", "adaface_h", "adaface_t_alpha")
        if not 0.0 <= self.adaface_m < math.pi / 2:
            raise ValueError(f"adaface_m must be in [0, pi/2), got {self.adaface_m}")
        if self.adaface_h < 0:
            raise ValueError(f"adaface_h must be >= 0, got {self.adaface_h}")
        if not 0.0 < self.adaface_t_alpha <= 1.0:
            raise ValueError(f"adaface_t_alpha must be in (0, 1], got {self.adaface_t_alpha}")


class ClampCosine:
    """The non-target logits' map of AdaFace: the cosine clamped to [-1 + eps, 1 - eps] (zero gradient past it, as
    `Tensor.clamp`): a `heads.margins.NonTargetLogits`."""

    def __init__(self, eps: float) -> None:
        self.low, self.high = -1.0 + eps, 1.0 - eps

    def apply_(self, out: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        torch.clamp(cos, self.low, self.high, out=out)

    def scale_grad_(self, grad: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        if cos.device.type == "cpu":  # (a host sync elsewhere: there the mask below is one more cheap pass)
            lowest, highest = torch.aminmax(cos)
            if lowest >= self.low and highest <= self.high:
                return  # nothing was clamped in these rows, as almost always: f' = 1
        # 1 where the cosine was clamped (|cos| > 1 - eps), else 0, in float ops: about twice as fast on a CPU as
        # comparisons and a boolean mask.
        clamped = torch.abs(cos, out=scratch[0]).sub_(self.high).clamp_min_(0.0).sign_()
        grad.addcmul_(grad, clamped, value=-1.0)


@register_head("adaface", settings=AdaFaceSettings)
class AdaFacePartialFC(PartialFC):
    """AdaFace's target logit, with the norm statistics of the global batch.

    Per gathered row i, with n_i = clip(||x_i||, 1e-3, 100) (no gradient: the norm steers the margin, it is not
    trained by it), the running mean and std are first updated (EMA weight t_alpha = ``adaface_t_alpha``, as the
    official code: before use) with the mean and unbiased std of all n over the global batch, then

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

    def __init__(self, options: PartialFCOptions, settings: AdaFaceSettings) -> None:
        self.s, self.m, self.h = settings.s, settings.adaface_m, settings.adaface_h
        self.t_alpha = settings.adaface_t_alpha
        super().__init__(options)

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
        if cos_theta.shape[1] == 0:
            return cos_theta * self.s
        m = self.m

        def targets(cos_target: Tensor) -> Tensor:
            theta = torch.arccos(cos_target.clamp(-1.0 + EPS, 1.0 - EPS)) - m * scaler.unsqueeze(1)
            return torch.cos(theta.clamp(EPS, math.pi - EPS)) - (m + m * scaler.unsqueeze(1))

        # Every cosine is clamped to +-(1 - 1e-3) (the official code's clamp), the targets' inside `targets`.
        column = labels.clamp_min(0).unsqueeze(1)
        return margin_logits(cos_theta, column, self.s, targets, labels >= 0, ClampCosine(EPS), reuse_grad=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
