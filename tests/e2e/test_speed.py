"""The recipe's speed switches (`speed.*`) through the real CLI: each trains the same run as the default, to float
rounding, and a compiled run checkpoints, evaluates and resumes as an eager one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.launching import TINY, launch

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]

STEPS = 4
# Power 2: the learning rate falls fast over the 4 steps, so the compiled kernels' rounding stays near 1e-4 (with
# the linear decay, 4x the lr at step 4, it reaches 1.4e-3 there).
ARGS = ["--config", str(TINY), "--schedule.max_steps", str(STEPS), "--schedule.power", "2.0", "--train.save_every", "2"]


def _run(out: Path, cache: Path, *extra: str) -> str:
    """The run's train.log (its lines unwrapped, unlike the console's)."""
    proc = launch([*ARGS, "--output", str(out), *extra], cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (out / "train.log").read_text()


def _losses(run: Path, step: int = STEPS) -> list[float]:
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    return [loss for _, loss in state["loss_history"]]


def _assert_same_run(losses: list[float], reference: list[float]) -> None:
    """The first loss is one forward of the same weights (another kernel order: ~1e-6); later ones carry the
    rounding differences through the updates (~1e-4 after 4 steps at this learning rate)."""
    assert len(losses) == len(reference) == STEPS
    assert losses[0] == pytest.approx(reference[0], rel=1e-5)
    assert losses == pytest.approx(reference, rel=1e-3)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("default")
    assert "channels_last off, compile off" in _run(out, face_cache)
    return out


def test_channels_last_trains_the_same_run(default_run: Path, tmp_path: Path, face_cache: Path) -> None:
    # A DDP choice in a one-process run is ignored, and said so.
    output = _run(tmp_path, face_cache, "--speed.channels_last", "true", "--speed.ddp_comm_hook", "fp16")
    assert "speed: channels_last on, compile off, fused optimizer on, no DDP" in output
    assert "speed.ddp_comm_hook='fp16': ignored, this run has no DDP (one process)" in output
    _assert_same_run(_losses(tmp_path), _losses(default_run))


@pytest.mark.slow
def test_compile_trains_checkpoints_evaluates_and_resumes(default_run: Path, tmp_path: Path, face_cache: Path) -> None:
    """Compiled in place: the same losses, the same state_dict keys in checkpoints and model.safetensors (no
    `_orig_mod.`), verification in eval mode at the end, and a resume from step 2 that ends where the run did."""
    output = _run(tmp_path, face_cache, "--speed.compile", "true")
    assert "compile default" in output and f"[val][{STEPS}] Accuracy-Flip" in output  # evaluated, compiled
    compiled = _losses(tmp_path)
    _assert_same_run(compiled, _losses(default_run))
    model = load_file(str(tmp_path / "model.safetensors"))
    assert set(model) == set(load_file(str(default_run / "model.safetensors")))

    for later in (tmp_path / "checkpoints" / f"step-{STEPS:08d}").iterdir():  # the run "died" after step 2
        later.unlink()
    (tmp_path / "checkpoints" / f"step-{STEPS:08d}").rmdir()
    (tmp_path / "model.safetensors").unlink()
    resumed = _run(tmp_path, face_cache, "--speed.compile", "true", "--resume")
    assert "resumed from" in resumed
    assert _losses(tmp_path) == pytest.approx(compiled, rel=1e-6)
