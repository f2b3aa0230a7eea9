"""Verification during training, as the trainer uses it: the `.bin` files are loaded and checked at start, and an
evaluation that raises stops the run with a checkpoint instead of losing it (`trainer.faults.EvaluationFailed`).

The evaluation itself is `evaluation.verification.VerificationCallback`'s (main process only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from evaluation.verification import VerificationCallback, VerificationResult
from models.cli import FILE_ONLY
from trainer.config import ConfigError
from trainer.distributed import main_process_builds
from trainer.faults import EvaluationFailed

logger = logging.getLogger(__name__)

# insightface's protocol (`evaluation.verification.compute_accuracy`): the pairs are split into 10 folds, and each
# fold's accuracy is measured with the threshold the other nine chose; a file with fewer pairs cannot be split.
FOLDS = 10


def build_verification(bins: list[str], batch_size: int) -> VerificationCallback | None:
    """The callback over `bins` on the main process (None elsewhere, or without files), its files loaded and each
    checked to hold at least `FOLDS` pairs. Collective: a refusal (an `InputError` naming the file and the counts)
    reaches every rank before the first step, instead of a crash at the first evaluation."""

    def build() -> VerificationCallback:
        try:
            callback = VerificationCallback(bins, batch_size=batch_size)
        except ValueError as exc:  # two files of one name (their results would be mixed)
            raise ConfigError(f"eval.bins: {exc}") from None
        for path, (_, issame) in zip(bins, callback.targets.values(), strict=True):
            if len(issame) < FOLDS:
                raise ConfigError(
                    f"verification file {path} holds {len(issame)} pairs, fewer than the {FOLDS} folds of the "
                    f"verification protocol: give it at least {FOLDS} pairs (generated data: "
                    "data.generated.num_val_pairs), or leave it out of eval.bins"
                )
        return callback

    if not bins:
        return None
    return main_process_builds(build)


def evaluate(
    callback: VerificationCallback, step: int, backbone: nn.Module, log_file: Path
) -> dict[str, VerificationResult] | EvaluationFailed:
    """The results at `step`, or the failure that stops the run: any exception in the evaluation is logged with its
    traceback into train.log (`log_file`) and returned, so that the run saves this step before it stops."""
    try:
        return callback(step, backbone)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the training state is sound: save it, then stop
        logger.error("evaluation at step %d failed:", step, exc_info=exc, extra={FILE_ONLY: True})
        first_line = (str(exc).splitlines() or [""])[0]
        return EvaluationFailed(
            f"evaluation failed at step {step} ({type(exc).__name__}: {first_line}); its traceback is in {log_file}"
        )
