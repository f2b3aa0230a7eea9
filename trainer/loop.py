"""The training loop: build everything once, then `train()` reads top to bottom.

The backbone goes through `accelerator.prepare` (DDP, autocast, GradScaler, or a DeepSpeed engine, as the
Accelerate config file says). The Partial FC head stays outside DDP and ZeRO: its class centers are sharded by rank
and must never be averaged across ranks. How an optimizer step covers both (one optimizer with two groups, or the
engine plus a head optimizer) is chosen once, in `trainer.optim`.

The data loader is not prepared either: `DistributedEpochSampler` already shards by rank and knows its position
inside the epoch, which a resumed run needs to see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.dataset import (
    BadDataTracker,
    DistributedEpochSampler,
    FaceDataset,
    RecordFaceDataset,
    collate_faces,
    normalize_images,
    seed_worker,
)
from data.image_folder import ImageFolderDataset
from data.loader import FaceLoader
from data.synthetic import SyntheticDataset
from heads import build_head
from models import build_backbone
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
from trainer.distributed import (
    StopSignal,
    check_same_on_every_rank,
    check_speed_choices,
    effective_precision,
    seed_everything,
    uses_ddp,
)
from trainer.optim import AccelerateStep, DeepSpeedStep, lr_factor, set_lr
from trainer.reporting import ProgressBar, Throughput, print_summary

logger = logging.getLogger(__name__)


def build_dataset(cfg: ExperimentConfig) -> tuple[Any, int, list[str]]:
    """(dataset, num_classes, verification .bin paths) for `cfg.data.source`. Images come out as uint8 (normalized
    on the device, 4x fewer bytes between processes) or, with `data.decode: gpu`, still JPEG-encoded."""
    data = cfg.data
    bins = list(cfg.eval.bins)
    num_classes = data.num_classes or None
    if data.source == "synthetic":
        return SyntheticDataset(data.num_images, data.num_classes, seed=cfg.train.seed), data.num_classes, bins
    if data.source == "image_folder":
        folder = ImageFolderDataset(data.root, num_classes=num_classes, random_flip=data.random_flip, output="uint8")
        return folder, folder.num_classes, bins
    if data.source == "generated":
        from data.faces import ensure_dataset

        root = ensure_dataset(data.generated)
        bins.append(str(root / "val.bin"))
    else:
        root = Path(data.root)
    dataset: Any
    if data.decode == "gpu":
        from data.gpu_decode import JpegRecordDataset

        dataset = JpegRecordDataset(root, num_classes=num_classes, random_flip=data.random_flip)
    else:
        dataset = RecordFaceDataset(root, num_classes=num_classes, random_flip=data.random_flip, output="uint8")
    return dataset, dataset.num_classes, bins


def build_loader(
    cfg: ExperimentConfig, dataset: Dataset, sampler: DistributedEpochSampler, device: torch.device
) -> FaceLoader | DataLoader:
    """Face images decoded on the CPU go through `data.loader.FaceLoader` (batch slots in shared memory, allocated
    once: about twice DataLoader's images/s per worker, docs/benchmarks.md); the synthetic source and GPU decoding
    (which ships JPEG bytes, not pixels) through DataLoader. Both yield the same batches for the same sampler.

    On a GPU the random flip is left to the device, where it is one pass with the normalization, and the workers
    only read and decode; on a CPU device a worker flips the uint8 image more cheaply than the device the float
    one (measured in docs/benchmarks.md)."""
    data = cfg.data
    if isinstance(dataset, FaceDataset) and data.decode == "cpu":
        return FaceLoader(
            dataset,
            cfg.train.batch_size,
            sampler,
            num_workers=data.num_workers,
            prefetch=data.prefetch,
            pin_memory=data.pin_memory,
            flip_on_device=device.type == "cuda",
        )
    collate: Callable[..., Any] = collate_faces
    if data.decode == "gpu":
        from data.gpu_decode import collate_jpeg

        collate = collate_jpeg
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        prefetch_factor=data.prefetch if data.num_workers else None,
        drop_last=True,
        persistent_workers=data.num_workers > 0,
    )


def load_pretrained(backbone: nn.Module, path: Path) -> None:
    """Fine-tuning: the backbone's weights from a model.safetensors; any key or shape mismatch is named."""
    from evaluation.verification import WeightsError, load_weights

    try:
        state, _ = load_weights(path)
    except WeightsError as exc:
        raise ConfigError(f"network.init_weights: {exc}") from None
    own = backbone.state_dict()
    problems = sorted(set(own) ^ set(state)) + sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if problems:
        raise ConfigError(f"network.init_weights: {path} does not fit this network: {', '.join(problems[:5])}")
    backbone.load_state_dict(state, strict=True)
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
        if cfg.train.global_batch_size:
            per_step = self.world_size * cfg.train.gradient_accumulation_steps
            if cfg.train.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {self.world_size} "
                    f"processes x {cfg.train.gradient_accumulation_steps} accumulation steps"
                )
            cfg.train.batch_size = cfg.train.global_batch_size // per_step

        if cfg.data.decode == "gpu" and accelerator.device.type != "cuda":
            raise ConfigError(f"data.decode 'gpu' needs a CUDA device; this run is on {accelerator.device.type}")
        check_speed_choices(cfg.speed, accelerator)
        with accelerator.main_process_first():  # the generated dataset is written once, then read by every rank
            self.dataset, self.num_classes, bins = build_dataset(cfg)
        check_same_on_every_rank(
            {
                "train.batch_size": cfg.train.batch_size,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "train.seed": cfg.train.seed,
                "network": to_dict(cfg.network),
                "head": to_dict(cfg.head),
                "data.num_classes": self.num_classes,
                "dataset size": len(self.dataset),
            }
        )
        if self.num_classes < self.world_size:
            raise ConfigError(
                f"data.num_classes={self.num_classes} is smaller than the {self.world_size} processes: "
                "every rank needs at least one class center"
            )
        self.sampler = DistributedEpochSampler(
            len(self.dataset), rank=self.rank, world_size=self.world_size, seed=cfg.train.seed, with_seeds=True
        )
        self.loader = build_loader(cfg, self.dataset, self.sampler, accelerator.device)
        self.bad_data = BadDataTracker(
            cfg.data.max_bad_fraction, source=getattr(self.dataset, "source", cfg.data.source)
        )
        micro_batches = len(self.sampler) // cfg.train.batch_size
        self.steps_per_epoch = micro_batches // cfg.train.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} x gradient_accumulation_steps="
                f"{cfg.train.gradient_accumulation_steps} x {self.world_size} processes is more than the "
                f"{len(self.dataset)} samples of the dataset"
            )
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch

        backbone = build_backbone(
            cfg.network.name, num_features=cfg.network.embedding_size, dropout=cfg.network.dropout
        )
        if cfg.network.init_weights:
            load_pretrained(backbone, Path(cfg.network.init_weights))
        if cfg.network.freeze_batchnorm:
            freeze_batchnorm(backbone)
        self.memory_format = apply_speed(backbone, cfg.speed)  # channels_last, compile: before prepare
        self.head = build_head(
            cfg.head,
            embedding_size=cfg.network.embedding_size,
            num_classes=self.num_classes,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.head.reset_parameters(seed=cfg.train.seed)  # the same centers for any number of ranks
        self.head.to(accelerator.device)
        # The one place where backends differ: how an optimizer step is taken (trainer/optim.py).
        self.stepper: AccelerateStep | DeepSpeedStep
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.stepper = DeepSpeedStep(
                accelerator, backbone, self.head, cfg.optim, cfg.train.clip_grad_norm, cfg.train.batch_size
            )
        else:
            self.stepper = AccelerateStep(accelerator, backbone, self.head, cfg.optim, cfg.train.clip_grad_norm)
        self.backbone = self.stepper.backbone
        self.warmup_steps = int(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.precision = effective_precision(accelerator)

        self.verification = None
        if bins and accelerator.is_main_process:
            from evaluation.verification import VerificationCallback

            # The loop decides when to evaluate (every `eval.every` steps and at the end).
            self.verification = VerificationCallback(bins, every_steps=1, batch_size=cfg.eval.batch_size)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.micro_loss = 0.0
        self.current_lr = 0.0
        self.skipped_at: list[int] = []  # optimizer steps skipped on fp16 overflow
        self.last_saved = -1
        self.last_results: dict[str, Any] = {}
        self.loss_history: list[tuple[int, float]] = []
        logger.info(
            "%s: %d samples, %d classes (%d on this rank), %d processes, %d steps/epoch, %d steps, %d warm-up, "
            "global batch %d, precision %s",
            cfg.data.source,
            len(self.dataset),
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
                self.sampler.set_epoch(self.epoch)
                for batch in self.loader:
                    images, labels, bad_keys = self.to_device(batch)
                    self.bad_data.update(bad_keys)  # a corrupt image was replaced; too many stop the run
                    loss = self.train_step(images, labels)
                    if loss is None:
                        continue  # inside a gradient-accumulation group
                    throughput.add(self.global_batch)
                    running.append(loss)
                    self.maybe_log(bar, throughput, running)
                    self.maybe_evaluate()
                    self.maybe_checkpoint()
                    interrupted = stop.requested()  # SIGTERM/SIGINT: every rank stops at this step
                    if interrupted or self.step >= self.total_steps or self.step % self.steps_per_epoch == 0:
                        break
                if self.step % self.steps_per_epoch == 0 and not interrupted:
                    self.epoch += 1
                    self.sampler.set_position(0)
        if interrupted and self.last_saved != self.step:
            self.save()
        elapsed = time.perf_counter() - start_time
        self.finish(elapsed, (self.step - start_step) * self.global_batch, interrupted)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """One micro-batch; returns the loss when it completed an optimizer step, else None."""
        accelerator, stepper = self.accelerator, self.stepper
        with accelerator.accumulate(self.backbone):
            self.current_lr = self.lr()
            set_lr(stepper.optimizers, self.current_lr)
            with accelerator.autocast():
                embeddings = self.backbone(images)
            loss = self.head(embeddings, labels)  # fp32 inside: softmax over the classes is precision-sensitive
            stepper.before_backward()
            accelerator.backward(loss)  # / gradient_accumulation_steps, x fp16 loss scale; DeepSpeed steps here
            self.micro_loss += loss.item()  # .item() syncs; the loss is already the global batch's
            if not accelerator.sync_gradients:
                return None
            applied = stepper.step()
        self.step += 1
        if not applied:  # fp16 overflow: neither backbone nor head moved; the loss scale was lowered
            self.skipped_at.append(self.step)
            logger.info("step %d skipped: fp16 gradient overflow (loss scale lowered)", self.step)
        mean_loss = self.micro_loss / self.cfg.train.gradient_accumulation_steps
        self.micro_loss = 0.0
        return mean_loss

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images normalized on the device in the backbone's input dtype and memory format, labels, bad keys on the
        CPU)."""
        device, dtype = self.accelerator.device, self.stepper.input_dtype()
        if self.cfg.data.decode == "gpu":
            from data.gpu_decode import decode_batch

            images, labels, bad_keys = decode_batch(batch, device, dtype)
            return images.contiguous(memory_format=self.memory_format), labels, bad_keys
        images, labels, bad_keys, *flips = batch  # FaceLoader adds the flips it left to the device
        images = images.to(device, non_blocking=True)
        images = normalize_images(images, dtype, self.memory_format, flips[0] if flips else None)
        return images, labels.to(device, non_blocking=True), bad_keys

    def lr(self) -> float:
        """The schedule is a function of the optimizer step alone: nothing to checkpoint but the step."""
        cfg = self.cfg
        return cfg.optim.lr * lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.schedule.power)

    def maybe_log(self, bar: ProgressBar, throughput: Throughput, running: list[float]) -> None:
        loss = sum(running) / len(running)
        lr = self.current_lr  # the lr the step just taken used
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
            speed = throughput.rate()
            self.loss_history.append((self.step, loss))
            logger.info(
                "step %d/%d epoch %d loss %.4f lr %.6f %.1f samples/s",
                self.step,
                self.total_steps,
                self.epoch,
                loss,
                lr,
                speed,
            )
            self.accelerator.log({"loss": loss, "lr": lr, "samples_per_second": speed}, step=self.step)
            bar.update(self.step, speed, loss, lr)
            running.clear()
        else:
            bar.progress.update(bar.task, completed=self.step)

    def maybe_evaluate(self) -> None:
        every = self.cfg.eval.every
        at_end = self.step == self.total_steps
        if self.verification is None or not (at_end or (every and self.step % every == 0)):
            return
        results = self.verification(self.step, self.accelerator.unwrap_model(self.backbone))
        self.last_results = results
        self.accelerator.log({f"val/{name}": r.acc for name, r in results.items()}, step=self.step)

    def maybe_checkpoint(self) -> None:
        every = self.cfg.train.save_every
        if self.step == self.total_steps or (every and self.step % every == 0):
            self.save()

    # ----------------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": {"epoch": self.epoch, "position": self.position_in_epoch()},
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "num_classes": self.num_classes,
            "config": {k: v for k, v in flatten(to_dict(self.cfg)).items() if k in STRUCTURAL_KEYS},
            "loss_history": self.loss_history,
            "skipped_steps": len(self.skipped_at),
            "skipped_at": self.skipped_at,
        }

    def position_in_epoch(self) -> int:
        """Samples this rank has consumed in the current epoch (always at an optimizer-step boundary)."""
        steps_in_epoch = self.step - self.epoch * self.steps_per_epoch
        return steps_in_epoch * self.cfg.train.gradient_accumulation_steps * self.cfg.train.batch_size

    def save(self) -> Path:
        backbone = self.accelerator.unwrap_model(self.backbone)
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

    def resume(self) -> Path:
        """Continue from the newest checkpoint in the output folder; refuse one made by an incompatible config."""
        found = ckpt.list_checkpoints(self.output)
        if not found:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {self.output / ckpt.CHECKPOINTS}")
        path = found[-1]
        ckpt.verify_manifest(path)  # before trusting anything in it
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
        if self.accelerator.scaler is not None and state["scaler"]:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.loss_history = [tuple(x) for x in state.get("loss_history", [])]
        self.skipped_at = list(state.get("skipped_at", []))
        # Samples already consumed by the whole job this epoch, re-divided over this run's ranks.
        consumed = state["sampler"]["position"] * state["world_size"]
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_position(consumed // self.world_size)
        if (self.step - self.epoch * self.steps_per_epoch) * self.global_batch != consumed:
            logger.warning("resumed with a different global batch: the epoch's step count is approximate")
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return path

    def finish(self, elapsed: float, samples: int, interrupted: bool = False) -> None:
        accelerator = self.accelerator
        model_path = self.output / "model.safetensors"
        if accelerator.is_main_process:
            # The final checkpoint's model file: fp32 master weights under DeepSpeed too.
            final = self.output / ckpt.CHECKPOINTS / f"step-{self.step:08d}" / "model.safetensors"
            tmp = model_path.with_name(f".{model_path.name}.tmp")
            shutil.copyfile(final, tmp)
            os.replace(tmp, model_path)
        if isinstance(self.loader, FaceLoader):
            self.loader.close()  # its workers; DataLoader's end with the iterator
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo may abort the process at exit
        if not accelerator.is_main_process:
            return
        rows = [
            ("network", f"{self.cfg.network.name} ({self.cfg.network.embedding_size}-d)"),
            ("data", f"{self.cfg.data.source}: {len(self.dataset)} images, {self.num_classes} classes"),
            ("processes / precision", f"{self.world_size} / {self.precision}"),
            (
                "steps",
                f"{self.step} of {self.total_steps} ({self.epoch} epochs, global batch {self.global_batch})"
                + (" - interrupted: continue with --resume" if interrupted else ""),
            ),
            ("time", f"{elapsed:.1f} s, {samples / max(elapsed, 1e-9):.1f} samples/s"),
        ]
        bad = self.bad_data.summary()
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
        rows.append(("model", str(model_path)))
        rows.append(("checkpoints", str(self.output / ckpt.CHECKPOINTS)))
        print_summary(rows)


def run(cfg: ExperimentConfig, accelerator: Accelerator, resume: bool) -> Trainer:
    """Build, optionally resume, train. The resolved config goes to `<output>/config.yaml`."""
    trainer = Trainer(cfg, accelerator)
    if accelerator.is_main_process:  # after the Trainer: derived values (batch_size from global_batch_size) included
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output) / "config.yaml")
    if cfg.train.tensorboard:
        accelerator.init_trackers("arcface")
    if resume:
        trainer.resume()
    if trainer.step >= trainer.total_steps:
        logger.info("nothing to do: step %d of %d", trainer.step, trainer.total_steps)
    trainer.train()
    return trainer
