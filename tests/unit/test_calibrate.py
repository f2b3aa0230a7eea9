"""Threshold calibration: the threshold rule, what its intervals cover (simulated against closed forms), and the
metadata round trip through safetensors and ONNX files."""

from __future__ import annotations

import json
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.stats import norm

from evaluation.calibrate import CalibrationError, calibrate, measure, write_calibration
from evaluation.calibration import Calibration, read_calibration
from evaluation.embed import EmbedError, read_pair_list
from models.cli import OutputError


def test_threshold_allows_floor_far_times_n_impostors_above() -> None:
    impostor = np.arange(100, dtype=np.float64) / 100  # 0.00 .. 0.99
    genuine = np.array([0.955, 0.975, 0.985, 2.0])
    scores = np.concatenate([impostor, genuine])
    labels = np.r_[np.zeros(100), np.ones(4)]
    # FAR 0.03 of 100 impostors: 3 may score above the threshold, so it is the 4th largest impostor score, 0.96.
    result = calibrate(scores, labels, far_target=0.03, bootstrap=50)
    assert result.threshold == pytest.approx(0.96)
    assert result.far == pytest.approx(0.03) and result.tar == pytest.approx(0.75)
    assert measure(scores, labels, result.threshold) == (pytest.approx(0.03), pytest.approx(0.75))
    # 0.29 * 100 is 28.999... in floating point: still 29 allowed.
    assert calibrate(scores, labels, far_target=0.29, bootstrap=10).far == pytest.approx(0.29)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(CalibrationError, match="genuine and impostor"):
        calibrate(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(CalibrationError, match="--far"):
        calibrate(np.array([0.1, 0.2]), np.array([0, 1]), far_target=1.5)


def test_intervals_cover_what_they_claim() -> None:
    """Gaussian scores (impostor N(0,1), genuine N(2.5,1)), 400 calibrations of 300 + 300 pairs at FAR 1e-2:
    the true FAR and TAR of each threshold are known in closed form (normal tail)."""
    rng = np.random.default_rng(0)
    n, mean, reps = 300, 2.5, 400
    far_hits = tar_hits = predicted_hits = 0
    for _ in range(reps):
        scores = np.r_[rng.standard_normal(n), rng.standard_normal(n) + mean]
        labels = np.r_[np.zeros(n), np.ones(n)]
        result = calibrate(scores, labels, far_target=1e-2, bootstrap=200, seed=int(rng.integers(1 << 30)))
        true_far, true_tar = norm.sf(result.threshold), norm.sf(result.threshold - mean)
        far_hits += result.far_interval[0] <= true_far <= result.far_interval[1]
        tar_hits += result.tar_interval[0] <= true_tar <= result.tar_interval[1]
        # 300 new impostor pairs: the FAR they show lies in the predicted range.
        held_out = (rng.standard_normal(n) > result.threshold).mean()
        low, high = result.predicted_far_range(n)
        predicted_hits += low <= held_out <= high
    # Exact Beta interval: 95 % up to simulation noise (sd 1.1 % at 400 draws).
    assert 0.92 <= far_hits / reps <= 0.98
    # Percentile bootstrap of a proportion: close to nominal, a little under at 300 pairs.
    assert 0.90 <= tar_hits / reps <= 0.98
    # Beta-binomial on a discrete count: at least the nominal level.
    assert predicted_hits / reps >= 0.93


def test_pair_list_format(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("# a comment\na.jpg b.jpg 1\n\nc.jpg d.jpg 0  # trailing\ne.jpg f.jpg same\n")
    pairs = read_pair_list(path, need_labels=True)
    assert [(p.first, p.second, p.same, p.line) for p in pairs] == [
        ("a.jpg", "b.jpg", True, 2),
        ("c.jpg", "d.jpg", False, 4),
        ("e.jpg", "f.jpg", True, 5),
    ]
    path.write_text("a.jpg b.jpg\n")
    assert read_pair_list(path, need_labels=False)[0].same is None
    with pytest.raises(EmbedError, match=r"pairs.txt:1: expected 'path1 path2 label'"):
        read_pair_list(path, need_labels=True)
    path.write_text("a.jpg b.jpg maybe\n")
    with pytest.raises(EmbedError, match=r"pairs.txt:1: label 'maybe'"):
        read_pair_list(path, need_labels=False)


def _calibration() -> Calibration:
    scores = np.r_[np.linspace(-0.2, 0.4, 50), np.linspace(0.3, 0.9, 50)]
    return calibrate(scores, np.r_[np.zeros(50), np.ones(50)], far_target=0.1, bootstrap=20, flip=True, source="t")


def test_safetensors_metadata_round_trip_keeps_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(path), metadata={"network": "r_lite", "embedding_size": "4"})
    calibration = _calibration()
    write_calibration(path, calibration)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["network"] == "r_lite" and metadata["embedding_size"] == "4"
    assert read_calibration(metadata, path) == calibration
    assert json.loads(metadata["calibration"])["threshold"] == calibration.threshold
    for key, value in load_file(str(path)).items():
        assert torch.equal(value, tensors[key])
    # No temporary file left; the card beside the model shows the threshold (evaluation.card).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.safetensors.README.md"]
    assert f"{calibration.threshold:.5f}" in (tmp_path / "model.safetensors.README.md").read_text()


def test_rewrite_keeps_the_mode_and_a_failure_keeps_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3, 4)}, str(path), metadata={"network": "r_lite"})
    path.chmod(0o640)
    write_calibration(path, _calibration())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not the 0600 of a temporary file
    before = path.read_bytes()

    # A folder that takes no new file (root ignores permissions, so the refusal is simulated where it happens).
    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"model.safetensors: cannot be written in .* \(Permission denied\)"):
        write_calibration(path, _calibration())
    listing = ["model.safetensors", "model.safetensors.README.md"]
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_checkpoint_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(CalibrationError, match="inside a checkpoint"):
        write_calibration(path, _calibration())


def test_onnx_metadata_props(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["data"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "network", "r_lite"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    first, second = _calibration(), calibrate(np.r_[0.0, 1.0, 0.5], np.r_[0, 1, 0], far_target=0.5, bootstrap=5)
    write_calibration(path, first)
    write_calibration(path, second)  # replaces, never duplicates, the entry
    props = [(p.key, p.value) for p in onnx.load(str(path)).metadata_props]
    assert [key for key, _ in props] == ["network", "calibration"]
    assert read_calibration(dict(props), path) == second
