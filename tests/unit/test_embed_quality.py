"""Quality in `evaluation.embed`: each face's norm before normalization beside its embedding (safetensors `norms`,
`.npy` + `<stem>.norms.npy` written together), `--min-norm` leaving faces out by name; the model's input line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from data.faces import identity_params, render_face
from evaluation.embed import main
from models import build_backbone


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=16).eval()
    model = tmp_path / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(model),
        metadata={"network": "r_lite", "embedding_size": "16"},
    )
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    crops = np.stack([render_face(identity_params(0, i), rng) for i in range(6)])
    for index, crop in enumerate(crops):
        Image.fromarray(crop).save(faces / f"{index}.png")  # lossless: the reference sees the same pixels
    return model, faces, crops


def reference_norms(model: Path, crops: np.ndarray, flip: bool) -> np.ndarray:
    backbone = build_backbone("r_lite", num_features=16).eval()
    backbone.load_state_dict(load_file(str(model)))
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        norms = backbone(x).norm(dim=1)
        if flip:
            norms = (norms + backbone(torch.flip(x, dims=[3])).norm(dim=1)) / 2
    return norms.numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_norms_beside_the_embeddings(setup: tuple[Path, Path, np.ndarray], tmp_path: Path, flip: bool) -> None:
    model, faces, crops = setup
    out = tmp_path / "e.safetensors"
    argv = [str(faces), "--model", str(model), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--flip" if flip else "--no-flip"]) == 0
    stored = load_numpy(str(out))
    assert stored["norms"] == pytest.approx(reference_norms(model, crops, flip), rel=1e-5)
    assert np.linalg.norm(stored["embeddings"], axis=1) == pytest.approx(np.ones(6), rel=1e-5)


def test_npy_norms_and_min_norm(
    setup: tuple[Path, Path, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, faces, crops = setup
    norms = reference_norms(model, crops, flip=False)
    cut = float(np.median(norms))
    out = tmp_path / "e.npy"
    with caplog.at_level(logging.INFO):
        argv = [str(faces), "--model", str(model), "--out", str(out), "--min-norm", str(cut), "--device", "cpu"]
        assert main(argv) == 0
    kept = [f"{i}.png" for i in range(6) if norms[i] >= cut]
    assert (tmp_path / "e.names.txt").read_text().split() == kept
    assert np.load(tmp_path / "e.norms.npy") == pytest.approx(norms[norms >= cut], rel=1e-5)
    assert np.load(out).shape == (len(kept), 16)
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left out")]
    assert len(dropped) == 6 - len(kept) and all(".png: norm" in m and "below --min-norm" in m for m in dropped)
    # How to feed the model, on standard output (standard error stays one line for bad input).
    assert capsys.readouterr().out.startswith("model r_lite (16-d): input aligned 112x112 RGB")
    assert main([str(faces), "--model", str(model), "--out", str(out), "--min-norm", "1e9", "--device", "cpu"]) == 2
