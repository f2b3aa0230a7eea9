"""INT8 ONNX (`trainer.export onnx --int8`): a QDQ model with per-channel weights, its report checked against
embeddings computed here (onnxruntime on the written file, PyTorch for FP32), its card, and the refusal below
--min-cosine. The export cards of the FP32 ONNX and safetensors paths."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data.dataset import normalize_images
from data.faces import encode_jpeg, identity_params, render_face
from evaluation.card import read_model_metadata
from models import build_backbone
from trainer import export

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=16).eval()
    weights = folder / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(weights),
        metadata={"network": "r_lite", "embedding_size": "16"},
    )
    faces = folder / "faces"
    rng = np.random.default_rng(0)
    for identity in range(5):
        (faces / f"{identity}").mkdir(parents=True)
        for image in range(4):
            crop = render_face(identity_params(0, identity), rng)
            Image.fromarray(crop).save(faces / f"{identity}" / f"{image}.png")
    jpegs = [encode_jpeg(render_face(identity_params(1, i % 4), rng), 90) for i in range(20)]
    val = folder / "val.bin"
    val.write_bytes(pickle.dumps((jpegs, [bool(i % 2) for i in range(10)]), protocol=4))
    return weights, faces, val, backbone


def test_int8_export_and_its_report(inputs: tuple[Path, Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    weights, faces, val, backbone = inputs
    out = tmp_path / "model_int8.onnx"
    report = export.int8_command(weights, out, faces, None, [val], count=16, min_cosine=0.0)
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # The convolution reading the input stays in float (its input is not quantized).
    assert not any(n.op_type == "QuantizeLinear" and "data" in n.input for n in graph.node)
    assert report["excluded_nodes"] == [n.name for n in graph.node if n.op_type == "Conv"][:1]
    # Per-channel weights: some DequantizeLinear has a vector of scales.
    initializers = {init.name: init for init in graph.initializer}
    scales = [
        initializers[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[1] in initializers
    ]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)

    # The held-out faces: one in five of a seeded shuffle, never calibrated on.
    calibrated, held = export.split_faces(faces, None, 16, 0)
    assert len(held) == 4 and not set(held) & set(calibrated) and len(calibrated) == 16
    crops = np.stack([np.asarray(Image.open(p)) for p in held])
    # The project's one normalization, bit for bit: a quantized model's output moves with the input's last bit.
    x = normalize_images(torch.from_numpy(crops).permute(0, 3, 1, 2))
    with torch.no_grad():
        fp32 = backbone(x).numpy()
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})[0]
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert report["cosine_int8_fp32"]["min"] == pytest.approx(cos.min(), abs=1e-5)
    assert report["cosine_int8_fp32"]["mean"] == pytest.approx(cos.mean(), abs=1e-5)
    entry = report["verification"]["val"]
    assert set(entry) == {"pairs_file", "fp32", "int8"} and 0.0 <= entry["int8"]["acc"] <= 1.0

    metadata = read_model_metadata(out)
    card = json.loads(metadata["card"])
    assert (
        card["format"]["file"] == "onnx-int8"
        and json.loads(metadata["quantization"])["calibration"] == "minmax, 16 faces"
    )
    assert card["results"]["int8"]["values"]["cosine_int8_fp32"] == report["cosine_int8_fp32"]
    readme = (tmp_path / "model_int8.onnx.README.md").read_text()
    assert "INT8 against FP32" in readme and "input `data`, output `embedding`" in readme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_int8.onnx", "model_int8.onnx.README.md"]


def test_below_min_cosine_writes_nothing(
    inputs: tuple[Path, Path, Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, faces, _, _ = inputs
    out = tmp_path / "m.onnx"
    argv = ["onnx", "--int8", "--weights", str(weights), "--calibration", str(faces), "--out", str(out)]
    assert export.main([*argv, "--calibration-count", "8", "--min-cosine", "1.01"]) == 1
    assert "below --min-cosine 1.01" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert export.main([*argv, "--exclude", "NoSuchNode"]) == 2
    assert export.main([*argv, "--opset", "99"]) == 2  # refused before the calibration faces are read
    assert "error: --opset 99: not an opset this exporter writes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fp32_export_carries_the_card(inputs: tuple[Path, Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    weights, _, _, _ = inputs
    out = tmp_path / "model.onnx"
    assert export.main(["onnx", "--weights", str(weights), "--out", str(out)]) == 0
    card = json.loads(read_model_metadata(out)["card"])
    assert card["format"]["file"] == "onnx" and card["format"]["opset"] == 17 and card["parameters"] > 0
    assert (tmp_path / "model.onnx.README.md").is_file()
