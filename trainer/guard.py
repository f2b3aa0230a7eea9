"""The divergence guard: a non-finite step moves nothing, is counted and logged, and too many in a row stop the run.

What "a bad step" is: a non-finite loss (the global batch's, so every rank agrees), or a non-finite backbone
gradient norm (taken after DDP's all-reduce, also the same on every rank) when no fp16 loss scaler is there to
explain it. Under fp16 an infinite gradient with a finite loss is the loss scaler's business (the step is skipped
and the scale lowered: an "overflow", counted separately); a non-finite loss is a bad step in every precision.
Head gradients need no check of their own: with a finite loss, finite embeddings and finite centers they are
finite, and a non-finite embedding shows in the backbone's gradient.

A bad step applies no optimizer update to the backbone or the head, and the backbone's buffers (BatchNorm running
statistics, updated by the forward pass itself) are put back to their values before the step, so the model after
a bad step is exactly the model before it. The step counter still advances, as for an fp16 overflow: the schedule
and the data stream stay aligned with an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from heads.base import Head
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

StepOutcome = Literal["applied", "overflow", "non_finite"]

EXIT_DIVERGED = 3


class DivergenceError(RuntimeError):
    """The run diverged: `train.max_bad_steps` non-finite steps in a row (exit code 3)."""


@dataclass
class DivergenceGuard:
    """Counts bad steps; restores the backbone's buffers after one; says when the run must stop or roll back, and
    keeps the rollbacks' account (how many, the lr scale they left, which checkpoints they went back to)."""

    max_bad_steps: int
    on_divergence: Literal["stop", "rollback"] = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    consecutive: int = 0
    bad_steps: list[int] = field(default_factory=list)  # every bad step of the run (resumed runs included)
    lr_scale: float = 1.0  # the lr multiplier the rollbacks so far left (kept across resumes)
    rollbacks: int = 0
    rolled_back_to: list[int] = field(default_factory=list)  # steps of the checkpoints rollbacks went back to
    _buffers: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def from_config(cls, train: TrainConfig) -> DivergenceGuard:
        return cls(train.max_bad_steps, train.on_divergence, train.rollback_lr_factor, train.max_rollbacks)

    def begin_step(self, backbone: nn.Module) -> None:
        """Remember the backbone's floating-point buffers before the step's first forward pass (a few KiB to MiB:
        BatchNorm statistics)."""
        self._buffers = [b.detach().clone() for b in self._float_buffers(backbone)]

    def bad_step(self, backbone: nn.Module, step: int, reason: str, keys: list[int]) -> bool:
        """Undo the forward pass's buffer updates, count and log the step; True when the streak reached the limit."""
        with torch.no_grad():
            for buffer, saved in zip(self._float_buffers(backbone), self._buffers, strict=True):
                buffer.copy_(saved)
        self.consecutive += 1
        self.bad_steps.append(step)
        shown = ", ".join(map(str, keys[:16])) + (", ..." if len(keys) > 16 else "")
        logger.warning(
            "step %d skipped: %s (%d in a row, limit train.max_bad_steps=%d); this rank's samples: %s",
            step,
            reason,
            self.consecutive,
            self.max_bad_steps,
            shown,
        )
        return self.consecutive >= self.max_bad_steps

    def good_step(self) -> None:
        self.consecutive = 0

    def rollback_target(self, step: int, checkpoints: list[int]) -> int | None:
        """The checkpoint step a rollback at `step` goes back to, or None when the run must stop.

        Only checkpoints saved before the streak began qualify, and never one that an earlier rollback already went
        back to: diverging again from it (at any lr) means its weights are already damaged, so the rollback goes
        back further, or the run stops. At most `max_rollbacks` rollbacks, and only with `on_divergence: rollback`.
        """
        if self.on_divergence != "rollback" or self.rollbacks >= self.max_rollbacks:
            return None
        first_bad = step - self.consecutive + 1
        usable = [s for s in checkpoints if s < first_bad and s not in self.rolled_back_to]
        return max(usable) if usable else None

    def roll_back(self, to_step: int) -> None:
        """Account for a rollback to the checkpoint of `to_step`: lr x `rollback_lr_factor`, the streak ends."""
        self.rollbacks += 1
        self.lr_scale *= self.rollback_lr_factor
        self.rolled_back_to.append(to_step)
        self.consecutive = 0

    def where_to_go_back(self, checkpoints: Mapping[int, Path]) -> str:
        """For the error that ends a diverged run: which checkpoint to continue from, told as it is (a checkpoint
        saved before the first non-finite step has finite weights, which may still be far off)."""
        if not checkpoints:
            return "no checkpoint was saved"
        newest = max(checkpoints)
        if newest in self.rolled_back_to:
            return (
                f"the run diverged again after rolling back to {checkpoints[newest]}, and no older checkpoint is left "
                "to go back to: lower optim.lr"
            )
        return (
            f"the newest checkpoint, {checkpoints[newest]}, was saved at step {newest}, before the first non-finite "
            "step (its weights are finite; its loss says whether they are still good)"
        )

    @staticmethod
    def _float_buffers(backbone: nn.Module) -> list[torch.Tensor]:
        return [b for b in backbone.buffers() if b.is_floating_point()]

    def state_dict(self) -> dict[str, Any]:
        """The `divergence` entry of a checkpoint."""
        return {
            "divergence": {
                "bad_steps": list(self.bad_steps),
                "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks,
                "rolled_back_to": list(self.rolled_back_to),
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("divergence") or {}
        steps = saved.get("bad_steps", [])
        self.bad_steps = [int(s) for s in steps] if isinstance(steps, list) else []
        self.lr_scale, self.rollbacks = float(saved.get("lr_scale", 1.0)), int(saved.get("rollbacks", 0))
        self.rolled_back_to = [int(s) for s in saved.get("rolled_back_to", [])]
        self.consecutive = 0


def all_finite(module: nn.Module | Head) -> bool:
    """Whether every parameter and floating-point buffer of `module` is finite (checked before a save)."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
