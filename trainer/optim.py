"""Optimizers, the learning-rate schedule, and how one optimizer step is taken on each backend.

Without DeepSpeed, backbone and head share ONE optimizer (two parameter groups). Why: with fp16, Accelerate's
GradScaler unscales, checks for inf/NaN and skips the step per prepared optimizer; one optimizer means the head is
unscaled and skipped exactly with the backbone, and the scale is updated once per step (two fp16 optimizers would
update it twice).

Under DeepSpeed the backbone's optimizer lives inside the engine (ZeRO partitions it and reduces its gradients);
the class-sharded head must stay out of ZeRO, so it gets its own optimizer. The engine's backward multiplies the
loss by the fp16 loss scale and divides it by the accumulation steps, and the head's gradients share that graph:
`DeepSpeedStep` divides them by the scale that was in force and steps the head only when the engine applied its
step (an fp16 overflow skips both).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from heads.base import Head
from trainer.checkpoint import CheckpointError, GroupRef
from trainer.config import ConfigError, ExperimentConfig, OptimConfig, ScheduleConfig, TrainConfig
from trainer.guard import DivergenceError, StepOutcome
from trainer.row_sgd import RowSGD

logger = logging.getLogger(__name__)


def build_optimizer(
    cfg: OptimConfig, *parts: tuple[nn.Module | Head, float], fused: bool = False
) -> torch.optim.Optimizer:
    """One parameter group per (module, lr scale), in order. Frozen parameters are left out.

    `fused`: one kernel for the whole update instead of several passes over every tensor (less time, and no
    weight-decay temporary the size of the class-center table: it matters at millions of classes).

    A head whose `update` is `lazy` or `sparse` gets SGD's row-wise step (`trainer.row_sgd.RowSGD`, its centers in
    a group of their own, caught up every `head.lazy_sync_every` steps) and the optimizer's catch-up as its row
    sync; `dense` heads and the backbone get torch's. The head owns both settings (`head.update`,
    `head.lazy_sync_every`). AdamW is `dense` only: `trainer.config.validate` refuses the others at load (its step is
    not linear in its state).
    """
    groups: list[dict[str, Any]] = []
    row_heads: list[tuple[Head, nn.Parameter]] = []
    sync_every = 100
    for module, scale in parts:
        rows = getattr(module, "update", "dense")
        if rows == "dense":
            groups.append({"params": _trainable(module.parameters()), "lr_scale": scale})
            continue
        weight = module.weight  # type: ignore[union-attr]
        if [p for p in module.parameters() if p is not weight]:  # one group per part: the steppers index them
            raise ValueError(f"head.update {rows} updates a head's `weight` only; {type(module).__name__} has more")
        groups.append({"params": [weight], "lr_scale": scale, "rows": rows})
        row_heads.append((module, weight))  # type: ignore[arg-type]
        sync_every = int(getattr(module, "lazy_sync_every", sync_every))
    if cfg.name == "sgd":
        optimizer: torch.optim.Optimizer
        if row_heads:
            optimizer = RowSGD(
                groups,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                fused=fused or None,
                sync_every=sync_every,
            )
            for head, weight in row_heads:
                head.set_row_sync(optimizer.row_sync(weight))
            return optimizer
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        )
    betas = (cfg.betas[0], cfg.betas[1])
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, warmup_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based), `cfg.name` after a linear warm-up from 0.

    `progress` runs from 0 at the end of the warm-up to 1 at `total_steps`. polynomial: `(1 - progress) ** power`
    (insightface's PolynomialLRWarmup, power 1 in its HEAD); cosine: `(1 + cos(pi * progress)) / 2`; step:
    `decay_factor ** k`, k the number of `decay_epochs` that `step / steps_per_epoch` epochs have reached.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.name == "step":
        epochs_done = step / max(1, steps_per_epoch)
        return cfg.decay_factor ** sum(epochs_done >= epoch for epoch in cfg.decay_epochs)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** cfg.power


def set_lr(optimizers: Iterable[Any], lr: float) -> None:
    """The schedule is a pure function of the step: set it on every group, times the group's `lr_scale` (no
    scheduler state to checkpoint)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class Schedule:
    """The run's derived step counts, computed once (and logged), and the learning rate of each optimizer step: a
    pure function of the step, so nothing of it is checkpointed."""

    cfg: ScheduleConfig
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def derive(cls, cfg: ExperimentConfig, rank_samples: int, world_size: int, num_samples: int) -> Schedule:
        """From this rank's samples per epoch; a `ConfigError` when not one optimizer step fits an epoch."""
        train = cfg.train
        steps_per_epoch = rank_samples // train.batch_size // train.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={train.batch_size} x gradient_accumulation_steps={train.gradient_accumulation_steps}"
                f" x {world_size} processes is more than the {num_samples} samples of the dataset"
            )
        schedule = cfg.schedule
        total = schedule.max_steps or schedule.epochs * steps_per_epoch
        return cls(schedule, cfg.optim.lr, steps_per_epoch, total, int(schedule.warmup_epochs * steps_per_epoch))

    def lr(self, step: int) -> float:
        return self.base_lr * lr_factor(self.cfg, step, self.total_steps, self.warmup_steps, self.steps_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint records of the schedule (`schedule` entry): compared on resume, never restored."""
        return {"schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A checkpoint past this schedule's last step is refused (it would train nothing and call its old model
        this run's); one made with another schedule is resumed with this run's, and said so."""
        step = int(state["step"])
        if step > self.total_steps:
            raise CheckpointError(
                f"it is at step {step}, past the last step of this run's schedule ({self.total_steps}): raise "
                "schedule.max_steps (or schedule.epochs) to continue it"
            )
        saved = state.get("schedule") or {}
        if saved and (saved.get("total_steps"), saved.get("warmup_steps")) != (self.total_steps, self.warmup_steps):
            logger.warning(
                "the checkpoint was made with a schedule of %s steps (%s warm-up), this run has %d (%d): the learning "
                "rate from step %d on follows this run's",
                *(saved.get("total_steps"), saved.get("warmup_steps"), self.total_steps, self.warmup_steps, step),
            )


class Stepper(Protocol):
    """How one optimizer step over backbone and head is taken on this backend (chosen once, `build_stepper`).

    `backbone` is the prepared backbone (DDP, autocast, or a DeepSpeed engine) and `module` the bare one inside it
    (the same object: what checkpoints save and verification runs); `optimizers` everything the
    schedule sets the lr of; `backbone_group` / `head_group` where each part's parameters sit in their optimizer
    (for checkpoints; no backbone group under DeepSpeed, whose `engine` checkpoints its own partitioned state), and
    `extra_group` that of an extra trained module outside the backbone (distillation's projection), if any.
    The stepper's own run state is the fp16 loss scaler (`scaler` entry of a checkpoint).
    """

    backbone: nn.Module
    module: nn.Module
    optimizers: list[Any]
    backbone_group: GroupRef | None
    head_group: GroupRef
    extra_group: GroupRef | None
    engine: Any | None

    def input_dtype(self) -> torch.dtype:
        """The dtype the backbone's input batches must have."""
        ...

    def before_backward(self) -> None:
        """Called before each micro-batch's backward."""
        ...

    def step(self, loss_finite: bool) -> StepOutcome:
        """At an accumulation boundary: step both parts, or neither (trainer.guard's outcomes)."""
        ...

    def sync_head_rows(self) -> None:
        """Bring every lazily updated center up to date (before a checkpoint, at the end): trainer.row_sgd."""
        ...

    def head_rows_loaded(self) -> None:
        """The head's rows and momentum were just loaded (saved synced): nothing is pending."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class AccelerateStep:
    """DDP / single process: one prepared optimizer, group 0 = backbone, group 1 = head."""

    engine = None

    def __init__(
        self,
        accelerator: Accelerator,
        backbone: nn.Module,
        head: Head,
        cfg: OptimConfig,
        clip_grad_norm: float,
        extra: nn.Module | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.clip_grad_norm = clip_grad_norm
        parts: list[tuple[nn.Module | Head, float]] = [(backbone, cfg.backbone_lr_scale), (head, 1.0)]
        if extra is not None:  # trained like the backbone, outside DDP (it sees the gathered global batch)
            parts.append((extra, cfg.backbone_lr_scale))
        optimizer = build_optimizer(cfg, *parts, fused=cfg.fused)
        # `module` is what accelerator.unwrap_model would return (DDP wraps it, autocast patches its forward),
        # without unwrap_model's import of DeepSpeed (and its log line) in a run that does not use it.
        self.module = backbone
        self.backbone, self.optimizer = accelerator.prepare(backbone, optimizer)
        self.backbone_group: GroupRef | None = (self.optimizer.optimizer, 0)
        self.head_group: GroupRef = (self.optimizer.optimizer, 1)
        self.extra_group: GroupRef | None = (self.optimizer.optimizer, 2) if extra is not None else None
        self.optimizers: list[Any] = [self.optimizer]

    def input_dtype(self) -> torch.dtype:
        return torch.float32  # autocast, if any, casts inside the prepared model

    def sync_head_rows(self) -> None:
        sync_head_rows(self.head_group[0])

    def head_rows_loaded(self) -> None:
        head_rows_loaded(self.head_group[0])

    def before_backward(self) -> None:
        pass

    def step(self, loss_finite: bool) -> StepOutcome:
        """At an accumulation boundary: clip, step, zero; a non-finite loss or gradient norm moves nothing
        (trainer.guard: what counts as non-finite, and why fp16 overflow is apart)."""
        # Unscales every group of the one optimizer (backbone and head) before clipping the backbone's. With
        # clipping off, max_norm=inf only measures the norm (the gradients are multiplied by exactly 1).
        max_norm = self.clip_grad_norm if self.clip_grad_norm > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(self.backbone.parameters(), max_norm)
        scaler = self.accelerator.scaler
        norm_finite = norm is None or bool(torch.isfinite(norm))
        if not loss_finite or (scaler is None and not norm_finite):
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # ends the step the unscale began; lowers the scale if it saw an inf
            return "non_finite"
        self.optimizer.step()  # skipped by the GradScaler on fp16 overflow, for both groups
        self.optimizer.zero_grad(set_to_none=True)  # no zeroing pass; backward writes fresh gradients
        return "overflow" if self.accelerator.optimizer_step_was_skipped else "applied"

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])


class DeepSpeedStep:
    """DeepSpeed ZeRO-1/2: the backbone in the engine, the head beside it with its own optimizer."""

    def __init__(
        self,
        accelerator: Accelerator,
        backbone: nn.Module,
        head: Head,
        cfg: OptimConfig,
        clip_grad_norm: float,
        micro_batch_size: int,
        extra: nn.Module | None = None,
    ) -> None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise ConfigError(
                "DeepSpeed ZeRO-3 is not supported: it would partition the Partial FC head's class centers a second "
                "time and gather the backbone every forward; use ZeRO-1 or ZeRO-2 (ds_configs/zero{1,2}_*.json)"
            )
        # No prepared data loader tells DeepSpeed the micro-batch; the backbone's clipping comes from the recipe.
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = clip_grad_norm
        self.accelerator = accelerator
        self.fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        try:
            optimizer = build_optimizer(cfg, (backbone, cfg.backbone_lr_scale))
            self.module = backbone  # the engine's `module`: cast in place, the same object
            self.backbone, self.optimizer = accelerator.prepare(backbone, optimizer)
        except ValueError as exc:
            if "fp16 is not supported" in str(exc):
                raise ConfigError(
                    "this DeepSpeed config enables fp16, which DeepSpeed does not support on this device (no fp16 "
                    "CPU kernels): use a bf16 DeepSpeed config (ds_configs/zero*_bf16.json)"
                ) from None
            raise
        self.engine: Any | None = self.backbone
        # The engine's optimizer stays unfused; the head's is the trainer's own (RowSGD for head.update lazy/sparse).
        outside: list[tuple[nn.Module | Head, float]] = [(head, 1.0)]
        if extra is not None:
            outside.append((extra, cfg.backbone_lr_scale))
        self.head_optimizer = build_optimizer(cfg, *outside, fused=cfg.fused)
        self.head_params = [p for g in self.head_optimizer.param_groups for p in g["params"]]
        self.backbone_group: GroupRef | None = None  # DeepSpeed checkpoints its own (partitioned) optimizer state
        self.head_group: GroupRef = (self.head_optimizer, 0)
        self.extra_group: GroupRef | None = (self.head_optimizer, 1) if extra is not None else None
        self.optimizers: list[Any] = [self.optimizer, self.head_optimizer]
        self.scale = 1.0

    def input_dtype(self) -> torch.dtype:
        # DeepSpeed casts the parameters, not the inputs; accelerator.autocast() is a no-op under it.
        return torch.float16 if self.fp16 else torch.bfloat16 if self.bf16 else torch.float32

    def sync_head_rows(self) -> None:
        sync_head_rows(self.head_optimizer)

    def head_rows_loaded(self) -> None:
        head_rows_loaded(self.head_optimizer)

    def before_backward(self) -> None:
        # The scale the coming backward multiplies by; engine.step() (inside the boundary backward) may change it.
        assert self.engine is not None
        self.scale = float(getattr(self.engine.optimizer, "cur_scale", 1.0)) if self.fp16 else 1.0

    def step(self, loss_finite: bool) -> StepOutcome:
        """The engine already stepped inside `accelerator.backward`; bring the head along.

        The engine skips a step with non-finite gradients itself under fp16 and under bf16 (its
        `check_grad_overflow`, on by default): the head is then skipped too. An fp32 engine has no such check;
        if it applied a step whose loss was not finite, the backbone is already damaged and the run must stop."""
        assert self.engine is not None
        applied = bool(self.engine.was_step_applied())
        if applied and not loss_finite:
            raise DivergenceError(
                "the DeepSpeed engine applied a step with a non-finite loss (an fp32 engine does not check its "
                "gradients): the run stops without saving; the newest checkpoint is the last one before it"
            )
        if applied:
            if self.scale != 1.0:
                for param in self.head_params:
                    if param.grad is not None:
                        param.grad.div_(self.scale)
            self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        if applied:
            return "applied"
        return "overflow" if self.fp16 and loss_finite else "non_finite"

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": None}  # the engine keeps its loss scale in its own checkpoint files

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def sync_head_rows(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, RowSGD):
        optimizer.sync_rows()


def head_rows_loaded(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, RowSGD):
        optimizer.forget_pending()


def build_stepper(
    accelerator: Accelerator,
    backbone: nn.Module,
    head: Head,
    optim: OptimConfig,
    train: TrainConfig,
    extra: nn.Module | None = None,
) -> Stepper:
    """How this backend takes an optimizer step over backbone, head (and `extra`, a module trained beside them
    outside DDP: distillation's projection): chosen once, here."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedStep(accelerator, backbone, head, optim, train.clip_grad_norm, train.batch_size, extra)
    return AccelerateStep(accelerator, backbone, head, optim, train.clip_grad_norm, extra)
