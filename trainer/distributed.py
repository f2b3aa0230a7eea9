"""Process-group set-up, rank helpers and seeding: the trainer's one place for distribution.

The differentiable collectives (all-gather with gradient, distributed cross-entropy) live in `heads.distributed`.
Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import random

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
        logger.warning("fp16 was requested, but Accelerate runs fp16 as fp32 on a CPU (no autocast, no loss scaling); "
                       "use a bf16 config for mixed precision on CPUs")
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


def rng_state() -> dict[str, object]:
    """This process's RNG states (restored on resume with the same number of ranks)."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    random.setstate(state["python"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]
