"""The training loop: build everything once, then `train()` reads top to bottom.

The backbone goes through `accelerator.prepare` (DDP, autocast, GradScaler, or a DeepSpeed engine, as the
Accelerate config file says). The Partial FC head stays outside DDP and ZeRO: its class centers are sharded by rank
and must never be averaged across ranks. How an optimizer step covers both is chosen once (`trainer.optim`).

Each part is built by the package that owns it, from its section of the recipe (data, models, heads, evaluation;
`trainer.backbone` adds the training-side choices, `trainer.distill` a teacher). The run's state lives in its parts
(`trainer.state`), which one `Checkpointer` saves, loads and rolls back; one `RunFolder` names every path.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from data import TrainInput, build_train_input
from heads import Head, build_head
from models.run_folder import RunFolder
from trainer.backbone import build_backbone
from trainer.checkpoint import Checkpointer, model_metadata
from trainer.config import ExperimentConfig, resolve_batch_size
from trainer.distill import build_distillation
from trainer.distributed import StopSignal, check_same_run_on_every_rank, effective_precision, seed_everything
from trainer.faults import RunStopped, data_worker_fault
from trainer.guard import DivergenceError, DivergenceGuard
from trainer.optim import Schedule, build_stepper, set_lr
from trainer.reporting import ProgressBar, RunLog, Throughput, describe_run, finish_run
from trainer.state import Nested, RunIdentity, SamplerPosition, Stateful, TrainState
from trainer.verify import build_verification, evaluate

logger = logging.getLogger(__name__)


class Trainer:
    """Builds the run's parts, then trains: `train()` calls `train_step`, `maybe_log`, `maybe_evaluate`,
    `maybe_checkpoint`."""

    def __init__(self, cfg: ExperimentConfig, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.folder = RunFolder(cfg.output)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        seed_everything(cfg.train.seed)
        resolve_batch_size(cfg.train, self.world_size)
        self.input = self.build_input()
        self.num_classes = self.input.num_classes
        self.schedule = Schedule.derive(cfg, len(self.input.sampler), self.world_size, self.input.num_samples)
        # `.bin` verification (evaluation/) on the main process, its files loaded and checked now (trainer.verify)
        self.verification = build_verification(self.input.bins, cfg.eval.batch_size)
        backbone, self.memory_format = build_backbone(cfg.network, cfg.speed, accelerator)
        self.head = self.build_head()
        self.distill = build_distillation(cfg, self.folder, self.input, accelerator)  # None without a teacher
        projection = self.distill.projection if self.distill is not None else None
        self.stepper = build_stepper(accelerator, backbone, self.head, cfg.optim, cfg.train, projection)
        self.backbone = self.stepper.backbone  # prepared: DDP, autocast, or the DeepSpeed engine
        self.precision = effective_precision(accelerator)
        self.state = TrainState(self.schedule.steps_per_epoch)
        self.guard = DivergenceGuard.from_config(cfg.train)
        self.log = RunLog(self.state, self.folder, accelerator)
        self.checkpointer = self.build_checkpointer()
        self.micro_loss, self.micro_step, self.current_lr = 0.0, 0, 0.0
        self.epoch_started, self.last_saved, self.rolled_back = -1, -1, False
        self.last_results: dict[str, Any] = {}
        self.fault: RunStopped | None = None  # a failure outside the step on this rank (trainer.faults)
        self.stopped_by: RunStopped | None = None  # the one every rank stopped for
        describe_run(self)

    # ----------------------------------------------------------------------------------------------------------
    # Builds: each asks the package that owns the part

    def build_input(self) -> TrainInput:
        """The input pipeline (data/); every rank must see the same data and settings (checked)."""
        cfg = self.cfg
        with self.accelerator.main_process_first():  # the generated dataset is written once, then read by all
            train_input = build_train_input(
                cfg.data,
                batch_size=cfg.train.batch_size,
                seed=cfg.train.seed,
                rank=self.rank,
                world_size=self.world_size,
                device=self.accelerator.device,
                bins=list(cfg.eval.bins),
            )
        check_same_run_on_every_rank(cfg, train_input.num_classes, train_input.num_samples)
        return train_input

    def build_head(self) -> Head:
        """This rank's shard of the head (heads/), outside DDP and ZeRO, initialized the same for any rank count."""
        cfg = self.cfg
        head = build_head(
            cfg.head,
            embedding_size=cfg.network.embedding_size,
            num_classes=self.num_classes,
            rank=self.rank,
            world_size=self.world_size,
        )
        head.reset_parameters(seed=cfg.train.seed)
        head.to(self.accelerator.device)
        return head

    def build_checkpointer(self) -> Checkpointer:
        """The run's stateful parts, in load order (trainer.state), and the one checkpointer over them."""
        main = self.accelerator.is_main_process
        parts: dict[str, Stateful | None] = {
            "identity": RunIdentity(self.cfg, self.num_classes),
            "schedule": self.schedule,
            "train": self.state,
            "sampler": SamplerPosition(self.state, self.input, self.samples_per_step, self.world_size),
            "input": Nested("input", self.input, load=main),
            "verification": Nested("verification", self.verification),
            "divergence": self.guard,
            "stepper": self.stepper,
            "distill": self.distill,  # (None without a teacher) its cache's new entries go with each checkpoint
        }
        return Checkpointer(
            self.folder,
            rank=self.rank,
            world_size=self.world_size,
            barrier=self.accelerator.wait_for_everyone,
            backbone=lambda: self.stepper.module,
            head=self.head,
            stepper=self.stepper,
            parts=parts,
            metadata=model_metadata(self.cfg.network.name, self.cfg.network.embedding_size),
            keep=self.cfg.train.keep_checkpoints,
            extra=self.distill.modules() if self.distill is not None else None,  # never in model.safetensors
        )

    @property
    def samples_per_step(self) -> int:
        """This rank's samples per optimizer step."""
        return self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps

    @property
    def global_batch(self) -> int:
        return self.samples_per_step * self.world_size

    # ----------------------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> None:
        state, total = self.state, self.schedule.total_steps
        start_time, start_step = time.perf_counter(), state.step
        throughput, running, interrupted = Throughput(), [], False
        shown = self.accelerator.is_main_process and state.step < total
        with ProgressBar(total, state.step, enabled=shown) as bar, StopSignal(self.accelerator.device) as stop:
            while state.step < total and not interrupted:
                if self.epoch_started != state.epoch:
                    self.start_epoch(state.epoch)
                for batch in self.input.batches(state.epoch):
                    images, labels, bad = self.input.to_device(batch, self.stepper.input_dtype(), self.memory_format)
                    loss = self.train_step(images, labels, bad)
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
                    if interrupted or state.at_end_of_epoch() or state.step >= total:
                        break
                if self.rolled_back:
                    self.rolled_back = False
                elif state.at_end_of_epoch() and not interrupted:
                    state.epoch += 1
                    self.input.sampler.set_position(0)
        if interrupted and self.last_saved != state.step:
            self.save()
        finish_run(self, time.perf_counter() - start_time, (state.step - start_step) * self.global_batch, interrupted)
        if self.stopped_by is not None:  # every rank saved this step; main.py turns it into its exit code
            raise self.stopped_by.saved(str(self.folder.checkpoint(state.step).path))

    def start_epoch(self, epoch: int) -> None:
        self.head.start_epoch(epoch)  # sub-centers dropped, a scheduled sample rate
        if self.distill is not None:
            self.distill.start_epoch(self.accelerator.wait_for_everyone)  # every rank's new cache entries
        self.epoch_started = epoch

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, bad: torch.Tensor | None = None) -> float | None:
        """One micro-batch (`bad`: the keys of samples the loader replaced, -1 elsewhere); returns the loss when it
        completed an optimizer step, else None."""
        accelerator, stepper = self.accelerator, self.stepper
        if self.micro_step == 0:
            self.guard.begin_step(self.backbone)  # the buffers a bad step must put back
        with accelerator.accumulate(self.backbone):
            self.current_lr = self.schedule.lr(self.state.step) * self.guard.lr_scale
            set_lr(stepper.optimizers, self.current_lr)
            with accelerator.autocast():
                embeddings = self.backbone(images)
            loss = self.head(embeddings, labels)  # fp32 inside: softmax over the classes is precision-sensitive
            if self.distill is not None:  # which samples these are: this rank's next ones in the epoch
                position = self.state.steps_in_epoch * self.samples_per_step + self.micro_step * len(labels)
                samples = self.input.batch_samples(self.state.epoch, position, len(labels))
                loss = self.distill.total(loss, embeddings, images, samples, bad)
            stepper.before_backward()
            accelerator.backward(loss)  # / gradient_accumulation_steps, x fp16 loss scale; DeepSpeed steps here
            self.micro_loss += loss.item()  # .item() syncs; the loss is already the global batch's
            self.micro_step += 1
            if not accelerator.sync_gradients:
                return None
            outcome = stepper.step(loss_finite=math.isfinite(self.micro_loss))
        self.state.step += 1
        mean_loss = self.micro_loss / self.cfg.train.gradient_accumulation_steps
        self.micro_loss, self.micro_step = 0.0, 0
        if outcome == "overflow":  # fp16: neither backbone nor head moved; the loss scale was lowered
            self.state.skipped_at.append(self.state.step)
            logger.info("step %d skipped: fp16 gradient overflow (loss scale lowered)", self.state.step)
        elif outcome == "non_finite":
            self.on_bad_step(mean_loss)
        else:
            self.guard.good_step()
        return mean_loss

    def on_bad_step(self, loss: float) -> None:
        """A non-finite step moved nothing (trainer.guard); past `train.max_bad_steps` in a row, roll back or stop.
        Every rank takes the same branch: the loss and the gradient norm are the same on every rank."""
        step, reason = self.state.step, (f"loss {loss}" if not math.isfinite(loss) else "non-finite gradient norm")
        position = self.state.steps_in_epoch * self.samples_per_step
        keys = self.input.sample_keys(self.state.epoch, position - self.samples_per_step, self.samples_per_step)
        if not self.guard.bad_step(self.backbone, step, reason, keys):
            return
        limit = f"{self.guard.consecutive} non-finite steps in a row (train.max_bad_steps={self.guard.max_bad_steps})"
        saved = {c.step: c.path for c in self.folder.complete_checkpoints() if c.step is not None}
        target = self.guard.rollback_target(step, sorted(saved))
        if target is not None:
            self.guard.roll_back(target)
            logger.warning(
                "%s: rolling back to %s with the lr scaled by %g (rollback %d of train.max_rollbacks=%d)",
                *(limit, saved[target], self.guard.lr_scale, self.guard.rollbacks, self.guard.max_rollbacks),
            )
            self.checkpointer.load(saved[target], keep=("divergence",), verify=True)  # the guard's account is newer
            self.rolled_back = True
            return
        raise DivergenceError(f"the run diverged at step {step}: {limit}; {self.guard.where_to_go_back(saved)}")

    def maybe_log(self, bar: ProgressBar, throughput: Throughput, running: list[float]) -> None:
        step = self.state.step
        if not (step % self.cfg.train.log_every == 0 or step == self.schedule.total_steps):
            bar.advance(step)
            return
        loss = sum(running) / len(running) if running else math.nan  # nan: every step since the last log was bad
        speed = throughput.rate()
        logger.info(
            "step %d/%d epoch %d loss %.4f lr %.6f %.1f samples/s",
            *(step, self.schedule.total_steps, self.state.epoch, loss, self.current_lr, speed),
        )
        self.log.record(
            step,
            {"loss": loss, "lr": self.current_lr, "samples_per_second": speed},
            # Only for the trackers: replaced corrupt images so far (this rank), fp16 overflows so far.
            trackers_only={"bad_samples": self.input.bad_data.count, "skipped_steps": len(self.state.skipped_at)},
        )
        bar.update(step, speed, loss, self.current_lr)
        running.clear()

    def maybe_evaluate(self) -> None:
        every, step = self.cfg.eval.every, self.state.step
        due = self.state.at_end_of_epoch() if every == "epoch" else bool(every) and step % every == 0
        if self.verification is None or not (due or step == self.schedule.total_steps):
            return
        outcome = evaluate(self.verification, step, self.stepper.module, self.folder.log)
        if isinstance(outcome, RunStopped):
            self.fault = outcome  # every rank saves this step and stops (maybe_checkpoint)
            return
        self.last_results = outcome
        self.log.record(step, {f"val/{name}": r.acc for name, r in self.last_results.items()})

    def maybe_checkpoint(self, stop: StopSignal) -> bool:
        """Save every `train.save_every` steps, every `train.save_every_minutes`, at the end, and when a signal or a
        failure outside the step (trainer.faults) stops the run; return whether it stops. One collective per step
        (`stop.poll`) settles the signal, the failure and the clock, so every rank saves and stops at the same step."""
        step, every = self.state.step, self.cfg.train.save_every
        fault = self.fault or data_worker_fault(self.input, self.rank)
        interrupted, clock_due, self.stopped_by = stop.poll(step, self.cfg.train.save_every_minutes, fault)
        periodic = clock_due or bool(every) and step % every == 0
        if periodic and self.guard.consecutive:
            periodic = False  # during a run of bad steps the newest checkpoint stays the last good step's
        if interrupted or periodic or step == self.schedule.total_steps:
            self.save()
            stop.restart_clock()
        return interrupted

    def save(self) -> Path:
        path = self.checkpointer.save(self.state.step)
        self.last_saved = self.state.step
        return path

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint folder `path` (already checked complete and verified: `plan_run`)."""
        self.checkpointer.load(path)
        logger.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
