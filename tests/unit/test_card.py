"""The model card (evaluation.card): where it goes, the facts it states (against the model itself and the recipe),
its copy in the file's metadata, the updates the tools make, and the recipe keys it reads (data.name, data.licence)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evaluation import card
from evaluation.alignment import ARCFACE_TEMPLATE
from models import build_backbone, count_flops
from models.run_folder import RunFolder
from tests.launching import REPO
from trainer.config import load_config


def _run_folder(tmp_path: Path, overrides: list[str] | None = None) -> tuple[RunFolder, dict]:
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    cfg = load_config(REPO / "launch" / "recipes" / "default.yaml", overrides or [], check_files=False)
    config = dataclasses.asdict(cfg)
    folder.config.write_text(yaml.safe_dump(config))
    backbone = build_backbone("r_lite", num_features=128)
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(folder.model),
        metadata={"format": "pt", "network": "r_lite", "embedding_size": "128", "producer": "arcface-accelerate"},
    )
    return folder, config


def test_card_paths(tmp_path: Path) -> None:
    folder, _ = _run_folder(tmp_path)
    assert card.card_path(folder.model) == folder.card == folder.root / "README.md"
    assert card.card_path(tmp_path / "model_int8.onnx") == tmp_path / "model_int8.onnx.README.md"
    assert card.card_path(tmp_path / "model.safetensors") == tmp_path / "model.safetensors.README.md"  # no run
    assert RunFolder.CARD in RunFolder.RESULTS and RunFolder.CARD in RunFolder.WRITTEN


def test_facts_are_the_models() -> None:
    backbone = build_backbone("mbf", num_features=512)
    facts = card.model_facts("mbf", 512)
    assert facts["parameters"] == sum(p.numel() for p in backbone.parameters())
    assert facts["macs"] == count_flops(backbone)
    assert card.model_facts("not-a-network", 8) == {}
    assert np.allclose(card.ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)


def test_run_card(tmp_path: Path) -> None:
    folder, config = _run_folder(tmp_path, ["--data.name", "MS1MV3", "--data.licence", "non-commercial research"])
    results = {
        "val": {"acc": 0.95, "std": 0.02, "xnorm": 10.8, "num_pairs": 1000},
        "lfw": {"acc": math.nan, "std": math.nan, "xnorm": math.nan, "num_pairs": 6000},
    }
    before = {k: v.clone() for k, v in load_file(str(folder.model)).items()}
    readme = card.write_card(folder, config, results, step=186)
    assert all(torch.equal(v, before[k]) for k, v in load_file(str(folder.model)).items())  # tensors untouched
    assert readme == folder.card
    with safe_open(str(folder.model), framework="pt") as handle:
        metadata = handle.metadata()
    stored = json.loads(metadata["card"])
    assert metadata["network"] == "r_lite"  # the rest of the metadata is kept
    assert stored["training"] == {
        "data": "MS1MV3",
        "licence": "non-commercial research",
        "source": "generated",
        "steps": 186,
        "producer": "arcface-accelerate",
    }
    assert stored["recipe"]["head.m2"] == 0.5 and stored["recipe"]["network.name"] == "r_lite"
    assert "head.adaface_m" not in stored["recipe"]  # only the chosen head's keys
    values = stored["results"]["verification"]["values"]
    assert values["val"]["acc"] == 0.95 and values["lfw"]["acc"] is None  # not measured: null, not NaN
    text = readme.read_text()
    for expected in ("RGB", "(x / 255 - 0.5) / 0.5", "38.2946", "non-commercial research", "0.95000 +- 0.02000"):
        assert expected in text, expected
    assert text == card.render_card(metadata, "model.safetensors")


def test_default_licence_and_head_keys(tmp_path: Path) -> None:
    folder, config = _run_folder(tmp_path, ["--head.name", "adaface"])
    card.write_card(folder, config)
    stored = card.read_card(folder.model)
    assert stored["training"]["licence"] == "not stated"
    assert stored["training"]["data"].startswith("generated faces")
    assert {"head.adaface_m", "head.adaface_h"} <= set(stored["recipe"]) and "head.m2" not in stored["recipe"]


def test_update_card_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"network": "r_lite", "embedding_size": "128"})
    section = card.result_section("TinyFace", ["rank-1"], [[0.5]], {"rank": {"1": 0.5}}, "note", "evaluation.tinyface")
    readme = card.update_card(path, "tinyface", section)
    assert readme == tmp_path / "model.safetensors.README.md"
    stored = card.read_card(path)
    assert stored["results"]["tinyface"]["values"] == {"rank": {"1": 0.5}}
    assert stored["parameters"] > 0  # a card made from the metadata alone states the network's facts
    assert "### TinyFace" in readme.read_text() and "0.50000" in readme.read_text()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(card.CardError, match="inside a checkpoint"):
        card.update_card(path, "tinyface", section)


def test_onnx_metadata_round_trip(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["data"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    card.write_model_metadata(path, {"network": "r_lite", "embedding_size": "16"})
    card.update_card(path, "x", card.result_section("X", ["a"], [[1]]))
    metadata = card.read_model_metadata(path)
    assert json.loads(metadata["card"])["format"] == {"file": "onnx"}
    assert "input `data`, output `embedding`" in (tmp_path / "m.onnx.README.md").read_text()
    assert card.input_line(metadata).startswith("model r_lite (16-d): input aligned 112x112 RGB faces")
