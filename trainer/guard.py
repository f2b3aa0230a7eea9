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
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.base import Head

logger = logging.getLogger(__name__)

StepOutcome = Literal["applied", "overflow", "non_finite"]

EXIT_DIVERGED = 3


class DivergenceError(RuntimeError):
    """The run diverged: `train.max_bad_steps` non-finite steps in a row (exit code 3)."""


@dataclass
class DivergenceGuard:
    """Counts bad steps; restores the backbone's buffers after one; says when the run must stop or roll back."""

    max_bad_steps: int
    consecutive: int = 0
    bad_steps: list[int] = field(default_factory=list)  # every bad step of the run (resumed runs included)
    _buffers: list[torch.Tensor] = field(default_factory=list)

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

    @staticmethod
    def _float_buffers(backbone: nn.Module) -> list[torch.Tensor]:
        return [b for b in backbone.buffers() if b.is_floating_point()]

    def state_dict(self) -> dict[str, object]:
        return {"bad_steps": list(self.bad_steps)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        steps = state.get("bad_steps", [])
        self.bad_steps = [int(s) for s in steps] if isinstance(steps, list) else []


def all_finite(module: nn.Module | Head) -> bool:
    """Whether every parameter and floating-point buffer of `module` is finite (checked before a save)."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
