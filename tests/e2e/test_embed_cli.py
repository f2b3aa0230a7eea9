"""The trained model in use, through the real CLIs: embed the held-out faces, compare, calibrate on val.bin (and on
half of it, checked on the other half), ONNX, bad inputs; the run's trackers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from data.faces import cache_key
from evaluation.alignment import ARCFACE_TEMPLATE, warp_affine
from evaluation.calibrate import calibrate, measure
from evaluation.verification import load_bin
from models import build_backbone
from tests.launching import REPO, TINY, launch
from trainer.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]

# The tiny recipe with a larger held-out set: 200 impostor pairs, enough for a threshold at FAR 1e-2.
VAL = ["--data.generated.num_val_identities", "30", "--data.generated.num_val_pairs", "400"]
TRACKERS = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None]


class Run:
    def __init__(self, output: Path, cache: Path) -> None:
        self.output, self.model = output, output / "model.safetensors"
        generated = load_config(TINY, VAL, check_files=False).data.generated
        self.val_bin = cache / f"faces-{cache_key(generated)}" / "val.bin"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Run:
    out = tmp_path_factory.mktemp("trained")
    args = ["--config", str(TINY), "--output", str(out), "--train.save_every", "0", *VAL]
    if TRACKERS:
        args += ["--train.trackers", f"[{', '.join(TRACKERS)}]"]
    saved = {key: os.environ.get(key) for key in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # the launched trainer inherits them: no network
    try:
        proc = launch(args, face_cache, timeout=600)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Run(out, face_cache)


@pytest.fixture(scope="module")
def flipped(run: Run) -> np.ndarray:
    """The independent flip-summed embeddings of val.bin's 800 images, computed once."""
    return reference(run.model, load_bin(run.val_bin)[0], flip=True)


