"""head.update lazy equals dense on 2 gloo ranks and across a resharded resume (2 ranks -> 1), in float64.

The head trains alone (tests/head_steps.py: 240 steps, warm-up and decaying lr, 20 % of 97 classes sampled per rank
per step) with the trainer's optimizer; at step 120 every rank writes a real checkpoint (`trainer.checkpoint`, as
the trainer does: lazy rows synced first), and one process resumes it for steps 120-240. Lazy and dense see the
same batches and draw the same negatives, so their centers and momentum must agree to float64 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.head_steps import make_head, make_optimizer, run_steps, synced_state
from tests.launching import spawn_ranks
from trainer import checkpoint as ckpt
from trainer.optim import head_rows_loaded, sync_head_rows

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

TOTAL, RESUME_AT = 240, 120


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _train(rank: int, world_size: int, update: str, output: Path, resume: Path | None) -> dict[str, torch.Tensor]:
    head = make_head(update=update, rank=rank, world_size=world_size)
    optimizer = make_optimizer(head, lazy_sync_every=13)
    backbone = nn.Linear(1, 1)  # the checkpoint format wants one; the head is what is tested
    start, stop = (RESUME_AT, TOTAL) if resume else (0, RESUME_AT)
    if resume is not None:
        ckpt.load_checkpoint(
            resume,
            rank=rank,
            world_size=world_size,
            backbone=backbone,
            head=head,
            backbone_group=None,
            head_group=(optimizer, 0),
        )
        head_rows_loaded(optimizer)
    run_steps(head, optimizer, start, stop, total=TOTAL, rank=rank, world_size=world_size)
    if resume is None:
        sync_head_rows(optimizer)  # what Trainer.save does first
        ckpt.save_checkpoint(
            output,
            step=RESUME_AT,
            rank=rank,
            world_size=world_size,
            barrier=_barrier,
            backbone=backbone,
            head=head,
            backbone_group=None,
            head_group=(optimizer, 0),
            trainer_state={"step": RESUME_AT},
            metadata=ckpt.model_metadata("linear", 1),
            keep=1,
        )
    return {**synced_state(head, optimizer), "class_start": torch.tensor(head.class_start)}


def _worker(rank: int, world_size: int, job: dict[str, Any]) -> None:
    """One rank (inside spawn_ranks' gloo process group when there are several)."""
    for update in ("dense", "lazy"):
        resume = job["resume"] / update / ckpt.CHECKPOINTS / f"step-{RESUME_AT:08d}" if job["resume"] else None
        state = _train(rank, world_size, update, job["output"] / update, resume)
        torch.save(state, job["output"] / f"{update}-rank{rank}.pt")


def _spawn(world_size: int, job: dict[str, Any]) -> None:
    spawn_ranks(_worker, (world_size, job), world_size)


def _assert_equal(output: Path, world_size: int) -> None:
    for rank in range(world_size):
        dense, lazy = torch.load(output / f"dense-rank{rank}.pt"), torch.load(output / f"lazy-rank{rank}.pt")
        for key in ("weight", "momentum"):
            error = float((lazy[key] - dense[key]).abs().max() / dense[key].abs().max())
            assert error < 1e-12, (rank, key, error)


def test_lazy_equals_dense_on_two_ranks_then_resumed_on_one(tmp_path: Path) -> None:
    first, second = tmp_path / "two-ranks", tmp_path / "one-rank"
    first.mkdir(), second.mkdir()
    _spawn(2, {"output": first, "resume": None})
    _assert_equal(first, 2)
    starts = [int(torch.load(first / f"lazy-rank{r}.pt")["class_start"]) for r in range(2)]
    assert starts == [0, 49]  # really sharded: 97 classes over 2 ranks
    _spawn(1, {"output": second, "resume": first})
    _assert_equal(second, 1)
    resumed = torch.load(second / "lazy-rank0.pt")["weight"]
    at_resume = torch.cat([torch.load(first / f"lazy-rank{r}.pt")["weight"] for r in range(2)])
    assert float((resumed - at_resume).abs().max()) > 1e-3  # the resumed run did train on
