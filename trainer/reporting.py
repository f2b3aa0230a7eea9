"""What the run shows a person: one logger, a rich progress bar, a log file, `metrics.jsonl` and the end-of-run
table (on the console and, with the library versions, at the end of `train.log`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil
import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from evaluation.card import write_card
from models.cli import FILE_ONLY
from models.errors import InputError
from models.run_folder import RunFolder
from trainer.curves import plot_run

if TYPE_CHECKING:
    from data import TrainInput
    from evaluation.verification import VerificationCallback
    from heads.base import Head
    from trainer.config import ExperimentConfig
    from trainer.faults import RunStopped
    from trainer.optim import Schedule
    from trainer.state import TrainState

logger = logging.getLogger(__name__)

# The progress bar's console, which the run's log lines share (`models.cli.setup_logging(console=...)`).
console = Console()


class RunView(Protocol):
    """What the report reads of a run (`trainer.loop.Trainer` is one)."""

    cfg: ExperimentConfig
    accelerator: Accelerator
    folder: RunFolder
    state: TrainState
    schedule: Schedule
    input: TrainInput
    head: Head
    verification: VerificationCallback | None
    num_classes: int
    world_size: int
    precision: str
    last_results: dict[str, Any]
    stopped_by: RunStopped | None

    @property
    def global_batch(self) -> int: ...


class RunLog:
    """Where the run's figures go, each recorded once: the history (`TrainState.history`: the curves, the summary,
    the checkpoints), `metrics.jsonl` beside train.log (main process: one JSON object per log line and per
    evaluation, appended, so a rollback's abandoned steps stay in it), and the trackers (`accelerator.log`)."""

    def __init__(self, state: TrainState, folder: RunFolder, accelerator: Accelerator) -> None:
        self.state, self.folder, self.accelerator = state, folder, accelerator

    def record(self, step: int, values: dict[str, float], trackers_only: dict[str, float] | None = None) -> None:
        entry = {"step": step, **values}
        self.state.history.append(entry)
        if self.accelerator.is_main_process:
            finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in entry.items()}
            self.folder.append_line(self.folder.metrics, json.dumps({"time": round(time.time(), 3), **finite}))
        self.accelerator.log({**values, **(trackers_only or {})}, step=step)


def describe_run(trainer: RunView) -> None:
    """The run's derived figures and speed choices, once, at start."""
    from trainer.backbone import describe_speed

    s, cfg = trainer.schedule, trainer.cfg
    logger.info(
        "%s: %d samples, %d classes (%d on this rank), %d processes, %d steps/epoch, %d steps, %d warm-up, "
        "global batch %d, precision %s",
        *(trainer.input.source, trainer.input.num_samples, trainer.num_classes, trainer.head.num_local),
        *(trainer.world_size, s.steps_per_epoch, s.total_steps, s.warmup_steps, trainer.global_batch),
        trainer.precision,
    )
    logger.info("speed: %s", describe_speed(cfg.speed, trainer.accelerator, cfg.optim.fused))


def finish_run(trainer: RunView, elapsed: float, samples: int, interrupted: bool) -> None:
    """The end of a run on every rank: the model file (a finished run only), the curves, the loader's workers and
    the process group closed; then the summary on the main process."""
    accelerator, folder, state = trainer.accelerator, trainer.folder, trainer.state
    last_checkpoint = folder.checkpoint(state.step)
    curves = None
    if accelerator.is_main_process:
        if not interrupted:
            # Only a finished run has a model: the final checkpoint's model file (fp32 master weights under
            # DeepSpeed too). An interrupted run's summary points at its checkpoint.
            folder.publish_model(last_checkpoint)
            # Its card (README.md and the model's metadata): what the model is, how to feed it, the last evaluation.
            # A card that cannot be written (a full disk) loses no run: the model is there, the other ranks wait.
            results = {name: dataclasses.asdict(result) for name, result in trainer.last_results.items()}
            try:
                write_card(folder, dataclasses.asdict(trainer.cfg), results, step=state.step)
            except InputError as err:
                logger.warning("model card not written: %s", err)
        cfg = trainer.cfg
        curves = plot_run(folder, state.history, title=f"{cfg.network.name}, {cfg.head.name}")
    trainer.input.close()  # the loader's workers
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo may abort the process at exit
    if accelerator.is_main_process:
        print_summary(summary_rows(trainer, elapsed, samples, interrupted, curves))


