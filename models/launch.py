"""How an `accelerate launch`ed process joins its process group: the one rule for several processes on CPUs.

The trainer (`trainer.distributed.build_accelerator`) and the multi-process IJB evaluation (`evaluation.ijb`) both
build an `Accelerator` inside a launch; on machines without CUDA they need the same two things, decided here once.
It lives in `models/`, the bottom of the import graph, so `evaluation/` can use it without importing `trainer/`.
Nothing here runs at import time, and `accelerate` is imported only when the rule is applied.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate.utils import KwargsHandler

__all__ = ["process_group_kwargs"]


def process_group_kwargs() -> list[KwargsHandler]:
    """The `Accelerator(kwargs_handlers=...)` entries this launch needs; may set `ACCELERATE_USE_CPU`.

    Several processes (`WORLD_SIZE` > 1) without CUDA: the launcher does not always tell Accelerate so. A
    torchrun-launched config (`distributed_type: MULTI_GPU`, needed on CPU since MULTI_CPU means mpirun across
    machines) leaves it at "process 0 of 1, no DDP" unless `ACCELERATE_USE_CPU` is set, and a DeepSpeed config needs
    the gloo backend named (shared/notes/accelerate-deepspeed.md). Under DeepSpeed `ACCELERATE_USE_CPU` is left
    alone: it would switch DeepSpeed off. Only when there really are several processes: a one-process run must not
    try to form a group. With CUDA, or one process, nothing is needed (an empty list).
    """
    from accelerate.utils import InitProcessGroupKwargs

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _cuda_available():
        return []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return [InitProcessGroupKwargs(backend="gloo")]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
