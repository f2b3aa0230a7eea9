"""How a step reads the class-center table: cosines without a normalized copy of it, and a gradient that follows
the sampled rows.

`center_cosine(unit_embeddings, weight, index, gradient)` returns cos(theta) between the (already unit) gathered
embeddings and the scored centers: every row of `weight`, or the rows `index`. It never builds `normalize(weight)`:
the logits are `x @ w.T` scaled by each center's inverse norm (a C-vector), and backward uses the closed form

    d cos_bc / d w_c = (x_b - cos_bc * w_c / |w_c|) / |w_c|
    grad w_c = (sum_b G_bc x_b) / |w_c| - (sum_b G_bc cos_bc) w_c / |w_c|^2

so at a sample rate of 1 the only center-sized tensor a step creates is the gradient itself (a plain full FC's
cost), where `F.linear(x, F.normalize(w))` creates three (the normalized table, its gradient, and the gradient
through the norm). The gradient equals the normalize-then-multiply formulation's (tests/unit/test_head_rows.py, in
float64); rounding differs in the last bits. The cosines are clamped to [-1, 1] (rounding can take a cosine of
unit vectors a few ulps past 1) and the gradient passes the clamp: the clamp's own gradient would be zero only
where the cosine is +-1, where the head's gradient vanishes anyway (there the embedding is parallel to the center,
and both `x - cos w/|w|` and the embedding normalization's projection are zero). Forward makes one N x C tensor (the
cosines, returned and kept for backward) and reads each chunk of the table once; backward works chunk by chunk too,
so its only N x C tensor is the incoming gradient.

`gradient` says what the table's gradient is when `index` picks rows:

* ``"dense"``: a table-sized tensor, zero on unsampled rows (what `weight[index]` gives; insightface Partial FC v2:
  the optimizer then visits every row);
* ``"sparse"``: a sparse COO tensor holding the sampled rows only (no table-sized tensor; what `head.update:
  lazy | sparse` feed to `trainer.row_sgd.RowSGD`).

Rows of any shape (class, ..., E) work (sub-center ArcFace's (C, K, E) gives cosines (N, C, K)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Gradient = Literal["dense", "sparse"]
# Centers per chunk of forward and backward: large enough for efficient matrix products, small enough that a
# chunk's N x CHUNK results stay in cache while they are scaled; sampled rows are gathered in smaller chunks.
CHUNK = 1 << 14
GATHER_CHUNK = 1 << 12
NORM_EPS = 1e-12  # as F.normalize


class _CenterCosine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, unit: Tensor, weight: Tensor, index: Tensor | None, gradient: Gradient, best_of: Tensor | None
    ) -> Any:
        row_shape = weight.shape if index is None else (index.numel(), *weight.shape[1:])
        embedding = unit.shape[1]
        num_rows = math.prod(row_shape[:-1])  # centers (x K sub-centers)
        per_class = max(1, num_rows // max(1, row_shape[0]))
        flat_weight = weight.reshape(-1, embedding) if index is None else None
        # In chunks of centers: each chunk's rows are read once, from memory, for their norms and their dot
        # products, and scaled and clamped while in cache; no gathered copy of the sampled rows as a whole.
        inv_norm = unit.new_empty(num_rows)
        if best_of is None:
            cos = unit.new_empty(unit.shape[0], num_rows)
        else:  # the best of each class's K sub-centers: (N, C) cosines and winners, never (N, C, K) as a whole
            cos = unit.new_empty(unit.shape[0], row_shape[0])
            winner = torch.empty(cos.shape, dtype=_winner_dtype(per_class), device=unit.device)
        for lo, hi, chunk in _chunks(weight, flat_weight, index, num_rows, per_class, embedding, unit.dtype):
            torch.linalg.vector_norm(chunk, dim=1, out=inv_norm[lo:hi])
            inv_norm[lo:hi].clamp_min_(NORM_EPS).reciprocal_()
            if best_of is None:
                block = cos[:, lo:hi]
                torch.mm(unit, chunk.t(), out=block)
                block.mul_(inv_norm[lo:hi]).clamp_(-1.0, 1.0)
                continue
            block = torch.mm(unit, chunk.t()).mul_(inv_norm[lo:hi]).clamp_(-1.0, 1.0)
            classes = slice(lo // per_class, hi // per_class)
            block = block.view(unit.shape[0], -1, per_class)
            block.masked_fill_(~best_of[classes], -2.0)  # below any cosine: a dropped sub-center never wins
            best, which = block.max(dim=2)
            cos[:, classes], winner[:, classes] = best, which
        ctx.gradient, ctx.row_shape, ctx.best_of = gradient, torch.Size(row_shape), best_of is not None
        if best_of is not None:
            ctx.save_for_backward(unit, weight, index, cos, inv_norm, winner)
            ctx.mark_non_differentiable(winner)
            ctx.set_materialize_grads(False)  # no zero (N, C) gradient for the winners
            return cos, winner
        ctx.save_for_backward(unit, weight, index, cos, inv_norm, None)
        shape = rows_shape_without_e(ctx.row_shape)
        return cos if len(shape) == 1 else cos.view(unit.shape[0], *shape)  # not a view when it need not be one

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        unit, weight, index, cos, inv_norm, winner = ctx.saved_tensors
        num_rows, embedding = inv_norm.shape[0], unit.shape[1]
        if grad_out is None:  # (best_of: grads are not materialized) nothing reached the cosines
            grad_out = cos.new_zeros(cos.shape)
        grad_out = grad_out.reshape(cos.shape)
        grad_unit = unit.new_zeros(unit.shape) if ctx.needs_input_grad[0] else None
        grad_rows = unit.new_empty(num_rows, embedding)
        flat_weight = weight.reshape(-1, embedding) if index is None else None
        per_class = max(1, num_rows // max(1, ctx.row_shape[0]))  # sub-centers per class (1 for a plain head)
        # Every temporary is N x chunk or chunk x E; only the gradient is as large as the table.
        for lo, hi, chunk in _chunks(weight, flat_weight, index, num_rows, per_class, embedding, unit.dtype):
            if ctx.best_of:
                # Only each class's winning sub-center gets the gradient, with the winning cosine: the chunk's
                # (N, c, K) gradient is made here, chunk by chunk.
                classes = slice(lo // per_class, hi // per_class)
                picked = winner[:, classes].long().unsqueeze(2)
                shape = (grad_out.shape[0], picked.shape[1], per_class)
                g = grad_out.new_zeros(shape).scatter_(2, picked, grad_out[:, classes].unsqueeze(2))
                # The cosine of a winner is the class's: exact wherever g is not zero.
                k = (g * cos[:, classes].unsqueeze(2)).sum(dim=0).view(-1).mul_(inv_norm[lo:hi]).mul_(inv_norm[lo:hi])
                g = g.view(shape[0], -1).mul_(inv_norm[lo:hi])  # G / |w|
            else:
                g = grad_out[:, lo:hi] * inv_norm[lo:hi]  # G / |w|
                k = (g * cos[:, lo:hi]).sum(dim=0).mul_(inv_norm[lo:hi])  # sum_b G_bc cos_bc / |w_c|
            if grad_unit is not None:
                grad_unit.addmm_(g, chunk)
            rows = grad_rows[lo:hi]
            torch.mm(g.t(), unit, out=rows)
            rows.addcmul_(chunk, k.unsqueeze(1), value=-1.0)  # grad w_c = sum_b G_bc x_b / |w_c| - k_c w_c
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_rows = grad_rows.view(ctx.row_shape).to(weight.dtype)
            if index is None:
                grad_weight = grad_rows
            elif ctx.gradient == "sparse":
                grad_weight = torch.sparse_coo_tensor(
                    index.unsqueeze(0), grad_rows, weight.shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_weight = weight.new_zeros(weight.shape).index_copy_(0, index, grad_rows)
        return grad_unit, grad_weight, None, None, None


def _winner_dtype(per_class: int) -> torch.dtype:
    """The smallest integer type for a sub-center index: the winners are kept for backward, one per (row, class)."""
    return torch.uint8 if per_class <= 256 else torch.int16 if per_class <= 2**15 else torch.int64


def _chunks(
    weight: Tensor,
    flat_weight: Tensor | None,
    index: Tensor | None,
    num_rows: int,
    per_class: int,
    embedding: int,
    dtype: torch.dtype,
    size: int = 0,
) -> Iterator[tuple[int, int, Tensor]]:
    """(lo, hi, rows lo:hi of the scored table as (hi - lo, E)) in chunks of about `size` rows, whole classes each;
    by default CHUNK (views of the table) or GATHER_CHUNK (copies of sampled rows: they count in the peak)."""
    rows = size or (CHUNK if flat_weight is not None else GATHER_CHUNK)
    step = max(per_class, (rows // per_class) * per_class)
    for lo in range(0, num_rows, step):
        hi = min(num_rows, lo + step)
        if flat_weight is not None:
            chunk = flat_weight[lo:hi]
        else:
            assert index is not None
            chunk = weight.index_select(0, index[lo // per_class : hi // per_class]).reshape(-1, embedding)
        yield lo, hi, chunk.to(dtype)


def rows_shape_without_e(row_shape: torch.Size) -> tuple[int, ...]:
    """(rows, ...) of a (rows, ..., E) table: the cosines' shape after the batch dimension."""
    return tuple(row_shape[:-1])


