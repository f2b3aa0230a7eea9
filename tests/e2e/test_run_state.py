"""The divergence guard end to end, and the run state that must survive a resume (bad-sample counts, the best
verification accuracy, the curves' history), through the real CLI on the tiny recipe."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from data.dataset import RecordFaceDataset
from data.faces import FacesConfig, ensure_dataset
from tests.launching import TINY, launch, train_directly

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def _drop_after(run: Path, step: int) -> None:
    """Pretend the run died right after its step-`step` checkpoint."""
    for folder in (run / "checkpoints").iterdir():
        if folder.name.startswith("step-") and int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (run / "model.safetensors").unlink(missing_ok=True)


def _finite(path: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in load_file(str(path)).values() if t.is_floating_point())


def test_a_diverging_run_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path: Path, face_cache: Path) -> None:
    out = tmp_path / "diverged"
    proc = train_directly(
        [
            "--config",
            str(TINY),
            "--output",
            str(out),
            "--optim.lr",
            "1.0e+12",
            "--train.max_bad_steps",
            "3",
            "--train.save_every",
            "1",
        ],
        face_cache,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged at step 4" in errors[0] and "step-00000001" in errors[0], errors
    assert "Traceback" not in proc.stderr
    # Step 1 moved the weights (finite, huge); steps 2-4 were non-finite: skipped, and not saved.
    assert _steps(out) == ["step-00000001"]
    assert not (out / "model.safetensors").exists()
    assert _finite(out / "checkpoints" / "step-00000001" / "model.safetensors")
    log = (out / "train.log").read_text()
    assert all(f"step {s} skipped: loss nan" in log for s in (2, 3, 4)), log[-2000:]


def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(
    tiny_run: Path, tmp_path: Path, face_cache: Path
) -> None:
    out = tmp_path / "rollback"
    shutil.copytree(tiny_run, out)  # the session's tiny run, saved every 3 steps
    _drop_after(out, 3)
    # From step 3 on with an absurd lr: step 4 blows the weights up, 5 and 6 are non-finite; the run goes back to
    # step 3 with the lr x 1e-13 (0.05 x the schedule again) and finishes.
    resumed = launch(
        [
            "--config",
            str(TINY),
            "--output",
            str(out),
            "--resume",
            "--optim.lr",
            "5e11",
            "--train.max_bad_steps",
            "2",
            "--train.on_divergence",
            "rollback",
            "--train.rollback_lr_factor",
            "1e-13",
        ],
        face_cache,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = _state(out, 12)
    assert state["divergence"]["rollbacks"] == 1 and state["divergence"]["bad_steps"] == [5, 6]
    assert math.isclose(state["divergence"]["lr_scale"], 1e-13)
    assert "rolling back to" in (out / "train.log").read_text()
    assert _finite(out / "model.safetensors")
    losses = [loss for step, loss in state["loss_history"] if step > 6]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.fixture(scope="module")
def folder_with_a_broken_image(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    """The tiny recipe's faces as an image folder, one JPEG of it truncated (replaced, counted, not fatal)."""
    generated = yaml.safe_load(TINY.read_text())["data"]["generated"]
    records = RecordFaceDataset(ensure_dataset(FacesConfig(**generated), cache_dir=face_cache), output="uint8")
    root = tmp_path_factory.mktemp("folder")
    for index in range(len(records)):
        data, label = records.encoded(index)
        (root / f"id{label:03d}").mkdir(exist_ok=True)
        (root / f"id{label:03d}" / f"{index:04d}.jpg").write_bytes(data)
    broken = sorted((root / "id005").iterdir())[2]
    broken.write_bytes(broken.read_bytes()[:200])
    shutil.copy(ensure_dataset(FacesConfig(**generated), cache_dir=face_cache) / "val.bin", root.parent / "val.bin")
    return root


def test_bad_sample_counts_and_best_accuracy_survive_a_resume(
    tmp_path: Path, face_cache: Path, folder_with_a_broken_image: Path
) -> None:
    args = [
        "--config",
        str(TINY),
        "--data.source",
        "image_folder",
        "--data.root",
        str(folder_with_a_broken_image),
        "--data.max_bad_fraction",
        "0.5",
        "--eval.bins",
        f"[{folder_with_a_broken_image.parent / 'val.bin'}]",
        "--eval.every",
        "epoch",
        "--train.save_every",
        "3",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = launch([*args, "--output", str(whole)], face_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, cut)
    _drop_after(cut, 6)  # after the first epoch's evaluation, with one bad sample counted
    resumed = launch([*args, "--output", str(cut), "--resume"], face_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _state(whole, 12), _state(cut, 12)
    assert expected["input"]["bad_data"]["count"] == 2  # the broken image, once in each of the 2 epochs
    assert got["input"] == expected["input"]
    assert got["verification"] == expected["verification"]  # the best accuracy per target, epoch 1 included
    assert [h["step"] for h in got["history"] if "val/val" in h] == [6, 12]
    timeless = [[(k, v) for k, v in h.items() if k != "samples_per_second"] for h in got["history"]]
    assert timeless == [[(k, v) for k, v in h.items() if k != "samples_per_second"] for h in expected["history"]]
