"""Process-group set-up, rank helpers and seeding: the trainer's one place for distribution.

The differentiable collectives (all-gather with gradient, distributed cross-entropy) live in `heads.distributed`.
Nothing here runs at import time.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration


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
