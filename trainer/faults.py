"""Failures outside the training step that stop a run after saving it: nothing trained is lost to them.

Two kinds, each with its exit code of `trainer/main.py`:

* `EvaluationFailed` (exit 4): verification raised during training (on the main process). Its traceback goes to
  train.log; the run saves the step it evaluated and stops. Nothing is wrong with the training state: fix the
  cause (or set `eval.every: 0`) and continue with `--resume`.
* `DataWorkerDied` (exit 5): a loader worker process died (killed, out of memory; `data.loader.FaceLoader`). The
  loader finishes the batches in hand in its own process, so the step in progress completes on every rank; the run
  saves it and stops. Continue with `--resume` once the machine has the memory (fewer `data.num_workers`, a smaller
  `data.prefetch`).

Either is noticed on one rank; the per-step stop collective (`trainer.distributed.StopSignal.poll`) carries it to
every rank, which all stop after the same step, save it, and raise the same error (`share_fault`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from data import TrainInput
from data.loader import FaceLoader

EXIT_EVALUATION_FAILED = 4
EXIT_DATA_WORKER_DIED = 5


class RunStopped(RuntimeError):
    """The run stopped on a failure outside the training step, with a checkpoint of its last step saved."""

    exit_code: ClassVar[int] = 1
    reason: ClassVar[str] = "stopped"  # the exit line in train.log, the summary

    def saved(self, checkpoint: str) -> RunStopped:
        """The same failure, its message completed with where the run was saved and how to go on."""
        return type(self)(f"{self}; the run stopped with its checkpoint {checkpoint}: continue with --resume")


class EvaluationFailed(RunStopped):
    """Verification raised during training (exit code 4); its traceback is in train.log."""

    exit_code = EXIT_EVALUATION_FAILED
    reason = "evaluation failed"


class DataWorkerDied(RunStopped):
    """A data loader worker process died (exit code 5)."""

    exit_code = EXIT_DATA_WORKER_DIED
    reason = "a data worker died"


def share_fault(fault: RunStopped | None, source: int) -> RunStopped:
    """Every rank gets rank `source`'s fault (its message names what happened where). Collective: every rank calls
    it, after the stop collective said which rank had one."""
    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if not several:
        assert fault is not None
        return fault
    message: list[RunStopped | None] = [fault]
    torch.distributed.broadcast_object_list(message, src=source)
    shared = message[0]
    assert shared is not None  # rank `source` said it had one
    return shared


def data_worker_fault(train_input: TrainInput, rank: int) -> DataWorkerDied | None:
    """This rank's dead data worker, if its loader lost one (`data.loader.FaceLoader.failure`)."""
    loader = train_input.loader
    failure = loader.failure if isinstance(loader, FaceLoader) else None
    return DataWorkerDied(f"rank {rank}: {failure}") if failure else None
