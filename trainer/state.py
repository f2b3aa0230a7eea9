"""The run's state, part by part: what a checkpoint saves and a resume (or a rollback) restores.

Every part that carries run state is `Stateful`: `state_dict()` returns the top-level entries of
`trainer_state.json` it owns, `load_state_dict(saved)` reads them back from the whole saved mapping (and may read
the checkpoint's common entries, `world_size` and `num_classes`, which the checkpointer writes). The checkpointer
(`trainer.checkpoint.Checkpointer`) saves, loads, rolls back and reshards by iterating its parts in order; a new
piece of run state is a new part, or a new entry of one, and nothing else changes.

The parts and their entries (the file's format, docs/checkpoints.md):

    RunIdentity       num_classes, config (the structural keys): a checkpoint of another run shape is refused
    the schedule      schedule: the step counts it was made with (trainer.optim.Schedule; compared, not restored)
    TrainState        step, epoch, history, skipped_at (+ loss_history, skipped_steps: derived, for readers)
    SamplerPosition   sampler.position: the samples this rank consumed in the epoch
    the input         input: bad-sample counts (data.TrainInput, main process)
    verification      verification: the best accuracy per target (main process)
    the guard         divergence: bad steps, the rollbacks and their lr scale (trainer.guard)
    the stepper       scaler: the fp16 loss scaler (trainer.optim)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from data import TrainInput
from models.run_folder import CheckpointError
from trainer.config import STRUCTURAL_KEYS, ExperimentConfig, flatten, structural_keys, to_dict

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """A part of the run with state: the top-level entries of `trainer_state.json` it owns, and their restore."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Nested:
    """`obj`'s own state under one entry `key` (`{key: obj.state_dict()}`, `null` without `obj`); restored only
    where `load` is true (the main process's bad-sample counts are the only ones saved: other ranks count anew)."""

    def __init__(self, key: str, obj: Any, load: bool = True) -> None:
        self.key, self.obj, self.load = key, obj, load

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.obj.state_dict() if self.obj is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.obj is not None and self.load and state.get(self.key):
            self.obj.load_state_dict(state[self.key])


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, the epoch, the history the curves and the summary show (a record per
    log line and per evaluation), and the steps an fp16 overflow skipped."""

    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_at: list[int] = field(default_factory=list)

    @property
    def steps_in_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch

    def at_end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def losses(self) -> list[tuple[int, float]]:
        """(step, mean loss) of every log line."""
        return [(int(h["step"]), h["loss"]) for h in self.history if "loss" in h]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "history": self.history,
            "skipped_at": self.skipped_at,
            # Derived, kept for readers of the file (scripts, tests/launching.losses): never read back.
            "loss_history": self.losses(),
            "skipped_steps": len(self.skipped_at),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skipped_at = [int(s) for s in state.get("skipped_at", [])]
        if "history" in state:
            self.history = [dict(record) for record in state["history"]]
        else:  # a checkpoint from before the curves' history: its loss lines
            self.history = [{"step": s, "loss": loss} for s, loss in state.get("loss_history", [])]


class SamplerPosition:
    """The data sampler's place in the epoch. Checkpoints are taken at optimizer-step boundaries, so it follows
    from the step (the loader's prefetching moves the sampler ahead of what was trained on): `samples_per_step`
    samples of this rank per optimizer step. On another number of ranks, the samples the whole job consumed in the
    epoch are divided over the new ranks (exact when the global batch is unchanged)."""

    def __init__(self, train: TrainState, train_input: TrainInput, samples_per_step: int, world_size: int) -> None:
        self.train, self.input = train, train_input
        self.samples_per_step, self.world_size = samples_per_step, world_size

    def state_dict(self) -> dict[str, Any]:
        return self.entries(self.train.steps_in_epoch * self.samples_per_step)

    @staticmethod
    def entries(position: int) -> dict[str, Any]:
        """The `sampler` entry for this rank's `position` in the epoch (a converted checkpoint's: 0)."""
        return {"sampler": {"position": position}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        consumed = int(state["sampler"]["position"]) * int(state["world_size"])  # by the whole job
        self.input.sampler.set_epoch(self.train.epoch)
        self.input.sampler.set_position(consumed // self.world_size)
        if self.train.steps_in_epoch * self.samples_per_step * self.world_size != consumed:
            logger.warning("resumed with a different global batch: the epoch's step count is approximate")


class RunIdentity:
    """What makes a checkpoint fit this run: the keys that shape what it stores (`trainer.config.structural_keys`:
    network, embedding size, head, optimizer, and the chosen head's own, e.g. `head.num_subcenters`) and the class
    count. Restoring it is checking it: a `CheckpointError` names the key and both values. A head key the checkpoint
    does not record (one written before the key was marked) is not compared: the head shards' shapes still are."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int) -> None:
        keys = structural_keys(cfg)
        self.config = {k: v for k, v in flatten(to_dict(cfg)).items() if k in keys}
        self.num_classes = num_classes

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "config": self.config}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("config") or {}
        for key, value in self.config.items():
            if key not in STRUCTURAL_KEYS and key not in saved:
                continue
            if saved.get(key) != value:
                raise CheckpointError(f"it was made with {key}={saved.get(key)!r}, this run has {key}={value!r}")
        if state.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"it was made with {state.get('num_classes')} classes, this run has {self.num_classes}"
            )
