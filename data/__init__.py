"""Data: files -> batches. `build_train_input(cfg.data, ...)` builds the whole training input pipeline (dataset,
sampler, loader, device-side normalization); the dataset contract is in `data.dataset`."""

from data.config import DataConfig
from data.pipeline import TrainInput, build_train_input

__all__ = ["DataConfig", "TrainInput", "build_train_input"]