def summary_rows(
    trainer: RunView, elapsed: float, samples: int, interrupted: bool, curves: Path | None
) -> list[tuple[str, str]]:
    cfg, state, folder = trainer.cfg, trainer.state, trainer.folder
    total = trainer.schedule.total_steps
    steps = f"{state.step} of {total} ({state.epoch} epochs, global batch {trainer.global_batch})"
    if trainer.stopped_by is not None:  # a failure outside the step (trainer.faults)
        steps += f" - stopped, {trainer.stopped_by.reason}: continue with --resume"
    elif interrupted:
        steps += " - interrupted: continue with --resume"
    rows = [
        ("network", f"{cfg.network.name} ({cfg.network.embedding_size}-d)"),
        ("data", f"{trainer.input.source}: {trainer.input.num_samples} images, {trainer.num_classes} classes"),
        ("processes / precision", f"{trainer.world_size} / {trainer.precision}"),
        ("steps", steps),
        (
            "time",
            f"{elapsed:.1f} s, {samples / max(elapsed, 1e-9):.1f} samples/s"
            if samples
            else f"{elapsed:.1f} s, nothing to train (the checkpoint is at step {state.step} of {total})",
        ),
    ]
    bad = trainer.input.bad_data.summary()
    rows.append(
        ("bad samples replaced (rank 0)", f"{bad['count']}" + (f", keys {bad['keys'][:10]}" if bad["count"] else ""))
    )
    losses = state.losses()
    if losses:
        rows.append(("loss first -> last", f"{losses[0][1]:.4f} -> {losses[-1][1]:.4f}"))
    for name, result in trainer.last_results.items():
        best = trainer.verification.highest[name] if trainer.verification else result.acc
        rows.append((f"verification {name}", f"{result.acc:.4f} +- {result.std:.4f} (best {best:.4f})"))
    last_checkpoint = folder.checkpoint(state.step).path
    rows.append(
        (
            "model",
            f"none yet (interrupted): the newest checkpoint is {last_checkpoint}" if interrupted else str(folder.model),
        )
    )
    rows.append(("curves", str(curves)))
    rows.append(("metrics", str(folder.metrics)))
    rows.append(("checkpoints", str(folder.checkpoints)))
    return rows


class ProgressBar:
    """Steps done / total, samples/s, loss, lr, ETA. Disabled (a no-op) off the main process."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]:>8.1f} samples/s"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("lr {task.fields[lr]:.5f}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, speed=0.0, loss=0.0, lr=0.0
        )

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, step: int) -> None:
        """Move the bar to `step` without new figures (steps between log lines)."""
        self.progress.update(self.task, completed=step)

    def update(self, step: int, speed: float, loss: float, lr: float) -> None:
        self.progress.update(self.task, completed=step, speed=speed, loss=loss, lr=lr)


class Throughput:
    """Samples per second over the interval since the last call."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.samples / max(now - self.last, 1e-9)
        self.last, self.samples = now, 0
        return rate


def print_summary(rows: list[tuple[str, str]]) -> None:
    """The end-of-run table on the console, and the same rows with the library versions in train.log."""
    table = Table(title="ArcFace-Accelerate: run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for key, value in [*rows, ("versions", library_versions())]:
        logger.info("summary: %s: %s", key, value, extra={FILE_ONLY: True})


def library_versions() -> str:
    """Python and the libraries a run's numbers depend on (DeepSpeed only when this process imported it)."""
    import sys

    import accelerate
    import numpy

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    versions += [f"accelerate {accelerate.__version__}", f"numpy {numpy.__version__}"]
    if "deepspeed" in sys.modules:
        versions.append(f"deepspeed {sys.modules['deepspeed'].__version__}")
    return ", ".join(versions)


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What ran a measurement, for the benchmarks' JSON: platform, CPU model and count, memory, Python and torch
    versions, and the GPU (of ``device``, else the current one when CUDA is there)."""
    model = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info
