"""Prints the rank / world size Accelerate reports: `plain` (Accelerator()) or `ours` (the trainer's builder)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from accelerate import Accelerator

from trainer.distributed import build_accelerator

if sys.argv[1] == "plain":
    accelerator = Accelerator()
else:
    accelerator = build_accelerator("/tmp/probe-ranks", 1)
print(
    f"{sys.argv[1]} rank={accelerator.process_index} world={accelerator.num_processes} "
    f"env_world={os.environ['WORLD_SIZE']}",
    flush=True,
)
if dist.is_initialized():
    dist.destroy_process_group()
