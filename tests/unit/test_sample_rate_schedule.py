"""`head.sample_rate` as a schedule of [epoch, rate] points: parsed and checked at load, followed by the head from
each epoch on (counted in sampled rows), and a lazily updated table caught up at a switch, so lazy still equals
dense there (float64)."""

from __future__ import annotations

import pytest
import torch

from heads.base import check_sample_rate, sample_rate_at
from tests.head_steps import make_head, make_optimizer, run_steps
from tests.launching import TINY
from trainer.config import ConfigError, load_config

SCHEDULE = [[0, 0.1], [2, 1.0]]


def test_the_rate_in_force_at_each_epoch() -> None:
    assert [sample_rate_at(0.3, e) for e in range(3)] == [0.3] * 3
    assert [sample_rate_at([[0, 0.1], [2, 0.5], [4, 1.0]], e) for e in range(6)] == [0.1, 0.1, 0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[1, 0.1], [2, 1.0]]", "start at epoch 0"),
        ("[[0, 0.1], [0, 1.0]]", "increasing epochs"),
        ("[[0, 0.1], [1.5, 1.0]]", "whole, increasing epochs"),
        ("[[0, 0.1], [2, 1.5]]", r"in \(0, 1\] at every point, got 1.5"),
        ("[[0, 0.1, 3]]", "list of \\[epoch, rate\\] points"),
        ("0", r"must be in \(0, 1\], got 0.0"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"--head.sample_rate.*{message}"):
        load_config(TINY, ["--head.sample_rate", value], check_files=False)


def test_a_schedule_loads_from_the_recipe_keys() -> None:
    cfg = load_config(TINY, ["--head.sample_rate", "[[0, 0.1], [18, 1.0]]"], check_files=False)
    assert cfg.head.sample_rate == [[0, 0.1], [18, 1.0]]
    check_sample_rate(cfg.head.sample_rate)


def test_the_head_follows_the_schedule_and_lazy_catches_up_at_the_switch() -> None:
    classes, per_epoch = 400, 5
    lazy = make_head(update="lazy", num_classes=classes, sample_rate=SCHEDULE)
    dense = make_head(update="dense", num_classes=classes, sample_rate=SCHEDULE)
    lazy_optimizer, dense_optimizer = make_optimizer(lazy, lazy_sync_every=1000), make_optimizer(dense)
    rows = []
    for epoch in range(3):
        for head in (lazy, dense):
            head.start_epoch(epoch)
        if epoch == 2:
            # The switch to the full softmax caught every lazy row up: the table and its momentum are dense's now,
            # with nothing left pending (no sync of the test's own).
            torch.testing.assert_close(lazy.weight, dense.weight, rtol=1e-12, atol=1e-14)
            momentum = [
                o.state[h.weight]["momentum_buffer"] for o, h in ((lazy_optimizer, lazy), (dense_optimizer, dense))
            ]
            torch.testing.assert_close(momentum[0], momentum[1], rtol=1e-12, atol=1e-14)
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            run_steps(lazy, lazy_optimizer, step, step + 1, total=3 * per_epoch)
            run_steps(dense, dense_optimizer, step, step + 1, total=3 * per_epoch)
            sampled = lazy.last_sampled_index
            rows.append(classes if sampled is None else sampled.numel())
    # Rate 0.1 of 400 centers (a global batch of 8 has at most 8 positives): 40 rows; then all of them.
    assert rows == [40] * (2 * per_epoch) + [classes] * per_epoch
    # After the switch lazy updates every row with the row kernels (trainer/row_sgd.py), dense with torch's SGD: the
    # same step in another order of operations, a few ulps apart per step (6.8e-14 at most after these 5 steps).
    torch.testing.assert_close(lazy.weight, dense.weight, rtol=1e-12, atol=1e-12)
