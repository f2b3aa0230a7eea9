"""`head.sample_rate` as a schedule through the real CLI: a run that samples 0.2 of its centers for two epochs and
then trains with the full softmax resumes exactly from a checkpoint on either side of the switch; after the switch
(nothing random left in the head) it also resumes on another number of processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launching import TINY, launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]

# Synthetic data (400 classes, 96 images): 6 steps of 16 per epoch, 3 epochs; the switch is at step 12.
ARGS = [
    *("--config", str(TINY)),
    *("--data.source", "synthetic", "--data.num_classes", "400", "--data.num_images", "96"),
    *("--head.sample_rate", "[[0, 0.2], [2, 1.0]]", "--head.update", "lazy", "--head.lazy_sync_every", "5"),
    *("--schedule.epochs", "3", "--train.save_every", "3", "--train.keep_checkpoints", "10"),
    *("--network.freeze_batchnorm", "true", "--eval.every", "0"),
]


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = dict(load_file(str(folder / "model.safetensors")))
    weights = [load_file(str(f))["weight"] for f in sorted(folder.glob("head-rank*.safetensors"))]
    out["head"] = torch.cat(weights)
    return out


def _losses(run: Path, step: int) -> list[list[float]]:
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    return state["loss_history"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("schedule") / "whole"
    proc = launch([*ARGS, "--output", str(out)], face_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "head.sample_rate: 1 from epoch 2 (was 0.2)" in log
    return out


@pytest.mark.parametrize("step", [9, 15], ids=["before-switch", "after-switch"])
def test_a_checkpoint_on_either_side_of_the_switch_resumes_exactly(
    whole_run: Path, tmp_path: Path, face_cache: Path, step: int
) -> None:
    checkpoint = whole_run / "checkpoints" / f"step-{step:08d}"
    proc = launch([*ARGS, "--output", str(tmp_path / "run"), "--resume", str(checkpoint)], face_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "run", 18) == _losses(whole_run, 18)
    expected, got = _tensors(whole_run, 18), _tensors(tmp_path / "run", 18)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_after_the_switch_it_resumes_on_two_processes(whole_run: Path, tmp_path: Path, face_cache: Path) -> None:
    checkpoint = whole_run / "checkpoints" / "step-00000015"
    args = [*ARGS, "--output", str(tmp_path / "run"), "--resume", str(checkpoint), "--train.batch_size", "8"]
    proc = launch(args, face_cache, config="cpu_ddp_2proc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same global batch, frozen BatchNorm statistics, no sampling: the 1-process trajectory up to float rounding.
    ours, theirs = dict(_losses(tmp_path / "run", 18)), dict(_losses(whole_run, 18))
    assert all(abs(ours[s] - theirs[s]) < 1e-4 for s in (16, 17, 18)), (ours, theirs)
    expected, got = _tensors(whole_run, 18), _tensors(tmp_path / "run", 18)
    assert all(torch.allclose(got[k], expected[k], atol=1e-4) for k in expected)
