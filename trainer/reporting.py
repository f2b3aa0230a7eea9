"""What the run shows a person: one logger, a rich progress bar, a log file and the end-of-run table."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from models.cli import setup_logging as setup_process_logging

# Logs and CI captures are not terminals: give them a width that keeps a log line on one line.
console = Console(width=None if Console().is_terminal else 160)


def setup_logging(output: Path, is_main: bool) -> None:
    """The run's logging: `models.cli.setup_logging` (the one setup every entry point uses) on the progress bar's
    console, plus `<output>/train.log` on the main process; other ranks only warn."""
    setup_process_logging(is_main, console=console, log_file=output / "train.log")


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
    table = Table(title="ArcFace-Accelerate: run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


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