def cli(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="2", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def reference(model: Path, crops: torch.Tensor, flip: bool) -> np.ndarray:
    """Embeddings computed without evaluation.embed: the state dict, (x/255 - 0.5)/0.5, torch.flip, L2."""
    backbone = build_backbone("r_lite", num_features=32).eval()
    backbone.load_state_dict(load_file(str(model)))
    x = (crops.float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        out = backbone(x) + (backbone(torch.flip(x, dims=[3])) if flip else 0)
    return torch.nn.functional.normalize(out, dim=1).numpy()


def one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_embed_the_held_out_faces(run: Run, flipped: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "val.safetensors"
    proc = cli("evaluation.embed", run.val_bin, "--model", run.model, "--out", out, "--flip", "--batch-size", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(out), framework="pt") as handle:
        metadata, embeddings = handle.metadata(), handle.get_tensor("embeddings").numpy()
    assert json.loads(metadata["names"]) == [f"val.bin#{i}" for i in range(800)]
    assert metadata["flip"] == "true"
    np.testing.assert_allclose(embeddings, flipped, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.safetensors"]


def test_folder_with_a_broken_image_and_landmarks(run: Run, tmp_path: Path) -> None:
    images, _ = load_bin(run.val_bin)
    crops = images[:3].permute(0, 2, 3, 1).numpy()
    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    for index, name in enumerate(("a.png", "sub/b.png", "c.png")):
        Image.fromarray(crops[index]).save(folder / name)
    (folder / "broken.jpg").write_text("this is not a JPEG")
    proc = cli("evaluation.embed", folder, "--model", run.model, "--out", tmp_path / "e.npy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.jpg" in proc.stderr  # reported by name, not fatal
    assert (tmp_path / "e.names.txt").read_text().splitlines() == ["a.png", "c.png", "sub/b.png"]
    expected = reference(run.model, images[[0, 2, 1]], flip=False)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-5)

    # The same faces inside larger photos, moved by a known similarity; the landmarks move with them.
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"]
    for index in range(2):
        angle, scale, shift = 0.2 * (index + 1), 1.5, np.array([40.0, 25.0])
        linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        Image.fromarray(warp_affine(crops[index], np.hstack([linear, shift[:, None]]), (240, 220))).save(
            photos / f"p{index}.png"
        )
        points = ARCFACE_TEMPLATE @ linear.T + shift
        rows.append(f"p{index}.png," + ",".join(f"{v:.4f}" for v in points.ravel()))
    landmarks = tmp_path / "landmarks.csv"
    landmarks.write_text("\n".join(rows) + "\n")
    out = tmp_path / "aligned.safetensors"
    proc = cli("evaluation.embed", photos, "--model", run.model, "--landmarks", landmarks, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aligned = load_file(str(out))["embeddings"].numpy()
    cosines = (aligned * reference(run.model, images[:2], flip=False)).sum(axis=1)
    assert cosines.min() > 0.98, cosines

    # A landmarks file that does not match the images: one line, nothing written.
    landmarks.write_text("\n".join(rows[:2]) + "\n")
    out.unlink()
    proc = cli("evaluation.embed", photos, "--model", run.model, "--landmarks", landmarks, "--out", out)
    one_error_line(proc, "landmarks.csv", "p1.png")
    assert not out.exists()


def test_bad_inputs_are_one_line(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "e.safetensors"
    one_error_line(cli("evaluation.embed", run.val_bin, "--model", tmp_path / "none.safetensors", "--out", out), "none")
    one_error_line(cli("evaluation.embed", run.model, "--model", run.model, "--out", out), "model.safetensors")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    one_error_line(cli("evaluation.compare", "--model", run.model, text, text), "notes.png", "not a readable image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png"]


def test_calibrate_then_compare(run: Run, flipped: np.ndarray, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    shutil.copyfile(run.model, model)
    images, issame = load_bin(run.val_bin)
    proc = cli("evaluation.calibrate", "--model", model, "--bin", run.val_bin, "--far", "1e-2", "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(model), framework="pt") as handle:
        calibration = json.loads(handle.metadata()["calibration"])
        assert handle.metadata()["network"] == "r_lite"
    # Independently: flip-summed cosines, 200 impostor pairs, 2 allowed above -> the 3rd largest impostor score.
    scores = (flipped[0::2] * flipped[1::2]).sum(axis=1)
    impostor = np.sort(scores[~np.array(issame)])[::-1]
    assert calibration["threshold"] == pytest.approx(impostor[2], abs=1e-5)
    assert calibration["impostor_pairs"] == 200 and calibration["flip"] is True
    for key, value in load_file(str(model)).items():
        assert torch.equal(value, load_file(str(run.model))[key])

    for index in range(4):
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(tmp_path / f"{index}.png")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"0.png 1.png {int(issame[0])}\n2.png 3.png {int(issame[1])}\n")
    out = tmp_path / "scores.csv"
    proc = cli("evaluation.compare", "--model", model, "--pairs", pairs, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    for row, score in zip(rows, scores[:2], strict=True):
        assert float(row["score"]) == pytest.approx(score, abs=1e-5)  # flip from the calibration
        assert row["same"] == str(int(score > calibration["threshold"]))
    proc = cli("evaluation.compare", "--model", model, tmp_path / "0.png", tmp_path / "1.png")
    assert proc.returncode == 0 and ("same" in proc.stdout or "different" in proc.stdout), proc.stdout


def test_threshold_holds_on_the_other_half(run: Run, flipped: np.ndarray) -> None:
    """Calibrated at FAR 1e-2 on the first 200 pairs of val.bin, the FAR on the other 200 lies in the range the
    calibration predicts for their impostor pairs (beta-binomial, 95 %; module docstring of evaluation.calibrate)."""
    scores, labels = (flipped[0::2] * flipped[1::2]).sum(axis=1), np.array(load_bin(run.val_bin)[1])
    first = calibrate(scores[:200], labels[:200], far_target=1e-2, bootstrap=200)
    assert first.far <= 1e-2
    far, tar = measure(scores[200:], labels[200:], first.threshold)
    low, high = first.predicted_far_range(int((~labels[200:]).sum()))
    print(f"threshold {first.threshold:.4f}: FAR {first.far:.4f} / {far:.4f} (predicted [{low:.4f}, {high:.4f}])")
    assert low <= far <= high


def test_onnx_model_carries_the_calibration(run: Run, flipped: np.ndarray, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from trainer.export import onnx_command

    model = tmp_path / "model.onnx"
    onnx_command(run.model, model, None, None, 17, 2, 1e-4)
    images, issame = load_bin(run.val_bin)
    for index in range(8):
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(tmp_path / f"{index}.png")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{2 * i}.png {2 * i + 1}.png {int(issame[i])}\n" for i in range(4)))
    proc = cli("evaluation.calibrate", "--model", model, "--pairs", pairs, "--far", "0.5", "--bootstrap", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(props["calibration"])["far_target"] == 0.5 and props["network"] == "r_lite"
    out = tmp_path / "e.safetensors"
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{i}.png\n" for i in range(8)))
    proc = cli("evaluation.embed", listing, "--model", model, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(load_file(str(out))["embeddings"], flipped[:8], atol=1e-4)  # flip: calibration's


@pytest.mark.skipif("tensorboard" not in TRACKERS, reason="tensorboard not installed")
def test_the_run_logged_to_its_trackers(run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.output / "tensorboard" / "arcface-accelerate"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))
    assert [e.step for e in events.Scalars("val/val")] == [12]
    assert {"lr", "samples_per_second", "bad_samples", "skipped_steps"} <= set(events.Tags()["scalars"])
    if "wandb" in TRACKERS:
        assert list((run.output / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run.output / "curves.png").stat().st_size > 10_000  # the run's picture, named in its summary
