"""Process-group set-up, rank helpers and seeding: the trainer's one place for distribution.

The differentiable collectives (all-gather with gradient, distributed cross-entropy) live in `heads.distributed`.
Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from types import FrameType

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from trainer.config import ConfigError

logger = logging.getLogger(__name__)


def build_accelerator(output: str, gradient_accumulation_steps: int, tensorboard: bool) -> Accelerator:
    """The Accelerator for this run; precision and backend come from the `accelerate launch` config file only."""
    kwargs_handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several processes on CPUs. The launcher does not always tell Accelerate so: a torchrun-launched config
        # (`distributed_type: MULTI_GPU`, needed on CPU since MULTI_CPU means mpirun across machines) leaves it
        # at "process 0 of 1, no DDP" unless ACCELERATE_USE_CPU is set, and a DeepSpeed config needs the gloo
        # backend named (shared/notes/accelerate-deepspeed.md). Only when there really are several processes:
        # a one-process run must not try to form a group.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # under DeepSpeed it would switch DeepSpeed off
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=output, logging_dir=os.path.join(output, "tensorboard")),
        kwargs_handlers=kwargs_handlers,
    )


def effective_precision(accelerator: Accelerator) -> str:
    """What the run really computes in. Accelerate keeps `mixed_precision == "fp16"` on a CPU but applies neither
    autocast nor loss scaling there: say so instead of letting a user believe the run is fp16."""
    requested = accelerator.mixed_precision
    if requested == "fp16" and accelerator.device.type == "cpu" and accelerator.distributed_type.value != "DEEPSPEED":
        logger.warning(
            "fp16 was requested, but Accelerate runs fp16 as fp32 on a CPU (no autocast, no loss scaling); "
            "use a bf16 config for mixed precision on CPUs"
        )
        return "fp32 (fp16 requested; ignored on CPU)"
    return {"no": "fp32"}.get(requested, requested)


def check_same_on_every_rank(values: dict[str, object]) -> None:
    """Raise, on every rank, if any value differs between ranks (e.g. one machine launched with another batch size).

    Collective: every rank must call it. A mismatch caught here stops the run before the first step instead of
    deadlocking or silently mis-sharding the classes.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    gathered: list[dict[str, object] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    for key in values:
        per_rank = [g[key] if g is not None else None for g in gathered]
        if any(v != per_rank[0] for v in per_rank):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(per_rank))
            raise ConfigError(f"{key} differs between ranks ({shown}); every process must run the same recipe")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Every rank uses the same seed: the backbone starts identical
    on every rank and the sampler's permutation is shared; per-rank randomness (data augmentation) is derived
    from (seed, rank, worker) in `data.dataset`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM / SIGINT ask the run to stop; every rank stops at the same optimizer-step boundary.

    The handler only sets a flag (nothing unsafe runs inside a signal handler). `requested()` is collective when
    there are several ranks: a MAX all-reduce of the flag, once per optimizer step (a tiny sync point), because a
    scheduler's SIGTERM reaches the ranks at different moments and they must all save the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.flag = True
        logger.warning(
            "received %s: saving a checkpoint at the next step boundary, then exiting", signal.Signals(signum).name
        )

    def requested(self) -> bool:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.flag
