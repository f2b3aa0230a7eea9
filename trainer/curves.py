"""A picture of the run: loss, learning rate, throughput and verification accuracy against the optimizer step.

`plot_run(output, history)` writes `<output>/curves.png` from the trainer's history, a list of dicts with `step`
and any of `loss`, `lr`, `samples_per_second` and `val/<name>` (verification accuracies, present only at
evaluation steps). Missing keys leave a gap; a panel with nothing to show says so. The figure is drawn with
matplotlib's object API (`Figure`, rendered by Agg): no pyplot, so no global state and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from models.run_folder import RunFolder

VAL_PREFIX = "val/"


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the entries that have `key` with a finite number."""
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(entry["step"]))
            values.append(float(value))
    return steps, values


def _empty(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")


def plot_run(output: RunFolder | Path, history: Sequence[dict[str, Any]], title: str | None = None) -> Path:
    """Write `<output>/curves.png` (atomically: a temporary file, then a rename) and return its path."""
    folder = output if isinstance(output, RunFolder) else RunFolder(output)
    figure = Figure(figsize=(11, 7), layout="constrained")
    (loss_axes, lr_axes), (val_axes, speed_axes) = figure.subplots(2, 2, sharex=True)
    last_step = max((int(entry["step"]) for entry in history), default=0)
    figure.suptitle(title or f"{folder.root.name}: {last_step} steps")

    for axes, key, label, colour in (
        (loss_axes, "loss", "training loss", "tab:blue"),
        (lr_axes, "lr", "learning rate", "tab:orange"),
        (speed_axes, "samples_per_second", "samples/s", "tab:green"),
    ):
        steps, values = _series(history, key)
        axes.set_title(label)
        if steps:
            # A single point would be an invisible line: markers make short (interrupted) runs readable.
            axes.plot(steps, values, color=colour, marker="o" if len(steps) < 30 else None, markersize=3)
        else:
            _empty(axes, f"no {label} logged")
        axes.grid(alpha=0.3)

    names = sorted({key for entry in history for key in entry if key.startswith(VAL_PREFIX)})
    val_axes.set_title("verification accuracy")
    for name in names:
        steps, values = _series(history, name)
        if steps:
            val_axes.plot(steps, values, marker="o", markersize=4, label=name[len(VAL_PREFIX) :])
    if names:
        val_axes.legend(loc="lower right")
    else:
        _empty(val_axes, "no evaluation yet")
    val_axes.grid(alpha=0.3)
    for axes in (val_axes, speed_axes):
        axes.set_xlabel("optimizer step")

    with folder.atomic(folder.curves) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return folder.curves
