"""`trainer.optim.lr_factor` against the closed form of each schedule, and the `schedule:` section's validation."""

from __future__ import annotations

import math
from typing import Any

import pytest

from trainer.config import ConfigError, ScheduleConfig, load_config
from trainer.optim import lr_factor

TOTAL, WARMUP, PER_EPOCH = 100, 10, 20


def factors(cfg: ScheduleConfig) -> list[float]:
    return [lr_factor(cfg, step, TOTAL, WARMUP, PER_EPOCH) for step in range(TOTAL + 1)]


def test_polynomial_defaults_to_power_one_as_insightface_head() -> None:
    cfg = ScheduleConfig()
    assert (cfg.name, cfg.power) == ("polynomial", 1.0)
    got = factors(cfg)
    assert got[:WARMUP] == pytest.approx([(k + 1) / WARMUP for k in range(WARMUP)])
    # Linear from 1 at the end of the warm-up to 0 at the last step.
    assert got[WARMUP:] == pytest.approx([1 - (k - WARMUP) / (TOTAL - WARMUP) for k in range(WARMUP, TOTAL + 1)])
    squared = factors(ScheduleConfig(power=2.0))
    assert squared[55] == pytest.approx(0.5**2) and got[55] == pytest.approx(0.5)


def test_step_decay_at_the_given_epochs() -> None:
    cfg = ScheduleConfig(name="step", decay_epochs=[2, 4.5], decay_factor=0.1)
    got = factors(cfg)
    assert got[:WARMUP] == pytest.approx([(k + 1) / WARMUP for k in range(WARMUP)])
    # 20 steps per epoch: x0.1 from step 40 (2 epochs done), x0.01 from step 90 (4.5 epochs).
    assert got[WARMUP:40] == pytest.approx([1.0] * (40 - WARMUP))
    assert got[40:90] == pytest.approx([0.1] * 50)
    assert got[90:] == pytest.approx([0.01] * 11)


def test_cosine() -> None:
    got = factors(ScheduleConfig(name="cosine"))
    assert got[WARMUP] == pytest.approx(1.0) and got[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert got[55] == pytest.approx(0.5)  # half-way through the decay
    assert got[WARMUP + 30] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--schedule.name", "step"], "schedule.decay_epochs is empty"),
        (["--schedule.power", "0"], "schedule.power must be > 0, got 0.0"),
        (["--schedule.decay_epochs", "[5, 3]"], "schedule.decay_epochs must be increasing positive epochs"),
        (["--schedule.decay_factor", "1.5"], r"schedule.decay_factor must be in \(0, 1\]"),
        (["--schedule.name", "linear"], "schedule.name must be one of"),
    ],
)
def test_schedule_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_step_schedule_from_a_recipe() -> None:
    cfg: Any = load_config(None, ["--schedule.name", "step", "--schedule.decay_epochs", "[10, 16, 22]"]).schedule
    assert (cfg.name, cfg.decay_epochs, cfg.decay_factor) == ("step", [10.0, 16.0, 22.0], 0.1)
