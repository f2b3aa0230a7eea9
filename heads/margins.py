"""Additive/multiplicative angular margins on cosine logits (ArcFace, CosFace, SphereFace-style, combined)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


MarginGrad = Literal["exact", "constant"]


class MarginSoftmax(nn.Module):
    r"""Combined margin ``s * (cos(m1 * theta + m2) - m3)`` on the target logit, ``s * cos(theta)`` elsewhere.

    Input: cosine logits ``cos_theta`` (N, C) in [-1, 1] and labels (N,), where a label is a column index, or -1
    when the row's class is not in this tensor (e.g. it lives on another rank's shard): such rows are only scaled.

    For the labelled column ``y`` of row ``i``, with ``theta = arccos(cos_theta[i, y])``:

        target(theta) = cos(m1 * theta + m2) - m3

    ArcFace is (m1, m2, m3) = (1, m, 0), CosFace (1, 0, m), SphereFace-like (m, 0, 0); any mix is allowed.
    The defaults are ArcFace with s=64, m=0.5.

    Past ``theta_max = (pi - m2) / m1`` the formula turns back up (cos is not monotonic past pi):

    * ArcFace (m1 == 1, m3 == 0), ``arcface_fallback=False`` (the default): no fallback, ``cos(theta + m2)``
      everywhere, as insightface HEAD (its fallback was removed in late 2022; the seed-era code had none either).
    * ArcFace, ``arcface_fallback=True``: the rule of insightface's code between those dates,
      ``target = cos(theta) - sin(pi - m2) * m2`` past the threshold ``cos(pi - m2)``. Monotonic in theta, with a
      downward step at ``theta_max``.
    * any other (m1, m2, m3) with ``theta_max < pi`` (insightface refuses these): ``target = cos(theta) -
      cos(theta_max) - 1 - m3``, the no-margin curve shifted to meet the margined curve at ``theta_max`` (value
      ``-1 - m3``): continuous, monotonic, and gradient 1 w.r.t. the cosine, like an ordinary logit.

    ``margin_grad``: ``exact`` differentiates through the margin (``d target / d cos``); ``constant`` back-propagates
    as if the margin were a constant offset (``d target / d cos = 1``), as insightface, which edits the logits under
    ``no_grad``. Same forward. ``d arccos(x)/dx`` is infinite at x = +-1, so the cosine is clamped to
    ``[-1 + eps, 1 - eps]`` (``eps`` = the dtype's machine epsilon) before ``arccos``: values past the clamp get zero
    gradient from the margin (exact mode), where the true direction is undefined anyway.

    ``interclass_filtering_threshold`` > 0 (insightface's ``CombinedMarginLoss``, its WebFace12M "conflict"
    configurations): a non-target cosine above it is taken for a mislabelled duplicate identity and set to 0, with
    zero gradient, before the margin; rows without a target here have every column filtered that way.
    """

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        arcface_fallback: bool = False,
        margin_grad: MarginGrad = "exact",
        interclass_filtering_threshold: float = 0.0,
    ) -> None:
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
        if margin_grad not in ("exact", "constant"):
            raise ValueError(f"margin_grad must be 'exact' or 'constant', got {margin_grad!r}")
        threshold = _check_finite("interclass_filtering_threshold", interclass_filtering_threshold)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"interclass_filtering_threshold must be in [0, 1) (0 = off), got {threshold!r}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.arcface_fallback = bool(arcface_fallback)
        self.margin_grad: MarginGrad = margin_grad
        self.interclass_filtering_threshold = threshold

        self.theta_max = (math.pi - m2) / m1
        self.is_arcface = m1 == 1.0 and m3 == 0.0
        # theta = arccos(.) never exceeds pi: no fallback when theta_max >= pi; ArcFace's only when asked for.
        self.has_fallback = self.theta_max < math.pi and (self.arcface_fallback or not self.is_arcface)
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
        target = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.has_fallback:
            # torch.where routes zero gradient to the unselected branch; both are finite thanks to the clamp.
            target = torch.where(cos_theta > self.threshold, target, cos_theta - self.fallback_offset)
        if self.margin_grad == "constant":
            # insightface's backward: the value of the margined logit, the gradient of the plain cosine.
            return cos_theta + (target - cos_theta).detach()
        return target

    def forward(self, cos_theta: Tensor, labels: Tensor, reuse_grad: bool = False) -> Tensor:
        """Return scaled logits (N, C): the margin at ``labels`` (-1 = none in this row), ``s * cos`` elsewhere.

        ``reuse_grad``: backward may scale the incoming gradient in place. Only for a caller whose logits go to one
        consumer that hands over its gradient buffer (Partial FC's cross-entropy): saves an N x C tensor per step.
        """
        if cos_theta.dim() != 2:
            raise ValueError(f"cos_theta must be 2-D (N, C), got shape {tuple(cos_theta.shape)}")
        if labels.shape != (cos_theta.shape[0],):
            raise ValueError(f"labels must have shape ({cos_theta.shape[0]},), got {tuple(labels.shape)}")
        if cos_theta.shape[1] == 0:
            # An empty shard (e.g. a rank that sampled no centers) has no target to move.
            return cos_theta * self.s
        if self.interclass_filtering_threshold > 0:
            cos_theta = filter_interclass(cos_theta, labels, self.interclass_filtering_threshold)
        # Gather/scatter with a placeholder column for label -1 instead of boolean indexing: no data-dependent
        # shapes, hence no host sync on CUDA. Rows without a target keep their own value there.
        column = labels.clamp_min(0).unsqueeze(1).long()
        return margin_logits(cos_theta, column, self.s, self.target_logit, labels >= 0, reuse_grad=reuse_grad)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, arcface_fallback={self.arcface_fallback}, "
            f"margin_grad={self.margin_grad}, interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )


def filter_interclass(cos_theta: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Non-target cosines above ``threshold`` set to 0 with zero gradient (insightface's inter-class filtering);
    ``labels`` as in `MarginSoftmax.forward` (-1: no target column in this row)."""
    is_target = torch.zeros_like(cos_theta, dtype=torch.bool)
    is_target.scatter_(1, labels.clamp_min(0).unsqueeze(1), (labels >= 0).unsqueeze(1))
    dirty = (cos_theta.detach() > threshold) & ~is_target
    return torch.where(dirty, torch.zeros_like(cos_theta), cos_theta)


class NonTargetLogits(Protocol):
    """An elementwise map f of the non-target cosines (before the scale s), where a head has one (AdaFace's clamp,
    CurricularFace's hard negatives): applied by `margin_logits` to blocks of whole rows of the (N, C) cosines."""

    def apply_(self, out: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        """``out = f(cos)`` for the rows ``rows`` of the batch (``out`` and ``cos``: those rows, (r, C));
        ``scratch``: two tensors shaped like ``cos`` (2, r, C) to work in (a fresh tensor per block would cost its
        allocation each time)."""

    def scale_grad_(self, grad: Tensor, cos: Tensor, rows: slice, scratch: Tensor) -> None:
        """``grad *= f'(cos)`` in place, the same rows and scratch."""


# Elements per block of rows for a non-target map: its temporaries stay in cache between its passes.
BLOCK_ELEMENTS = 1 << 16


def _row_blocks(num_rows: int, num_columns: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(1, num_columns))
    for lo in range(0, num_rows, step):
        yield slice(lo, min(num_rows, lo + step))


def _scratch(like: Tensor) -> Tensor:
    """Two buffers of a block of rows of ``like`` (N, C), for `NonTargetLogits`."""
    step = max(1, BLOCK_ELEMENTS // max(1, like.shape[1]))
    return like.new_empty(2, min(step, like.shape[0]), like.shape[1])


class _MarginLogits(torch.autograd.Function):
    """``s * f(cos)`` with column ``column`` of each row that has a target replaced by ``s * targets(cos[row, column],
    *extra)``; f is the identity or `others` (`NonTargetLogits`).

    The same values and gradients as autograd's ``(f(cos) * s).scatter(1, column, targets(cos.gather(1, column)) *
    s)``, but backward makes one N x C tensor (``grad * s * f'(cos)``, the targets' gradients written into it) or
    none (``reuse_grad``: the incoming buffer is scaled in place), where autograd's graph of gather, scatter and f
    makes up to four (the scatter's and the gather's dense gradients, their sum, the scaling, f's own): at millions
    of classes the head's time goes to such N x C passes. `targets` is differentiated on the (N, 1) target cosines
    and the ``extra`` tensors (e.g. MagFace's margins, which depend on the embeddings) alone, in backward. f is
    applied in blocks of rows (its temporaries block-sized) and reads the cosines, which the cosine's own backward
    keeps anyway.
    """

    @staticmethod
    def forward(
        ctx: Any,
        cos: Tensor,
        column: Tensor,
        has_target: Tensor | None,
        s: float,
        targets: Callable[..., Tensor],
        others: NonTargetLogits | None,
        reuse_grad: bool,
        *extra: Tensor,
    ) -> Tensor:
        ctx.reuse_grad = reuse_grad
        with torch.enable_grad():
            cos_target = cos.detach().gather(1, column).requires_grad_()
            leaves = tuple(e.detach().requires_grad_(e.requires_grad) for e in extra)
            new_target = targets(cos_target, *leaves)
        if others is None:
            logits = cos * s  # kept apart: the cosines are saved for their own backward (heads.rows)
        else:
            logits, scratch = torch.empty_like(cos), _scratch(cos)
            for rows in _row_blocks(*cos.shape):
                others.apply_(logits[rows], cos[rows], rows, scratch[:, : rows.stop - rows.start])
                logits[rows].mul_(s)
        value = new_target.detach() * s
        if has_target is not None:  # a row without a target here keeps its own (non-target) value
            value = torch.where(has_target, value, logits.gather(1, column))
        ctx.save_for_backward(column, has_target, cos if others is not None else None)
        ctx.graph, ctx.s, ctx.others = (cos_target, leaves, new_target), s, others
        return logits.scatter_(1, column, value)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        column, has_target, cos = ctx.saved_tensors
        cos_target, leaves, new_target = ctx.graph
        grad_target = grad.gather(1, column) * ctx.s
        if has_target is not None:  # a row without a target here: its targets() value was not used
            grad_target = torch.where(has_target, grad_target, 0.0)
        wanted = [cos_target, *(leaf for leaf in leaves if leaf.requires_grad)]
        with torch.enable_grad():
            # retain_graph: the (N, 1) graph is tiny, and a second backward (gradcheck) must find it again.
            found = torch.autograd.grad(new_target, wanted, grad_target, retain_graph=True, allow_unused=True)
        # A target that does not depend on the cosine (constant) or on an extra input: zero gradient.
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, found, strict=True)]
        grad_cos_target, grad_extra = grads[0], iter(grads[1:])
        # contiguous: an expanded gradient (stride 0) cannot be scaled in place
        scaled = grad.mul_(ctx.s) if ctx.reuse_grad and grad.is_contiguous() else grad * ctx.s
        if ctx.others is not None:
            scratch = _scratch(scaled)
            for rows in _row_blocks(*scaled.shape):
                ctx.others.scale_grad_(scaled[rows], cos[rows], rows, scratch[:, : rows.stop - rows.start])
        if has_target is not None:
            grad_cos_target = torch.where(has_target, grad_cos_target, scaled.gather(1, column))
        extra = tuple(next(grad_extra) if leaf.requires_grad else None for leaf in leaves)
        return scaled.scatter_(1, column, grad_cos_target), None, None, None, None, None, None, *extra


def margin_logits(
    cos: Tensor,
    column: Tensor,
    s: float,
    targets: Callable[..., Tensor],
    has_target: Tensor | None = None,
    others: NonTargetLogits | None = None,
    extra: tuple[Tensor, ...] = (),
    reuse_grad: bool = False,
) -> Tensor:
    """Every head's margin step: ``s * f(cos)`` (N, C), f the identity or ``others``, with each row's ``column``
    (N, 1) replaced by ``s * targets(cos[row, column], *extra)`` where ``has_target`` (N,) (None: every row) is
    true; ``targets`` maps (N, 1) target cosines (and the ``extra`` tensors, differentiably) to the margined
    target cosines. One N x C tensor made in forward and one in backward, none there with ``reuse_grad`` (see
    `MarginSoftmax.forward`)."""
    mask = None if has_target is None else has_target.reshape(-1, 1)
    return _MarginLogits.apply(cos, column, mask, s, targets, others, reuse_grad, *extra)
