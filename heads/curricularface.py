"""CurricularFace (Huang et al., CVPR 2020) through Partial FC: hard negatives weighted by a running curriculum t."""

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


@dataclass
class CurricularFaceSettings(ScaleSettings):
    """`curricularface` (Huang et al. 2020): hard negatives reweighted by the running mean target cosine t."""

    curricular_m: float = key(0.5, help="CurricularFace's angular margin")
    curricular_t_alpha: float = key(0.01, help="EMA weight of the new global batch's mean target cosine")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_finite(self, "curricular_m", "curricular_t_alpha")
        if not 0.0 <= self.curricular_m < math.pi / 2:
            raise ValueError(f"curricular_m must be in [0, pi/2), got {self.curricular_m}")
        if not 0.0 < self.curricular_t_alpha <= 1.0:
            raise ValueError(f"curricular_t_alpha must be in (0, 1], got {self.curricular_t_alpha}")


class HardNegatives:
    """CurricularFace's non-target logits: a cosine above its row's threshold (a hard negative) becomes
    cos * (t + cos), with gradient t + 2 cos; the others stay cos. A `heads.margins.NonTargetLogits`."""

    def __init__(self, threshold: Tensor, t: Tensor) -> None:
        self.threshold, self.t = threshold.unsqueeze(1), t  # (N, 1) per row; t a 0-d tensor (no host sync)

    # In float ops, h = 1 on a hard negative and 0 elsewhere (c - threshold > 0 exactly where c > threshold):
    # f = c + h c (t + c - 1), grad f' = grad + grad h (2c + t - 1); two to three times as fast on a CPU as
    # comparisons and torch.where.

    def hard(self, cos: Tensor, rows: slice, out: Tensor) -> Tensor:
        return torch.sub(cos, self.threshold[rows], out=out).clamp_min_(0.0).sign_()

    def apply_(self, out: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        hard = self.hard(cos, rows, scratch[0])
        torch.add(cos, self.t - 1.0, out=out).mul_(cos).mul_(hard).add_(cos)

    def scale_grad_(self, grad: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        hard = self.hard(cos, rows, scratch[0])
        slope = torch.add(self.t - 1.0, cos, alpha=2.0, out=scratch[1]).mul_(hard)  # f' - 1
        grad.addcmul_(grad, slope)


@register_head("curricularface", settings=CurricularFaceSettings)
class CurricularFacePartialFC(PartialFC):
    """CurricularFace's logits, with one running ``t`` for all ranks.

    Per step, t <- t_alpha * mean(cos(theta_y)) + (1 - t_alpha) * t (t_alpha: ``curricular_t_alpha``) over the
    **global** batch, before use (no gradient). The target logit is ArcFace's with the official fallback,
    s*cos(theta_y + m) while cos(theta_y) > cos(pi - m), else s*(cos(theta_y) - m*sin(pi - m)); a negative j is hard
    when cos(theta_j) > cos(theta_y + m), and its logit becomes s*cos(theta_j)*(t + cos(theta_j)) (gradient through
    both factors), the others stay s*cos(theta_j).

    A row's target cosine lives on one rank only; every rank needs it (for t and for the hard-negative threshold of
    its own columns), so it is all-reduced (a collective, N numbers). ``t`` is global state: every rank computes it
    from the same numbers. The official code, fed one GPU's batch under DDP, lets t follow rank 0's batch instead.
    """

    global_buffers = ("t",)
    t: Tensor

    def __init__(self, options: PartialFCOptions, settings: CurricularFaceSettings) -> None:
        self.s, self.m, self.t_alpha = settings.s, settings.curricular_m, settings.curricular_t_alpha
        super().__init__(options)

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
        m = self.m

        def targets(cos_target: Tensor) -> Tensor:
            eps = torch.finfo(cos_target.dtype).eps
            margined = torch.cos(torch.arccos(cos_target.clamp(-1.0 + eps, 1.0 - eps)) + m)
            fallback = cos_target - m * math.sin(math.pi - m)
            return torch.where(cos_target > math.cos(math.pi - m), margined, fallback)

        # Rows without a target here keep their (possibly hard-negative) value in the placeholder column.
        hard = HardNegatives(hard_threshold.to(cos_theta.dtype), self.t.detach().clone().to(cos_theta.dtype))
        column = labels.clamp_min(0).unsqueeze(1)
        return margin_logits(cos_theta, column, self.s, targets, labels >= 0, hard, reuse_grad=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, t_alpha={self.t_alpha}"
