"""Distillation through the real CLI: a resume in the middle of an epoch with the teacher cache continues exactly;
2 processes train as 1 does (DDP; the distillation terms are the global batch's); gradient accumulation equals the
larger batch; DeepSpeed ZeRO-2 distils and its checkpoint (projection included) resumes on another number of
processes. (Every head with a teacher: tests/unit/test_distill.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import build_backbone
from models.cli import atomic_output
from tests.launching import TINY, free_port, launch
from trainer.checkpoint import model_metadata, save_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    with atomic_output(path) as tmp:
        save_model(tmp, build_backbone("r_lite", num_features=48).eval(), model_metadata("r_lite", 48))
    return path


def _args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--config", str(TINY), "--output", str(out), "--eval.every", "0"),
        *("--distill.teacher", str(teacher), "--distill.relation_weight", "0.5", "--distill.head_weight", "0.5"),
        *extra,
    ]


def _losses(run: Path, step: int = 12) -> list[list[float]]:
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    return state["loss_history"]


def _tensors(run: Path, step: int = 12) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"model:{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    out.update({f"distill:{k}": v for k, v in load_file(str(folder / "distill.safetensors")).items()})
    return out


def _ok(proc: object) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def cached_run(teacher: Path, tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("distill") / "whole"
    _ok(launch(_args(teacher, out, "--distill.cache", "true", "--train.save_every", "3"), face_cache))
    return out


@pytest.mark.parametrize("step", [3, 9], ids=["first-epoch", "second-epoch"])
def test_a_resume_with_the_cache_continues_exactly(
    cached_run: Path, teacher: Path, tmp_path: Path, face_cache: Path, step: int
) -> None:
    """Step 3: half of epoch 0 is in the cache (written with the checkpoint), the rest is embedded on the way; step
    9: everything comes from the cache. Either way the run ends where the uninterrupted one did, bit for bit."""
    run = tmp_path / "run"
    checkpoint = cached_run / "checkpoints" / f"step-{step:08d}"
    # The resumed run reads the uninterrupted run's cache folder (as a requeued job reads its own).
    extra = (
        "--distill.cache",
        "true",
        "--distill.cache_dir",
        str(cached_run / "teacher_cache"),
        "--resume",
        str(checkpoint),
    )
    _ok(launch(_args(teacher, run, *extra), face_cache))
    assert _losses(run) == _losses(cached_run)
    expected, got = _tensors(cached_run), _tensors(run)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_two_processes_distil_as_one(teacher: Path, tmp_path: Path, face_cache: Path) -> None:
    """Frozen BatchNorm statistics, the same global batch: the 1-process trajectory to fp32 rounding, which grows
    with the steps as in every DDP run here (tests/distributed/test_trainer_distributed.py: 6 steps at 1e-4); a
    distillation gradient counted once per rank would show at step 2."""
    common = ("--network.freeze_batchnorm", "true", "--schedule.max_steps", "5", "--train.save_every", "5")
    _ok(launch(_args(teacher, tmp_path / "one", *common), face_cache))
    _ok(
        launch(_args(teacher, tmp_path / "two", *common, "--train.batch_size", "8"), face_cache, config="cpu_ddp_2proc")
    )
    one, two = _losses(tmp_path / "one", 5), _losses(tmp_path / "two", 5)
    assert len(one) == 5 and [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-4)
    a, b = _tensors(tmp_path / "one", 5), _tensors(tmp_path / "two", 5)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_gradient_accumulation_equals_the_larger_batch(teacher: Path, tmp_path: Path, face_cache: Path) -> None:
    # Without the relation term: a batch's similarity matrix is not the sum of its micro-batches'.
    common = ("--network.freeze_batchnorm", "true", "--distill.relation_weight", "0", "--schedule.max_steps", "5")
    _ok(launch(_args(teacher, tmp_path / "whole", *common), face_cache))
    accumulated = ("--train.batch_size", "8", "--train.gradient_accumulation_steps", "2")
    _ok(launch(_args(teacher, tmp_path / "accumulated", *common, *accumulated), face_cache))
    whole, accumulated_losses = _losses(tmp_path / "whole", 5), _losses(tmp_path / "accumulated", 5)
    assert [loss for _, loss in accumulated_losses] == pytest.approx([loss for _, loss in whole], rel=1e-4)


def test_deepspeed_distils_and_resumes_on_another_rank_count(teacher: Path, tmp_path: Path, face_cache: Path) -> None:
    run = tmp_path / "ds"
    args = _args(teacher, run, "--distill.cache", "true", "--train.save_every", "6", "--train.batch_size", "8")
    _ok(launch([*args, "--schedule.max_steps", "6"], face_cache, config="cpu_ds_zero2_bf16"))
    assert (run / "checkpoints" / "step-00000006" / "distill.safetensors").is_file()
    port = ["--main_process_port", str(free_port()), "--num_processes", "1"]
    resumed = launch(
        [*args, "--train.batch_size", "16", "--resume"], face_cache, config="cpu_ds_zero2_bf16", launcher=port
    )
    _ok(resumed)
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "distill.safetensors: distill starts as initialized" not in log
    losses = [loss for _, loss in _losses(run)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
