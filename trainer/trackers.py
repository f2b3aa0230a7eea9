"""Experiment trackers (`train.trackers: [tensorboard, wandb, ...]`) through Accelerate's tracker API.

`build_accelerator` hands the names to `Accelerator(log_with=...)` after `check_trackers` made sure each one's
package is installed (Accelerate itself would drop a missing one with a debug message only). `start_trackers` opens
the runs once the output folder is settled, with the resolved config as hyper-parameters. Where the files go:
TensorBoard under `<output>/tensorboard/<project>/`, wandb under `<output>/wandb/` (the run named after the output
folder; `WANDB_MODE=offline` keeps it off the network). What is logged, and when, is the Trainer's business
(`Trainer.maybe_log`, `Trainer.maybe_evaluate`); `accelerator.end_training()` closes the runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from accelerate import Accelerator

from models.run_folder import RunFolder
from trainer.config import ConfigError, ExperimentConfig, flatten, to_dict

PROJECT = "arcface-accelerate"

# The module each tracker imports, and the pip package that provides it.
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "mlflow": ("mlflow", "mlflow"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}


_EXTRAS = ("tensorboard", "wandb")  # setup.cfg's extras_require


def check_trackers(trackers: Sequence[str]) -> list[str]:
    """The tracker names, each once, in order; a `ConfigError` naming `train.trackers` if one's package is missing."""
    names = list(dict.fromkeys(trackers))
    for name in names:
        if name not in _PACKAGES:
            raise ConfigError(f"train.trackers: unknown tracker {name!r} (known: {', '.join(_PACKAGES)})")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            # The project's extras (setup.cfg) for the trackers it names; the package itself for the others.
            install = f"pip install -e '.[{name}]'" if name in _EXTRAS else f"pip install {package}"
            raise ConfigError(f"train.trackers: {name!r} needs the {package} package, not installed here: {install}")
    return names


def hyperparameters(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """The resolved config, flattened to dotted keys with scalar values (what every tracker accepts): lists become
    their text, `None` the empty string."""
    values: dict[str, bool | int | float | str] = {}
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, bool | int | float | str):
            values[key] = value
        else:
            values[key] = "" if value is None else str(value)
    return values


def start_trackers(accelerator: Accelerator, cfg: ExperimentConfig) -> None:
    """Open this run in every tracker of `accelerator` (none: nothing to do), the config as hyper-parameters."""
    if not accelerator.log_with:
        return
    folder = RunFolder(cfg.output)
    # wandb makes its own `wandb/` inside the `dir` it is given: the run folder (RunFolder.wandb).
    init_kwargs: dict[str, dict[str, Any]] = {"wandb": {"dir": str(folder.root), "name": folder.root.name}}
    accelerator.init_trackers(PROJECT, config=hyperparameters(cfg), init_kwargs=init_kwargs)
