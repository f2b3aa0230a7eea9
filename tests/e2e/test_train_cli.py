"""The real CLI on a tiny recipe: it trains, the loss falls, checkpoints reload, resume continues exactly.

Stopping by a signal and resuming: tests/e2e/test_run_control.py (one chain per topology, against one
uninterrupted run each); refusals at start, an incompatible resume among them: tests/unit/test_start_refusals.py.
The run read here is the session's `tiny_run` (tests/conftest.py), never changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from models import build_backbone
from tests.launching import TINY, launch

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]


def _history(run: Path, step: int) -> list[tuple[int, float]]:
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    return [tuple(x) for x in state["loss_history"]]


def test_trains_and_writes_everything(tiny_run: Path) -> None:
    # 12 identities x 8 images = 96 samples, batch 16 -> 6 steps/epoch, 2 epochs.
    steps = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert steps == ["step-00000003", "step-00000006", "step-00000009", "step-00000012"]
    history = _history(tiny_run, 12)
    assert [s for s, _ in history] == list(range(1, 13))
    first, last = sum(l for _, l in history[:3]) / 3, sum(l for _, l in history[-3:]) / 3
    assert last < first * 0.9, history
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert saved["network"]["name"] == "r_lite" and saved["train"]["batch_size"] == 16
    assert (tiny_run / "train.log").read_text().count("loss") >= 12
    stdout = (tiny_run / "stdout.txt").read_text()
    assert "run summary" in stdout and "verification val" in stdout


def test_model_file_loads_without_the_trainer(tiny_run: Path) -> None:
    path = tiny_run / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["network"] == "r_lite" and meta["embedding_size"] == "32"
    model = build_backbone("r_lite", num_features=32)
    model.load_state_dict(load_file(str(path)), strict=True)
    # The final model equals the one in the last checkpoint.
    last = load_file(str(tiny_run / "checkpoints" / "step-00000012" / "model.safetensors"))
    for key, value in load_file(str(path)).items():
        assert torch.equal(value, last[key]), key


def test_resume_continues_exactly(tiny_run: Path, tmp_path: Path, face_cache: Path) -> None:
    """Resume the full run's step-3 checkpoint (mid-epoch) in a new folder, as if the run had died after it: the
    same losses and the same final weights as the full run."""
    out = tmp_path / "resumed"
    step_3 = tiny_run / "checkpoints" / "step-00000003"
    # Another worker count on resume: augmentation is keyed by (seed, epoch, sample), not by worker.
    resumed = launch(
        ["--config", str(TINY), "--output", str(out), "--resume", str(step_3), "--data.num_workers", "1"], face_cache
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-00000006", "step-00000009", "step-00000012"]
    _assert_same_history(_history(out, 12), _history(tiny_run, 12))
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(tiny_run / "model.safetensors"))
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def _our_traceback(stderr: str) -> bool:
    """A traceback through this project's code (accelerate launch adds its own for any non-zero exit)."""
    return any(
        f"{d}/" in line
        for line in stderr.splitlines()
        if line.strip().startswith("File ")
        for d in ("trainer", "models", "heads", "data", "evaluation")
    )


def test_fine_tune_from_a_backbone_with_new_classes(tiny_run: Path, tmp_path: Path, face_cache: Path) -> None:
    """A new head for another class count; backbone lr scaled by 0 keeps the loaded weights exactly."""
    init = tiny_run / "model.safetensors"
    out = tmp_path / "ft"
    args = [
        "--config",
        str(TINY),
        "--output",
        str(out),
        "--network.init_weights",
        str(init),
        "--data.generated.num_identities",
        "10",
        "--schedule.max_steps",
        "3",
        "--eval.every",
        "0",
    ]
    proc = launch([*args, "--optim.backbone_lr_scale", "0"], face_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone initialised from" in proc.stdout
    start, end = load_file(str(init)), load_file(str(out / "model.safetensors"))
    params = {n for n, _ in build_backbone("r_lite", num_features=32).named_parameters()}
    for name in params:
        assert torch.equal(start[name], end[name]), name
    head = load_file(str(out / "checkpoints" / "step-00000003" / "head-rank00000-of-00001.safetensors"))
    assert head["weight"].shape == (10, 32)
    # With the backbone's lr not scaled to 0 it does move.
    moved = launch([*args, "--output", str(tmp_path / "ft2"), "--optim.backbone_lr_scale", "0.1"], face_cache)
    assert moved.returncode == 0
    assert not torch.equal(load_file(str(tmp_path / "ft2" / "model.safetensors"))["fc.weight"], start["fc.weight"])


def test_fine_tune_with_a_mismatched_backbone_names_the_key(tiny_run: Path, tmp_path: Path, face_cache: Path) -> None:
    proc = launch(
        [
            "--config",
            str(TINY),
            "--output",
            str(tmp_path),
            "--network.embedding_size",
            "64",
            "--network.init_weights",
            str(tiny_run / "model.safetensors"),
        ],
        face_cache,
    )
    # The one refusal checked through the launcher (the others run in-process: tests/unit/test_start_refusals.py):
    # one line from the trainer and no traceback through this project's code, whatever accelerate adds.
    assert proc.returncode != 0
    assert "network.init_weights:" in proc.stderr and "does not fit the network: key 'fc." in proc.stderr
    assert not _our_traceback(proc.stderr)


def _assert_same_history(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)