def center_cosine(
    unit_embeddings: Tensor, weight: Tensor, index: Tensor | None, gradient: Gradient = "dense"
) -> Tensor:
    """cos(theta) (N, R, ...) of unit embeddings (N, E) with the centers `weight` (C, ..., E), or its rows `index`
    (sorted, unique; R of them), clamped to [-1, 1]. See the module docstring for `gradient`."""
    if unit_embeddings.dim() != 2 or weight.shape[-1] != unit_embeddings.shape[1]:
        raise ValueError(
            f"need unit embeddings (N, E) and centers (C, ..., E), got {tuple(unit_embeddings.shape)} and "
            f"{tuple(weight.shape)}"
        )
    return _CenterCosine.apply(unit_embeddings, weight, index, gradient, None)


def best_center_cosine(
    unit_embeddings: Tensor, weight: Tensor, index: Tensor | None, gradient: Gradient, active: Tensor
) -> tuple[Tensor, Tensor]:
    """For centers of K sub-centers each (``weight`` (C, K, E)): each row's cosine with each scored class's best
    active sub-center (N, C), and which one it is (N, C, an integer type; no gradient). ``active`` (C_scored, K) bool:
    the sub-centers that may win (at least one per class). The gradient goes to the winner only, as autograd's
    ``center_cosine(...).masked_fill(~active, -2).max(dim=2)``, but neither direction makes an (N, C, K) tensor: the
    cosines of a chunk of classes are reduced as they are computed, and backward rebuilds the chunk's gradient
    from the winners."""
    if unit_embeddings.dim() != 2 or weight.dim() != 3 or weight.shape[-1] != unit_embeddings.shape[1]:
        raise ValueError(
            f"need unit embeddings (N, E) and centers (C, K, E), got {tuple(unit_embeddings.shape)} and "
            f"{tuple(weight.shape)}"
        )
    return _CenterCosine.apply(unit_embeddings, weight, index, gradient, active)
