"""The training loop: build everything once, then `train()` reads top to bottom.

The backbone goes through `accelerator.prepare` (DDP, autocast, GradScaler, or a DeepSpeed engine, as the
Accelerate config file says). The Partial FC head stays outside DDP and ZeRO: its class centers are sharded by rank
and must never be averaged across ranks. How an optimizer step covers both (one optimizer with two groups, or the
engine plus a head optimizer) is chosen once, in `trainer.optim`.

Each part is built by the package that owns it, from its section of the recipe: the input pipeline by `data`
(`build_train_input`), the backbone by `models`, the head by `heads`, verification by `evaluation`. The data loader
is not prepared either: its sampler already shards by rank and knows its position inside the epoch, which a resumed
run needs to see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from data import TrainInput, build_train_input
from evaluation.verification import VerificationCallback
from heads import Head, build_head
from models.cli import OutputError
from models.config import build_network
from trainer import checkpoint as ckpt
from trainer.config import (
    STRUCTURAL_KEYS,
    ConfigError,
    ExperimentConfig,
    SpeedConfig,
    flatten,
    save_config,
    to_dict,
)
from trainer.curves import plot_run
from trainer.distributed import (
    StopSignal,
    check_same_on_every_rank,
    check_speed_choices,
    effective_precision,
    seed_everything,
    uses_ddp,
)
from trainer.guard import DivergenceError, DivergenceGuard, all_finite
from trainer.optim import build_stepper, lr_factor, set_lr
from trainer.reporting import ProgressBar, Throughput, print_summary

logger = logging.getLogger(__name__)


def load_pretrained(backbone: nn.Module, path: Path) -> None:
    """Fine-tuning: the backbone's weights from a model.safetensors, or a run or checkpoint folder holding one
    (`models.weights.load_weights_into`: the first missing, unexpected or wrongly shaped key is named)."""
    from models.weights import WeightsError, load_weights_into

    try:
        load_weights_into(backbone, path)
    except WeightsError as exc:
        raise ConfigError(f"network.init_weights: {exc}") from None
    logger.info("backbone initialised from %s", path)


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode (running statistics, no update) whatever `.train()` says later.

    For fine-tuning with frozen statistics, and for exact multi-process equivalence: batch statistics differ
    between one batch of 2B and two ranks' batches of B, running statistics do not. Affine weights still train.
    """
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.register_forward_pre_hook(lambda m, _: setattr(m, "training", False))


def apply_speed(backbone: nn.Module, speed: SpeedConfig, compile_backend: str = "inductor") -> torch.memory_format:
    """`speed.channels_last` and `speed.compile` on a bare backbone, before `accelerator.prepare`; returns the memory
    format its input batches must have. (`bench/gpu_bench.py` goes through here too, with its own backend.)

    Before prepare: DDP's buckets and DeepSpeed's flat buffers are laid out from the parameters' strides, and every
    backend then runs the same compiled module: DDP calls it inside its forward, where dynamo splits the graph at
    DDP's buckets (each bucket's all-reduce still overlaps the backward); a DeepSpeed engine calls it as its module.
    Compiled in place (`nn.Module.compile`): state_dict keys, checkpoints and `unwrap_model` stay as they are, where
    a `torch.compile(module)` wrapper would prefix every key with `_orig_mod.`. Compilation happens at the first
    step, and again at the first evaluation (eval mode, another batch size).
    """
    memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
    backbone.to(memory_format=memory_format)  # type: ignore[call-overload]  # torch's stubs lack memory_format
    if speed.compile:
        backbone.compile(mode=speed.compile_mode, backend=compile_backend)
    return memory_format


def describe_speed(speed: SpeedConfig, accelerator: Accelerator, fused_optimizer: bool) -> str:
    """The resolved speed choices, logged at start."""
    on_off = {True: "on", False: "off"}
    fused = on_off[fused_optimizer]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fused += " (head only; the engine keeps its own)"
    parts = [
        f"channels_last {on_off[speed.channels_last]}",
        f"compile {speed.compile_mode if speed.compile else 'off'}",
        f"fused optimizer {fused}",
    ]
    if uses_ddp(accelerator):
        hook: str = speed.ddp_comm_hook
        if hook == "power_sgd":
            hook += f" (rank {speed.ddp_power_sgd_rank}, after {speed.ddp_power_sgd_warmup_steps} plain steps)"
        view = on_off[speed.ddp_gradient_as_bucket_view]
        parts.append(f"DDP buckets {speed.ddp_bucket_cap_mb} MiB, comm hook {hook}, gradient as bucket view {view}")
    else:
        parts.append("no DDP")
    return ", ".join(parts)


