"""Differentiable collectives for a class-sharded head: the only module in ``heads/`` that calls torch.distributed.

Every function degrades to plain single-process math when torch.distributed is not initialized (or the group has
one member), so callers never special-case one process. Every collective here is a hazard in the usual sense: all
ranks of the group must call it, in the same order, with the same shapes, or the job hangs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

ProcessGroup = Any  # torch.distributed.ProcessGroup, which builds without distributed support lack.
_MAX_DIMS = 8  # shapes are exchanged as fixed-length int64 vectors


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialized and the group has more than one member."""
    return world_info(group)[1] > 1


def world_info(group: ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is unavailable or not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_dim0(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (no autograd); shapes must match on every rank."""
    _, world_size = world_info(group)
    tensor = tensor.contiguous()
    # Exchange shapes first: all_gather with unequal sizes fails obscurely (gloo) or corrupts/hangs (NCCL).
    # Every rank sees the same list and so raises the same error: no rank is left waiting in a collective.
    # Cost: one tiny extra collective and a host sync (.tolist()) per call.
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"can gather tensors of at most {_MAX_DIMS} dims, got shape {tuple(tensor.shape)}")
    padding = [-1] * (_MAX_DIMS - tensor.dim())
    shape = torch.tensor([*tensor.shape, *padding], dtype=torch.int64, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    per_rank = [tuple(d for d in s if d >= 0) for s in torch.stack(shapes).tolist()]
    if any(s != per_rank[0] for s in per_rank):
        raise ValueError(f"all ranks must pass tensors of the same shape (equal batch size); got per rank: {per_rank}")
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, dp_average: bool, group: ProcessGroup | None, partial: bool) -> Tensor:
        ctx.rank, ctx.world_size = world_info(group)
        ctx.dp_average, ctx.group, ctx.batch, ctx.partial = dp_average, group, tensor.shape[0], partial
        return _gather_dim0(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        grad = grad_output
        if ctx.partial:
            # Every rank holds a partial gradient for every gathered row (its class shard's contribution): summing
            # over ranks gives the full gradient of the global loss; this rank keeps its own rows.
            grad = grad_output.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        # (Not partial: every rank computed the whole loss from the gathered rows, so its gradient is whole already.)
        grad = grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]
        if ctx.dp_average:
            # DDP / ZeRO then average backbone gradients over ranks (divide by W); undo it so the backbone sees
            # the gradient of one process on the global batch.
            grad = grad * ctx.world_size
        return grad, None, None, None


def all_gather_with_grad(tensor: Tensor, dp_average: bool = True, group: ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0, differentiably.

    Backward all-reduces (sums) the incoming gradient and returns this rank's slice: the exact gradient of the
    global loss w.r.t. the local rows. With ``dp_average`` the slice is multiplied by the world size, because
    data parallelism (DDP, DeepSpeed ZeRO) averages backbone gradients over ranks: after that averaging the
    backbone gradient equals a single process's on the global batch. Pass ``dp_average=False`` when nothing
    averages afterwards (then each rank's gradient is the exact one of its rows).

    Hazards: a collective in forward and in backward (every rank must call both), and a host sync in forward
    (the shape check).
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, dp_average, group, True)


def all_gather_replicated(tensor: Tensor, dp_average: bool = True, group: ProcessGroup | None = None) -> Tensor:
    """`all_gather_with_grad` for a loss that every rank computes in full from the gathered rows (distillation's):
    each rank's gradient of a gathered row is then already the whole gradient, so backward takes this rank's slice
    without summing over ranks (a sum would count it W times); `dp_average` as there. A collective in forward only.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, dp_average, group, False)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0, without gradient (e.g. labels).

    Collective with a host sync (the shape check), like ``all_gather_with_grad``.
    """
    if not is_distributed(group):
        return tensor
    return _gather_dim0(tensor, group)


def _all_reduce(tensor: Tensor, op: Any, group: ProcessGroup | None) -> None:
    if is_distributed(group):
        dist.all_reduce(tensor, op=op, group=group)


@torch.no_grad()
def all_reduce_sum_no_grad(tensor: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """A copy of ``tensor`` summed over ranks, without gradient (e.g. each row's target cosine, which only the rank
    holding the row's class knows: the others contribute zeros, so the sum is exact).

    Collective: every rank must call it, in the same order, with the same shape.
    """
    out = tensor.detach().clone()
    _all_reduce(out, dist.ReduceOp.SUM, group)
    return out


class _DistributedSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, group: ProcessGroup | None, consume: bool) -> Tensor:
        ctx.consume_logits = consume
        num_rows, num_local = logits.shape
        # Stability shift: any value shared by all ranks works, the global row max keeps exp() <= 1.
        if num_local > 0:
            row_max = logits.detach().amax(dim=1)
        else:  # an empty shard still joins every collective below
            row_max = logits.new_full((num_rows,), -torch.inf)
        _all_reduce(row_max, dist.ReduceOp.MAX, group)

        # An intermediate result's buffer (the margin's logits) becomes exp(logits - max) in place, then the
        # softmax saved for backward: no new N x C_local tensor (at millions of classes one costs as much time as
        # a pass of the step). A graph that saved those logits for its own backward would fail loudly there
        # (version counter). A leaf, or a tensor outside autograd, is the caller's: copied.
        if ctx.consume_logits:
            softmax = logits.detach().sub_(row_max.unsqueeze(1))
        else:
            softmax = logits.detach() - row_max.unsqueeze(1)
        has_label = labels >= 0
        column = labels.clamp_min(0).unsqueeze(1)
        if num_local > 0:
            target_shifted = torch.where(has_label, softmax.gather(1, column).squeeze(1), 0.0)
        else:
            target_shifted = softmax.new_zeros(num_rows)
        softmax.exp_()
        # Reduce three columns in one collective: sum of exp, the target's shifted logit (non-zero only on the
        # rank that owns the label) and the number of owners, which must be exactly 1.
        stats = torch.stack([softmax.sum(dim=1), target_shifted, has_label.to(softmax.dtype)], dim=1)
        _all_reduce(stats, dist.ReduceOp.SUM, group)
        sum_exp, target_shifted, owners = stats.unbind(dim=1)

        # log p(label) from the logits directly, not log(softmax): exact even where p underflows.
        loss_rows = sum_exp.log() - target_shifted
        # A label no rank holds (out of range) or several hold (overlapping shards) would give a silently wrong
        # loss; make it NaN instead, which needs no host sync.
        loss_rows = torch.where(owners == 1, loss_rows, torch.nan)

        softmax.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(softmax, has_label, column)
        ctx.consumed = False
        return loss_rows.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.consumed:
            raise RuntimeError("distributed_softmax_cross_entropy cannot back-propagate twice (retain_graph=True)")
        # The saved softmax becomes the gradient in place (saves one N x C_local buffer), so a second backward
        # through the same graph would read garbage: refused above.
        ctx.consumed = True
        grad, has_label, column = ctx.saved_tensors
        num_rows = grad.shape[0]
        if grad.shape[1] > 0:
            grad.scatter_add_(1, column, -has_label.to(grad.dtype).unsqueeze(1))
        # grad_loss stays a tensor: .item() would be a host sync on GPU.
        grad.mul_(grad_loss / num_rows)
        return grad, None, None, None


def distributed_softmax_cross_entropy(logits: Tensor, labels: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Mean softmax cross-entropy over rows of logits sharded by class across ranks.

    ``logits`` (N_global, C_local): every rank holds the same rows (the global batch) and its own columns.
    ``labels`` (N_global,): the column of the row's class on this rank, or -1 when another rank holds it;
    exactly one rank must hold each row's class (else that row's loss is NaN).

    Forward: all-reduce MAX of the row max (stability), one all-reduce SUM of (sum of exp, target logit, owner
    count); loss = mean over rows of ``log(sum exp) - target``. ``logits`` computed by the graph (the margin's
    output) are overwritten: their buffer becomes the softmax kept for backward; a leaf is left untouched.
    Backward: ``(softmax - onehot) / N_global`` on the local columns. With one process this is exactly
    ``F.cross_entropy(logits, labels)``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C_local), got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    consume = logits.grad_fn is not None  # produced by an op of the graph, not the caller's own tensor
    return _DistributedSoftmaxCrossEntropy.apply(logits, labels.long(), group, consume)
