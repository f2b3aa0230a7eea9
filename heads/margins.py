"""Additive/multiplicative angular margins on cosine logits (ArcFace, CosFace, SphereFace-style, combined)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


class MarginSoftmax(nn.Module):
    r"""Combined margin ``s * (cos(m1 * theta + m2) - m3)`` on the target logit, ``s * cos(theta)`` elsewhere.

    Input: cosine logits ``cos_theta`` (N, C) in [-1, 1] and labels (N,), where a label is a column index, or -1
    when the row's class is not in this tensor (e.g. it lives on another rank's shard): such rows are only scaled.

    For the labelled column ``y`` of row ``i``, with ``theta = arccos(cos_theta[i, y])``:

        target(theta) = cos(m1 * theta + m2) - m3            while m1 * theta + m2 <= pi

    ArcFace is (m1, m2, m3) = (1, m, 0), CosFace (1, 0, m), SphereFace-like (m, 0, 0); any mix is allowed.
    The defaults are ArcFace with s=64, m=0.5.

    Beyond ``theta_max = (pi - m2) / m1`` the formula would turn back up (cos is not monotonic past pi) and reward
    moving away from the class center, so a fallback takes over:

    * ArcFace (m1 == 1, m3 == 0): insightface's rule ``target = cos(theta) - sin(pi - m2) * m2`` (its ``th``/``mm``
      constants: threshold ``cos(pi - m2)``). Monotonic in theta, with a downward step at ``theta_max``; kept so
      that results are comparable with arcface_torch.
    * any other (m1, m2, m3) with ``theta_max < pi``: ``target = cos(theta) - cos(theta_max) - 1 - m3``, the
      no-margin curve shifted to meet the margined curve at ``theta_max`` (value ``-1 - m3``): continuous,
      monotonic, and gradient 1 w.r.t. the cosine, like an ordinary logit.

    Gradients flow through the margin itself (``d target / d cos``), unlike arcface_torch, which edits the logits
    under ``no_grad`` and so back-propagates as if the margin were a constant offset. ``d arccos(x)/dx`` is
    infinite at x = +-1, so the cosine is clamped to ``[-1 + eps, 1 - eps]`` (``eps`` = the dtype's machine epsilon)
    before ``arccos``: values past the clamp (an embedding exactly on its center) get zero gradient from the
    margin, where the true direction is undefined anyway.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__()
        s, m1, m2, m3 = (_check_finite(name, v) for name, v in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)))
        if s <= 0:
            raise ValueError(f"s (logit scale) must be > 0, got {s!r}")
        if m1 <= 0:
            raise ValueError(f"m1 (multiplicative angular margin) must be > 0, got {m1!r}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 (additive angular margin) must be in [0, pi), got {m2!r}")
        if m3 < 0:
            raise ValueError(f"m3 (additive cosine margin) must be >= 0, got {m3!r}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

        self.theta_max = (math.pi - m2) / m1
        # The fallback never triggers when theta_max >= pi: theta = arccos(.) never exceeds pi.
        self.has_fallback = self.theta_max < math.pi
        self.is_arcface = m1 == 1.0 and m3 == 0.0
        # Threshold on the cosine: margined curve while cos_theta > cos(theta_max) (insightface's `th`).
        self.threshold = math.cos(self.theta_max) if self.has_fallback else -math.inf
        if self.is_arcface:
            self.fallback_offset = math.sin(math.pi - m2) * m2  # insightface's `mm`
        else:
            self.fallback_offset = math.cos(self.theta_max) + 1.0 + m3 if self.has_fallback else 0.0

    @classmethod
    def arcface(cls, s: float = 64.0, m: float = 0.5) -> MarginSoftmax:
        """ArcFace: ``s * cos(theta + m)`` on the target."""
        return cls(s=s, m1=1.0, m2=m, m3=0.0)

    @classmethod
    def cosface(cls, s: float = 64.0, m: float = 0.4) -> MarginSoftmax:
        """CosFace: ``s * (cos(theta) - m)`` on the target."""
        return cls(s=s, m1=1.0, m2=0.0, m3=m)

    def target_logit(self, cos_theta: Tensor) -> Tensor:
        """Margined target cosine (before scaling by ``s``), elementwise, fallback included."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            # CosFace / plain softmax: no angle needed, and no clamp to cut the gradient near +-1.
            return cos_theta - self.m3
        eps = torch.finfo(cos_theta.dtype).eps
        theta = torch.arccos(cos_theta.clamp(-1.0 + eps, 1.0 - eps))
        margined = torch.cos(self.m1 * theta + self.m2) - self.m3
        if not self.has_fallback:
            return margined
        # torch.where routes zero gradient to the unselected branch; both branches are finite thanks to the clamp.
        return torch.where(cos_theta > self.threshold, margined, cos_theta - self.fallback_offset)

    def forward(self, cos_theta: Tensor, labels: Tensor) -> Tensor:
        """Return scaled logits (N, C): the margin at ``labels`` (-1 = none in this row), ``s * cos`` elsewhere."""
        if cos_theta.dim() != 2:
            raise ValueError(f"cos_theta must be 2-D (N, C), got shape {tuple(cos_theta.shape)}")
        if labels.shape != (cos_theta.shape[0],):
            raise ValueError(f"labels must have shape ({cos_theta.shape[0]},), got {tuple(labels.shape)}")
        if cos_theta.shape[1] == 0:
            # An empty shard (e.g. a rank that sampled no centers) has no target to move.
            return cos_theta * self.s
        has_target = (labels >= 0).unsqueeze(1)
        # Gather/scatter with a placeholder column for label -1 instead of boolean indexing: no data-dependent
        # shapes, hence no host sync on CUDA. Rows without a target write their own value back unchanged.
        column = labels.clamp_min(0).unsqueeze(1).long()
        cos_target = cos_theta.gather(1, column)
        new_target = torch.where(has_target, self.target_logit(cos_target), cos_target)
        return cos_theta.scatter(1, column, new_target) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
