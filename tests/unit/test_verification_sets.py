"""The seven `.bin` sets by name (insightface's `val_targets`): resolving names and `all` under a folder, the table
with its mean row, `--card`, and the same names in a recipe's `eval.bins`."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data.faces import encode_jpeg, identity_params, render_face
from evaluation.card import read_card
from evaluation.verification import (
    BIN_NAMES,
    BinFormatError,
    evaluate_backbone,
    load_bin,
    main,
    resolve_bins,
)
from models import build_backbone
from tests.launching import REPO
from trainer.config import load_config


def _write_bin(path: Path, pairs: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = [encode_jpeg(render_face(identity_params(seed, i % 4), rng), 90) for i in range(2 * pairs)]
    path.write_bytes(pickle.dumps((images, [bool(i % 2) for i in range(pairs)]), protocol=4))
    return path


def test_insightface_names() -> None:
    # insightface's partial_fc configs list these seven as val_targets (recognition/partial_fc/mxnet/default.py).
    assert sorted(BIN_NAMES) == sorted(["agedb_30", "calfw", "cfp_ff", "cfp_fp", "cplfw", "lfw", "vgg2_fp"])


def test_resolve_names_and_all(tmp_path: Path) -> None:
    for name in ("vgg2_fp", "lfw", "calfw"):
        (tmp_path / f"{name}.bin").write_bytes(b"x")
    other = tmp_path / "mine.bin"
    other.write_bytes(b"x")
    # `all`: the seven names in their order, those present; names and paths as given.
    assert resolve_bins(["all"], tmp_path) == [tmp_path / f"{n}.bin" for n in ("lfw", "calfw", "vgg2_fp")]
    assert resolve_bins(["calfw", "lfw.bin", str(other)], tmp_path) == [
        tmp_path / "calfw.bin",
        tmp_path / "lfw.bin",
        other,
    ]
    with pytest.raises(BinFormatError, match=r"cplfw: not found \(looked at .*cplfw.bin\)"):
        resolve_bins(["cplfw"], tmp_path)
    with pytest.raises(BinFormatError, match="needs --root"):
        resolve_bins(["cplfw"], None)
    with pytest.raises(BinFormatError, match="give --root"):
        resolve_bins(["all"], None)
    with pytest.raises(BinFormatError, match="'lfw' is named twice"):
        resolve_bins(["all", "lfw"], tmp_path)
    with pytest.raises(BinFormatError, match="none of lfw.bin"):
        resolve_bins(["all"], tmp_path / "empty")


def test_cli_table_has_a_row_per_set_and_their_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    root.mkdir()
    _write_bin(root / "lfw.bin", 10, seed=0)
    _write_bin(root / "cplfw.bin", 12, seed=1)
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=16).eval()
    weights = tmp_path / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(weights),
        metadata={"network": "r_lite", "embedding_size": "16"},
    )
    argv = ["--weights", str(weights), "--root", str(root), "--bins", "all", "--card", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = {name: evaluate_backbone(backbone, *load_bin(root / f"{name}.bin")) for name in ("lfw", "cplfw")}
    for name, result in expected.items():
        assert f"{result.acc:.5f} +- {result.std:.5f}" in out, name
    mean = np.mean([r.acc for r in expected.values()])
    assert "mean" in out and f"{mean:.5f}" in out and " 22 " in out
    stored = read_card(weights)["results"]["verification"]
    assert stored["values"]["cplfw"]["num_pairs"] == 12 and stored["rows"][-1][0] == "mean"
    assert (tmp_path / "model.safetensors.README.md").read_text().count("| lfw | 10 |") == 1


def test_recipe_eval_bins_take_the_names(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    (root / "someone").mkdir(parents=True)
    for name in BIN_NAMES:
        (root / f"{name}.bin").write_bytes(b"x")
    overrides = ["--data.source", "image_folder", "--data.root", str(root), "--eval.bins", f"[{', '.join(BIN_NAMES)}]"]
    cfg = load_config(REPO / "tests" / "e2e" / "tiny.yaml", overrides)
    assert cfg.eval.bins == [str(root / f"{name}.bin") for name in BIN_NAMES]
