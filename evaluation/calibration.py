"""A model's calibration: the decision threshold stored in its metadata, and the flip setting it was measured with.

`evaluation.calibrate` computes one and writes it into the model file (key `calibration`, JSON); `FaceEmbedder`
(`evaluation.embed`), `evaluation.compare` and `evaluation.embed` read it back here. This module imports no other
evaluation module, so the embedder and the calibration tool can both use it without importing each other.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.errors import InputError

__all__ = [
    "METADATA_KEY",
    "Calibration",
    "CalibrationError",
    "allowed_false_accepts",
    "read_calibration",
    "resolve_flip",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "calibration"


class CalibrationError(InputError):
    """Scores, labels or a model file that cannot be calibrated; the message names the file or the value."""


@dataclass(frozen=True)
class Calibration:
    """A threshold on the cosine score ("same" when strictly above) and what is known about it (the intervals:
    `evaluation.calibrate`'s module docstring)."""

    far_target: float
    threshold: float
    far: float
    far_interval: tuple[float, float]
    tar: float
    tar_interval: tuple[float, float]
    confidence: float
    genuine_pairs: int
    impostor_pairs: int
    bootstrap: int
    seed: int
    flip: bool | None = None  # whether the scores came from flip-summed embeddings (None: unknown, e.g. IJB)
    source: str = ""

    @property
    def allowed_false_accepts(self) -> int:
        """k: the impostor pairs allowed above the threshold."""
        return allowed_false_accepts(self.far_target, self.impostor_pairs)

    def predicted_far_range(self, num_impostor: int) -> tuple[float, float]:
        """The central `confidence` range of the FAR that `num_impostor` new impostor pairs will show at this
        threshold (beta-binomial; exact for i.i.d. continuous scores)."""
        from scipy.stats import betabinom

        k, n = self.allowed_false_accepts, self.impostor_pairs
        tail = (1.0 - self.confidence) / 2
        low, high = betabinom.ppf([tail, 1.0 - tail], num_impostor, k + 1, n - k)
        return float(low) / num_impostor, float(high) / num_impostor

    def same(self, scores: np.ndarray | float) -> np.ndarray:
        """The decision for each score: True when the score is strictly above the threshold."""
        return np.asarray(scores) > self.threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> Calibration:
        """Parse the metadata entry; `source` names the model file in the error."""
        try:
            raw = json.loads(text)
            raw["far_interval"] = tuple(raw["far_interval"])
            raw["tar_interval"] = tuple(raw["tar_interval"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as err:
            raise CalibrationError(f"{source}: metadata '{METADATA_KEY}' is not a calibration ({err})") from None


def allowed_false_accepts(far_target: float, num_impostor: int) -> int:
    """k = floor(FAR x n), at most n - 1: the impostor pairs a threshold at `far_target` lets above it."""
    # The epsilon: 0.29 * 100 is 28.999999999999996 in floating point, and 29 false accepts are allowed.
    return min(math.floor(far_target * num_impostor + 1e-9), num_impostor - 1)


def read_calibration(metadata: dict[str, str], source: str | Path) -> Calibration | None:
    """The calibration stored in a model's metadata, or None."""
    text = metadata.get(METADATA_KEY)
    return None if text is None else Calibration.from_json(text, str(source))


def resolve_flip(requested: bool | None, calibration: Calibration | None) -> bool:
    """The flip setting to embed with: `requested` (`--flip/--no-flip`, `flip=`), else what the model's calibration
    used (its threshold holds for those embeddings), else off. A request that differs from the calibration's warns."""
    calibrated = calibration.flip if calibration is not None else None
    if requested is None:
        return bool(calibrated)
    if calibrated is not None and requested != calibrated:
        logger.warning(
            "the model was calibrated %s flip; these embeddings are %s: its threshold may not hold",
            "with" if calibrated else "without",
            "flip-summed" if requested else "not flipped",
        )
    return requested