class Trainer:
    """Owns the run's state: step, epoch, sampler position, and the objects that train."""

    def __init__(self, cfg: ExperimentConfig, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.output = Path(cfg.output)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        seed_everything(cfg.train.seed)
        check_speed_choices(cfg.speed, accelerator)
        self.resolve_batch_size()
        self.input = self.build_input()
        self.num_classes = self.input.num_classes
        self.steps_per_epoch, self.total_steps, self.warmup_steps = self.derive_schedule()
        backbone = self.build_backbone()
        self.head = self.build_head()
        # The one place where backends differ: how an optimizer step is taken (trainer/optim.py).
        self.stepper = build_stepper(
            accelerator, backbone, self.head, cfg.optim, cfg.train, lazy_sync_every=cfg.head.lazy_sync_every
        )
        self.backbone = self.stepper.backbone
        self.precision = effective_precision(accelerator)
        self.verification = self.build_verification()

        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.epoch_started = -1  # the epoch the head was last told about (head.start_epoch)
        self.micro_loss, self.micro_step = 0.0, 0
        self.current_lr = 0.0
        self.skipped_at: list[int] = []  # optimizer steps skipped on fp16 overflow
        self.guard = DivergenceGuard(cfg.train.max_bad_steps)
        self.lr_scale, self.rollbacks, self.rolled_back = 1.0, 0, False  # train.on_divergence: rollback
        self.last_saved = -1
        self.last_results: dict[str, Any] = {}
        self.loss_history: list[tuple[int, float]] = []
        # What the run's curves show (trainer.curves): a record per log line and per evaluation.
        self.history: list[dict[str, float]] = []
        logger.info(
            "%s: %d samples, %d classes (%d on this rank), %d processes, %d steps/epoch, %d steps, %d warm-up, "
            "global batch %d, precision %s",
            self.input.source,
            self.input.num_samples,
            self.num_classes,
            self.head.num_local,
            self.world_size,
            self.steps_per_epoch,
            self.total_steps,
            self.warmup_steps,
            self.global_batch,
            self.precision,
        )
        logger.info("speed: %s", describe_speed(cfg.speed, accelerator, cfg.optim.fused))

    # ----------------------------------------------------------------------------------------------------------
    # Builds: each asks the package that owns the part

    def resolve_batch_size(self) -> None:
        """`train.global_batch_size`, when given, decides the per-process batch (written back into the config)."""
        train = self.cfg.train
        if train.global_batch_size:
            per_step = self.world_size * train.gradient_accumulation_steps
            if train.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size={train.global_batch_size} is not divisible by {self.world_size} "
                    f"processes x {train.gradient_accumulation_steps} accumulation steps"
                )
            train.batch_size = train.global_batch_size // per_step

    def build_input(self) -> TrainInput:
        """The input pipeline (data/); every rank must see the same data and settings (checked)."""
        cfg, accelerator = self.cfg, self.accelerator
        with accelerator.main_process_first():  # the generated dataset is written once, then read by every rank
            train_input = build_train_input(
                cfg.data,
                batch_size=cfg.train.batch_size,
                seed=cfg.train.seed,
                rank=self.rank,
                world_size=self.world_size,
                device=accelerator.device,
                bins=list(cfg.eval.bins),
            )
        check_same_on_every_rank(
            {
                "train.batch_size": cfg.train.batch_size,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "train.seed": cfg.train.seed,
                "network": to_dict(cfg.network),
                "head": to_dict(cfg.head),
                "data.num_classes": train_input.num_classes,
                "dataset size": train_input.num_samples,
            }
        )
        if train_input.num_classes < self.world_size:
            raise ConfigError(
                f"data.num_classes={train_input.num_classes} is smaller than the {self.world_size} processes: "
                "every rank needs at least one class center"
            )
        return train_input

    def derive_schedule(self) -> tuple[int, int, int]:
        """(steps per epoch, total steps, warm-up steps): the derived values, computed once."""
        cfg = self.cfg
        micro_batches = len(self.input.sampler) // cfg.train.batch_size
        steps_per_epoch = micro_batches // cfg.train.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} x gradient_accumulation_steps="
                f"{cfg.train.gradient_accumulation_steps} x {self.world_size} processes is more than the "
                f"{self.input.num_samples} samples of the dataset"
            )
        total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch
        return steps_per_epoch, total_steps, int(cfg.schedule.warmup_epochs * steps_per_epoch)

    def build_backbone(self) -> nn.Module:
        """The backbone (models/), with the training-side choices: fine-tuning weights, frozen BatchNorm, speed."""
        network = self.cfg.network
        backbone = build_network(network)
        if network.init_weights:
            load_pretrained(backbone, Path(network.init_weights))
        if network.freeze_batchnorm:
            freeze_batchnorm(backbone)
        self.memory_format = apply_speed(backbone, self.cfg.speed)  # channels_last, compile: before prepare
        return backbone

    def build_head(self) -> Head:
        """This rank's shard of the head (heads/), outside DDP and ZeRO, initialized the same for any rank count."""
        head = build_head(
            self.cfg.head,
            embedding_size=self.cfg.network.embedding_size,
            num_classes=self.num_classes,
            rank=self.rank,
            world_size=self.world_size,
        )
        head.reset_parameters(seed=self.cfg.train.seed)
        head.to(self.accelerator.device)
        return head

    def build_verification(self) -> VerificationCallback | None:
        """`.bin` verification (evaluation/) on the main process; the loop decides when (`eval.every`)."""
        if not (self.input.bins and self.accelerator.is_main_process):
            return None
        return VerificationCallback(self.input.bins, batch_size=self.cfg.eval.batch_size)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps * self.world_size

    # ----------------------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> None:
        start_time, start_step = time.perf_counter(), self.step
        throughput, running = Throughput(), []
        interrupted = False
        enabled = self.accelerator.is_main_process
        with (
            ProgressBar(self.total_steps, self.step, enabled=enabled) as bar,
            StopSignal(self.accelerator.device) as stop,
        ):
            while self.step < self.total_steps and not interrupted:
                if self.epoch_started != self.epoch:
                    self.head.start_epoch(self.epoch)
                    self.epoch_started = self.epoch
                for batch in self.input.batches(self.epoch):
                    images, labels, _ = self.input.to_device(batch, self.stepper.input_dtype(), self.memory_format)
                    loss = self.train_step(images, labels)
                    if loss is None:
                        continue  # inside a gradient-accumulation group
                    if self.rolled_back:
                        break  # every rank went back to the same checkpoint: its data stream restarts there
                    throughput.add(self.global_batch)
                    if math.isfinite(loss):
                        running.append(loss)
                    self.maybe_log(bar, throughput, running)
                    self.maybe_evaluate()
                    interrupted = self.maybe_checkpoint(stop)  # SIGTERM/SIGINT: every rank saves and stops here
                    if interrupted or self.at_end_of_epoch() or self.step >= self.total_steps:
                        break
                if self.rolled_back:
                    self.rolled_back = False
                elif self.at_end_of_epoch() and not interrupted:
                    self.epoch += 1
                    self.input.sampler.set_position(0)
        if interrupted and self.last_saved != self.step:
            self.save()
        elapsed = time.perf_counter() - start_time
        self.finish(elapsed, (self.step - start_step) * self.global_batch, interrupted)

    def at_end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """One micro-batch; returns the loss when it completed an optimizer step, else None."""
        accelerator, stepper = self.accelerator, self.stepper
        if self.micro_step == 0:
            self.guard.begin_step(self.backbone)  # the buffers a bad step must put back
        with accelerator.accumulate(self.backbone):
            self.current_lr = self.lr() * self.lr_scale
            set_lr(stepper.optimizers, self.current_lr)
            with accelerator.autocast():
                embeddings = self.backbone(images)
            loss = self.head(embeddings, labels)  # fp32 inside: softmax over the classes is precision-sensitive
            stepper.before_backward()
            accelerator.backward(loss)  # / gradient_accumulation_steps, x fp16 loss scale; DeepSpeed steps here
            self.micro_loss += loss.item()  # .item() syncs; the loss is already the global batch's
            self.micro_step += 1
            if not accelerator.sync_gradients:
                return None
            outcome = stepper.step(loss_finite=math.isfinite(self.micro_loss))
        self.step += 1
        mean_loss = self.micro_loss / self.cfg.train.gradient_accumulation_steps
        self.micro_loss, self.micro_step = 0.0, 0
        if outcome == "overflow":  # fp16: neither backbone nor head moved; the loss scale was lowered
            self.skipped_at.append(self.step)
            logger.info("step %d skipped: fp16 gradient overflow (loss scale lowered)", self.step)
        elif outcome == "non_finite":
            self.on_bad_step(mean_loss)
        else:
            self.guard.good_step()
        return mean_loss

    def on_bad_step(self, loss: float) -> None:
        """A non-finite step moved nothing (trainer.guard); past `train.max_bad_steps` in a row, stop or roll
        back. Every rank takes the same branch: the loss and the gradient norm are the same on every rank."""
        reason = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradient norm"
        per_step = self.cfg.train.gradient_accumulation_steps * self.cfg.train.batch_size
        keys = self.input.sample_keys(self.epoch, self.position_in_epoch() - per_step, per_step)
        if not self.guard.bad_step(self.backbone, self.step, reason, keys):
            return
        train = self.cfg.train
        limit = f"{self.guard.consecutive} non-finite steps in a row (train.max_bad_steps={train.max_bad_steps})"
        if train.on_divergence == "rollback" and self.rollbacks < train.max_rollbacks:
            found = ckpt.list_checkpoints(self.output)  # every one of them was saved at a good step
            if found:
                self.rollbacks += 1
                self.lr_scale *= train.rollback_lr_factor
                logger.warning(
                    "%s: rolling back to %s with the lr scaled by %g (rollback %d of train.max_rollbacks=%d)",
                    limit,
                    found[-1],
                    self.lr_scale,
                    self.rollbacks,
                    train.max_rollbacks,
                )
                lr_scale, rollbacks, bad_steps = self.lr_scale, self.rollbacks, list(self.guard.bad_steps)
                ckpt.check_resumable(found[-1])  # verified before the run goes back to it
                self.resume(found[-1])
                self.lr_scale, self.rollbacks = lr_scale, rollbacks  # the checkpoint's are older than this decision
                self.guard.bad_steps, self.guard.consecutive = bad_steps, 0
                self.rolled_back = True
                return
        newest = ckpt.list_checkpoints(self.output)
        where = f"the newest checkpoint, {newest[-1]}, is the last good one" if newest else "no checkpoint was saved"
        raise DivergenceError(f"the run diverged at step {self.step}: {limit}; {where}")

    def lr(self) -> float:
        """The schedule is a function of the optimizer step alone: nothing to checkpoint but the step."""
        cfg = self.cfg
        return cfg.optim.lr * lr_factor(
            cfg.schedule, self.step, self.total_steps, self.warmup_steps, self.steps_per_epoch
        )

    def maybe_log(self, bar: ProgressBar, throughput: Throughput, running: list[float]) -> None:
        if not (self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps):
            bar.advance(self.step)
            return
        loss = sum(running) / len(running) if running else math.nan  # nan: every step since the last log was bad
        lr = self.current_lr  # the lr the step just taken used
        speed = throughput.rate()
        self.loss_history.append((self.step, loss))
        self.history.append({"step": self.step, "loss": loss, "lr": lr, "samples_per_second": speed})
        logger.info(
            "step %d/%d epoch %d loss %.4f lr %.6f %.1f samples/s",
            self.step,
            self.total_steps,
            self.epoch,
            loss,
            lr,
            speed,
        )
        self.accelerator.log(
            {
                "loss": loss,
                "lr": lr,
                "samples_per_second": speed,
                "bad_samples": self.input.bad_data.count,  # replaced corrupt images so far (this rank)
                "skipped_steps": len(self.skipped_at),  # fp16 overflows so far
            },
            step=self.step,
        )
        bar.update(self.step, speed, loss, lr)
        running.clear()

    def maybe_evaluate(self) -> None:
        every = self.cfg.eval.every
        due = self.at_end_of_epoch() if every == "epoch" else bool(every) and self.step % every == 0
        if self.verification is None or not (due or self.step == self.total_steps):
            return
        results = self.verification(self.step, self.accelerator.unwrap_model(self.backbone))
        self.last_results = results
        self.history.append({"step": self.step, **{f"val/{name}": r.acc for name, r in results.items()}})
        self.accelerator.log({f"val/{name}": r.acc for name, r in results.items()}, step=self.step)

    def maybe_checkpoint(self, stop: StopSignal) -> bool:
        """Save every `train.save_every` steps, every `train.save_every_minutes`, at the end, and when a signal
        stops the run; return whether it stops. One collective per step (`stop.poll`) settles both the signal and
        the clock, so every rank saves and stops at the same step."""
        every = self.cfg.train.save_every
        interrupted, clock_due = stop.poll(self.step, self.cfg.train.save_every_minutes)
        periodic = clock_due or bool(every) and self.step % every == 0
        if periodic and self.guard.consecutive:
            periodic = False  # during a run of bad steps the newest checkpoint stays the last good step's
        if interrupted or periodic or self.step == self.total_steps:
            self.save()
            stop.restart_clock()
        return interrupted

    # ----------------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": {"position": self.position_in_epoch()},  # samples this rank consumed in this epoch
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "num_classes": self.num_classes,
            "config": {k: v for k, v in flatten(to_dict(self.cfg)).items() if k in STRUCTURAL_KEYS},
            "loss_history": self.loss_history,
            "skipped_steps": len(self.skipped_at),
            "skipped_at": self.skipped_at,
            "history": self.history,
            "input": self.input.state_dict(),  # this rank's bad-sample counts (the main process's are saved)
            "verification": self.verification.state_dict() if self.verification else None,
            "divergence": {**self.guard.state_dict(), "lr_scale": self.lr_scale, "rollbacks": self.rollbacks},
        }

    def position_in_epoch(self) -> int:
        """Samples this rank has consumed in the current epoch (always at an optimizer-step boundary)."""
        steps_in_epoch = self.step - self.epoch * self.steps_per_epoch
        return steps_in_epoch * self.cfg.train.gradient_accumulation_steps * self.cfg.train.batch_size

    def save(self) -> Path:
        backbone = self.accelerator.unwrap_model(self.backbone)
        self.stepper.sync_head_rows()  # head.update lazy: the checkpoint holds every center as dense would have it
        if not (all_finite(backbone) and all_finite(self.head)):  # the guard's promise: never a NaN checkpoint
            raise DivergenceError(f"step {self.step}: the model has non-finite weights; not saving a checkpoint")
        path = ckpt.save_checkpoint(
            self.output,
            step=self.step,
            rank=self.rank,
            world_size=self.world_size,
            barrier=self.accelerator.wait_for_everyone,
            backbone=backbone,
            head=self.head,
            backbone_group=self.stepper.backbone_group,
            head_group=self.stepper.head_group,
            engine=getattr(self.stepper, "engine", None),
            trainer_state=self.state_dict(),
            metadata=ckpt.model_metadata(self.cfg.network.name, self.cfg.network.embedding_size),
            keep=self.cfg.train.keep_checkpoints,
        )
        logger.info("saved checkpoint %s", path)
        self.last_saved = self.step
        return path

    def resume(self, path: Path) -> Path:
        """Continue from the checkpoint folder `path`, already checked complete and verified against its manifest
        (`ckpt.find_resumable` / `ckpt.check_resumable`: hashing a large checkpoint twice costs minutes); refuse one
        made by an incompatible config."""
        saved = ckpt.read_trainer_state(path)
        mine = self.state_dict()
        for key in STRUCTURAL_KEYS:
            if saved["config"].get(key) != mine["config"][key]:
                raise ckpt.CheckpointError(
                    f"cannot resume from {path}: it was made with {key}={saved['config'].get(key)!r}, "
                    f"this run has {key}={mine['config'][key]!r}"
                )
        if saved["num_classes"] != self.num_classes:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it was made with {saved['num_classes']} classes, this run has "
                f"{self.num_classes}"
            )
        state = ckpt.load_checkpoint(
            path,
            rank=self.rank,
            world_size=self.world_size,
            backbone=self.accelerator.unwrap_model(self.backbone),
            head=self.head,
            backbone_group=self.stepper.backbone_group,
            head_group=self.stepper.head_group,
            engine=getattr(self.stepper, "engine", None),
            verify=False,
        )
        self.stepper.head_rows_loaded()
        if self.accelerator.scaler is not None and state["scaler"]:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.loss_history = [tuple(x) for x in state.get("loss_history", [])]
        self.skipped_at = list(state.get("skipped_at", []))
        self.history = list(state.get("history", []))
        # The main process's bad-sample counts and best accuracies (the only ones saved; other ranks count anew).
        if self.accelerator.is_main_process:
            self.input.load_state_dict(state.get("input") or {})
        if self.verification is not None and state.get("verification"):
            self.verification.load_state_dict(state["verification"])
        divergence = state.get("divergence") or {}
        self.guard.load_state_dict(divergence)
        self.lr_scale, self.rollbacks = float(divergence.get("lr_scale", 1.0)), int(divergence.get("rollbacks", 0))
        # Samples already consumed by the whole job this epoch, re-divided over this run's ranks.
        consumed = state["sampler"]["position"] * state["world_size"]
        self.input.sampler.set_epoch(self.epoch)
        self.input.sampler.set_position(consumed // self.world_size)
        if (self.step - self.epoch * self.steps_per_epoch) * self.global_batch != consumed:
            logger.warning("resumed with a different global batch: the epoch's step count is approximate")
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return path

    def finish(self, elapsed: float, samples: int, interrupted: bool = False) -> None:
        accelerator = self.accelerator
        model_path = self.output / "model.safetensors"
        last_checkpoint = self.output / ckpt.CHECKPOINTS / f"step-{self.step:08d}"
        curves = None
        if accelerator.is_main_process:
            if not interrupted:
                # Only a finished run has a model: the final checkpoint's model file (fp32 master weights under
                # DeepSpeed too), copied atomically. An interrupted run's summary points at its checkpoint.
                tmp = model_path.with_name(f".{model_path.name}.tmp")
                try:
                    shutil.copyfile(last_checkpoint / "model.safetensors", tmp)
                    os.chmod(tmp, ckpt.file_mode())
                    os.replace(tmp, model_path)
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    raise OutputError(f"cannot write {model_path}: {exc.strerror}") from None
            curves = plot_run(self.output, self.history, title=f"{self.cfg.network.name}, {self.cfg.head.name}")
        self.input.close()  # the loader's workers
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo may abort the process at exit
        if not accelerator.is_main_process:
            return
        rows = [
            ("network", f"{self.cfg.network.name} ({self.cfg.network.embedding_size}-d)"),
            ("data", f"{self.input.source}: {self.input.num_samples} images, {self.num_classes} classes"),
            ("processes / precision", f"{self.world_size} / {self.precision}"),
            (
                "steps",
                f"{self.step} of {self.total_steps} ({self.epoch} epochs, global batch {self.global_batch})"
                + (" - interrupted: continue with --resume" if interrupted else ""),
            ),
            ("time", f"{elapsed:.1f} s, {samples / max(elapsed, 1e-9):.1f} samples/s"),
        ]
        bad = self.input.bad_data.summary()
        rows.append(
            (
                "bad samples replaced (rank 0)",
                f"{bad['count']}" + (f", keys {bad['keys'][:10]}" if bad["count"] else ""),
            )
        )
        if self.loss_history:
            rows.append(("loss first -> last", f"{self.loss_history[0][1]:.4f} -> {self.loss_history[-1][1]:.4f}"))
        for name, result in self.last_results.items():
            best = self.verification.highest[name] if self.verification else result.acc
            rows.append((f"verification {name}", f"{result.acc:.4f} +- {result.std:.4f} (best {best:.4f})"))
        if interrupted:
            rows.append(("model", f"none yet (interrupted): the newest checkpoint is {last_checkpoint}"))
        else:
            rows.append(("model", str(model_path)))
        rows.append(("curves", str(curves)))
        rows.append(("checkpoints", str(self.output / ckpt.CHECKPOINTS)))
        print_summary(rows)


def run(cfg: ExperimentConfig, accelerator: Accelerator, resume_from: Path | None = None) -> Trainer:
    """Build, resume from `resume_from` if given (trainer/main.py chose it, trainer.runlock), train.

    The resolved config goes to `<output>/config.yaml` only once the resume checks passed: a refused resume leaves
    the folder's config.yaml the one of the run that wrote its checkpoints.
    """
    trainer = Trainer(cfg, accelerator)
    if resume_from is not None:
        trainer.resume(resume_from)
    if accelerator.is_main_process:  # after the Trainer: derived values (batch_size from global_batch_size) included
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output) / "config.yaml")
    from trainer.trackers import start_trackers

    start_trackers(accelerator, cfg)  # train.trackers, if any; the resolved config as hyper-parameters
    if trainer.step >= trainer.total_steps:
        logger.info("nothing to do: step %d of %d", trainer.step, trainer.total_steps)
    trainer.train()
    return trainer
