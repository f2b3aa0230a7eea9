"""Train a head alone for some steps, as the trainer steps it: the shared driver of the head-update tests.

Every step draws its global batch (embeddings, labels) from a generator seeded by the step, so any run, any
number of ranks and any resume sees the same data; each rank takes its slice. The lr follows the trainer's
schedule (linear warm-up, then polynomial decay) through `trainer.optim.set_lr`, and the optimizer is the
trainer's (`trainer.optim.build_optimizer`, SGD with momentum 0.9 and weight decay 5e-4 unless told otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from heads import HeadConfig, build_head
from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import build_optimizer, lr_factor, set_lr

EMBEDDING = 8
GLOBAL_BATCH = 8


def make_head(
    name: str = "partial_fc",
    update: str = "lazy",
    num_classes: int = 97,
    sample_rate: float = 0.2,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float64,
    **extra: Any,
) -> Any:
    section = HeadConfig.resolve_section()  # every registered head's keys
    cfg = section(name=name, update=update, sample_rate=sample_rate, **extra)  # type: ignore[arg-type]
    head = build_head(cfg, embedding_size=EMBEDDING, num_classes=num_classes, rank=rank, world_size=world_size)
    head.reset_parameters(seed=7)
    return head.to(dtype)


def make_optimizer(head: Any, lazy_sync_every: int = 100, fused: bool = False, **optim: Any) -> torch.optim.Optimizer:
    cfg = OptimConfig(**{"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-4, **optim})
    head.lazy_sync_every = lazy_sync_every  # the head owns it (head.lazy_sync_every); the optimizer reads it there
    return build_optimizer(cfg, (head, 1.0), fused=fused)


def batch(step: int, num_classes: int, dtype: torch.dtype, rank: int = 0, world_size: int = 1) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(10_000 + step)
    x = F.normalize(torch.randn(GLOBAL_BATCH, EMBEDDING, generator=generator, dtype=torch.float64)) * 3
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=generator)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[rows].to(dtype).requires_grad_(), labels[rows]


def run_steps(
    head: Any,
    optimizer: torch.optim.Optimizer,
    start: int,
    stop: int,
    total: int = 240,
    rank: int = 0,
    world_size: int = 1,
    skip: tuple[int, ...] = (),
    micro_batches: int = 1,
) -> list[float]:
    """Steps [start, stop) of a `total`-step schedule (20 warm-up steps, power 2); the steps in `skip` compute a
    loss and gradients and are then skipped, as the trainer skips a non-finite or fp16-overflow step."""
    schedule = ScheduleConfig(power=2.0)
    dtype = head.weight.dtype
    losses = []
    for step in range(start, stop):
        set_lr([optimizer], 0.5 * lr_factor(schedule, step, total, 20, total))
        for micro in range(micro_batches):
            torch.manual_seed(step * 31 + micro * 7 + rank)  # the negatives each rank samples
            x, labels = batch(step * micro_batches + micro, head.num_classes, dtype, rank, world_size)
            loss = head(x, labels) / micro_batches
            loss.backward()
            losses.append(float(loss.detach()))
        if step not in skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def synced_state(head: Any, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The centers and their momentum once every lazy row is caught up (copies)."""
    sync = getattr(optimizer, "sync_rows", None)
    if sync is not None:
        sync()
    state = optimizer.state.get(head.weight, {})
    out = {"weight": head.weight.detach().clone()}
    if "momentum_buffer" in state:
        out["momentum"] = state["momentum_buffer"].detach().clone()
    return out
