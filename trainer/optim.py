"""Optimizer and learning-rate schedule.

Backbone and head share ONE optimizer (two parameter groups). Why: with fp16, Accelerate's GradScaler unscales,
checks for inf/NaN and skips the step per prepared optimizer; one optimizer means the head is unscaled and skipped
exactly with the backbone, and the scale is updated once per step (two fp16 optimizers would update it twice).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """Group 0: backbone, group 1: head (rank-local class centers). Frozen parameters are left out."""
    groups = [
        {"params": _trainable(backbone.parameters()), "name": "backbone"},
        {"params": _trainable(head.parameters()), "name": "head"},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up from 0, then
    `(1 - progress) ** power` decay to 0 at `total_steps` (insightface's PolyScheduler)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (1.0 - progress) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, warmup_steps: int
) -> LambdaLR:
    """Stepped once per optimizer step (not per micro-batch)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg.power))
