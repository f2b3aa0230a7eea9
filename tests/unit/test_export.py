"""trainer.export: ONNX of a backbone (names, dynamic batch, opset, metadata, onnxruntime parity) and model copies."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from heads import PartialFC, PartialFCOptions
from models import build_backbone
from trainer import checkpoint as ckpt
from trainer import export
from trainer.export import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

EMBEDDING = 32


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("r_lite", num_features=EMBEDDING)
    with torch.no_grad():  # eval-mode BatchNorm with non-trivial statistics: the graph must fold them in correctly
        for name, buffer in model.named_buffers():
            if "running_mean" in name:
                buffer.uniform_(-0.2, 0.2)
            elif "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    ckpt.save_model(path, _backbone(), ckpt.model_metadata("r_lite", EMBEDDING))
    return path


@pytest.fixture(scope="module")
def exported(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The CLI's default export (opset 17, batch 2) and what it logged."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    handler, logger = _Records(), logging.getLogger("trainer.export")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert main(["onnx", "--weights", str(weights), "--out", str(out)]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, "\n".join(handler.lines)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _dims(value: Any) -> list[int | str]:  # an onnx.ValueInfoProto
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_names_dynamic_batch_opset_and_metadata(exported: tuple[Path, str]) -> None:
    model = onnx.load(str(exported[0]))
    onnx.checker.check_model(model)
    assert [(i.name, _dims(i)) for i in model.graph.input] == [("data", ["batch", 3, 112, 112])]
    assert [(o.name, _dims(o)) for o in model.graph.output] == [("embedding", ["batch", EMBEDDING])]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    props = {p.key: p.value for p in model.metadata_props}
    assert props["network"] == "r_lite" and props["embedding_size"] == "32" and props["opset"] == "17"
    assert props["input"] == ckpt.MODEL_METADATA_INPUT == "RGB 112x112, (x/255 - 0.5) / 0.5"


def test_parity_is_reported_for_two_batch_sizes(exported: tuple[Path, str]) -> None:
    log = exported[1]
    assert "parity, batch of 2: max abs difference" in log and "parity, batch of 5: max abs difference" in log
    assert "(tolerance 0.0001)" in log


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_pytorch_at_other_batch_sizes(exported: tuple[Path, str], batch: int) -> None:
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    data = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    (actual,) = session.run(["embedding"], {"data": data.numpy()})
    with torch.no_grad():
        expected = _backbone()(data).numpy()
    assert actual.shape == (batch, EMBEDDING)
    assert np.abs(actual - expected).max() < 1e-4
    assert np.abs(expected).max() > 1.0  # a real signal, not a near-zero output that anything would match


def test_evaluation_loads_the_export(exported: tuple[Path, str]) -> None:
    """`python -m evaluation.ijb --onnx model.onnx` loads it through this function."""
    from evaluation.ijb import load_onnx_embedder

    embed, description = load_onnx_embedder(exported[0], torch.device("cpu"))
    assert description["input"] == "data"
    data = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(embed(data), _backbone()(data), rtol=1e-4, atol=1e-4)


def test_parity_failure_exits_nonzero_and_leaves_no_file(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ONNX graph that computes something else (here: another backbone's weights) is refused."""
    real_export = export.export_onnx

    def export_other(backbone: nn.Module, out: Path, *args: object, **kwargs: object) -> None:
        real_export(_backbone(seed=1), out, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(export, "export_onnx", export_other)
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--weights", str(weights), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {out}: onnxruntime differs from PyTorch by up to" in err and "above the tolerance 0.0001" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_nan_from_onnxruntime_is_an_infinite_difference(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """max() passes a NaN by (it compares False): the parity check must not report 0 for it."""
    real_session = ort.InferenceSession

    class NaNSession:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.session = real_session(*args, **kwargs)

        def run(self, *args: Any) -> list[np.ndarray]:
            return [np.full_like(self.session.run(*args)[0], np.nan)]

    monkeypatch.setattr(ort, "InferenceSession", NaNSession)
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--weights", str(weights), "--out", str(out)]) == 1
    assert f"error: {out}: onnxruntime differs from PyTorch by up to inf" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_models_that_compute_nothing_and_bad_opsets_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite weights whose embeddings overflow: refused by name (exit 2), not exported with "difference 0"."""
    model = _backbone()
    with torch.no_grad():
        model.get_parameter("fc.weight").fill_(3e38)  # the largest float32s: finite, and every sum of them overflows
    source = tmp_path / "overflow.safetensors"
    ckpt.save_model(source, model, ckpt.model_metadata("r_lite", EMBEDDING))
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--weights", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}: the model's embeddings are not finite (NaN or infinite)"), err
    for opset in ("6", "21", "0"):
        assert main(["onnx", "--weights", str(source), "--out", str(out), "--opset", opset]) == 2
        assert f"error: --opset {opset}: not an opset this exporter writes (7 to 20" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflow.safetensors"]


def test_network_from_the_command_line_when_metadata_lacks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in _backbone().state_dict().items()}, str(bare))  # no metadata
    assert main(["onnx", "--weights", str(bare), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no 'network' in its metadata: pass --network" in capsys.readouterr().err
    assert (
        main(
            [
                "onnx",
                "--weights",
                str(bare),
                "--network",
                "r18",
                "--embedding-size",
                "32",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    assert "does not fit network 'r18'" in capsys.readouterr().err
    assert main(["onnx", "--weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err


def test_onnx_from_a_checkpoint_folder(tmp_path: Path) -> None:
    """`--weights runs/x/checkpoints/step-N` (a folder that exists) uses its model.safetensors."""
    backbone, head = _backbone(seed=2), PartialFC(PartialFCOptions(EMBEDDING, 4, rank=0, world_size=1))
    optimizer = torch.optim.SGD([{"params": list(backbone.parameters())}, {"params": list(head.parameters())}], lr=0.1)
    path = ckpt.save_checkpoint(
        tmp_path / "run",
        step=3,
        rank=0,
        world_size=1,
        barrier=lambda: None,
        backbone=backbone,
        head=head,
        backbone_group=(optimizer, 0),
        head_group=(optimizer, 1),
        trainer_state={"step": 3},
        metadata=ckpt.model_metadata("r_lite", EMBEDDING),
        keep=1,
    )
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--weights", str(path), "--out", str(out)]) == 0
    data = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
    (actual,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"data": data.numpy()})
    with torch.no_grad():
        expected = backbone.eval()(data).numpy()
    assert np.abs(actual - expected).max() < 1e-4 and np.abs(expected).max() > 1.0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["network"] == "r_lite" and props["embedding_size"] == str(EMBEDDING)


def test_safetensors_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone, head = _backbone(), PartialFC(PartialFCOptions(EMBEDDING, 4, rank=0, world_size=1))
    optimizer = torch.optim.SGD([{"params": list(backbone.parameters())}, {"params": list(head.parameters())}], lr=0.1)
    path = ckpt.save_checkpoint(
        tmp_path / "run",
        step=5,
        rank=0,
        world_size=1,
        barrier=lambda: None,
        backbone=backbone,
        head=head,
        backbone_group=(optimizer, 0),
        head_group=(optimizer, 1),
        trainer_state={"step": 5},
        metadata=ckpt.model_metadata("r_lite", EMBEDDING),
        keep=1,
    )
    out = tmp_path / "exported" / "model.safetensors"
    assert main(["safetensors", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert out.read_bytes() == (path / "model.safetensors").read_bytes()
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata()["network"] == "r_lite"

    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))
    assert main(["safetensors", "--checkpoint", str(path), "--out", str(tmp_path / "other.safetensors")]) == 2
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err


@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_zoo_backbone_exports_with_parity(tmp_path: Path, network: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One small member of each new family (MobileFaceNet: depthwise convs, GDC; ViT: SDPA attention, no masking
    in eval) through the CLI, then an onnxruntime run of the file against PyTorch at another batch size."""
    torch.manual_seed(0)
    model = build_backbone(network, num_features=EMBEDDING)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in _backbone
        for name, buffer in model.named_buffers():
            if "running_mean" in name:
                buffer.uniform_(-0.2, 0.2)
            elif "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    weights = tmp_path / "model.safetensors"
    ckpt.save_model(weights, model, ckpt.model_metadata(network, EMBEDDING))
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--weights", str(weights), "--out", str(out)]) == 0, capsys.readouterr().err

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    data = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1
    (actual,) = session.run(["embedding"], {"data": data.numpy()})
    with torch.no_grad():
        expected = model.eval()(data).numpy()
    assert actual.shape == (3, EMBEDDING)
    assert np.abs(actual - expected).max() < 1e-4
    assert np.abs(expected).max() > 0.5
