"""Export a trained backbone: ONNX checked against PyTorch with onnxruntime, INT8 ONNX, or a checkpoint's model file.

    python -m trainer.export onnx --weights runs/x/model.safetensors --out model.onnx [--opset 17]
    python -m trainer.export onnx --int8 --calibration faces/ --weights runs/x --out model_int8.onnx [--bin val.bin]
    python -m trainer.export safetensors --checkpoint runs/x/checkpoints/step-00001234 --out model.safetensors

`onnx`: `--weights` is a `model.safetensors`, or a run or checkpoint folder holding one; network and embedding size
come from its metadata unless given (`models.weights.load_backbone`). The graph takes `data`, a float32
(N, 3, 112, 112) batch of RGB faces normalized as `(x / 255 - 0.5) / 0.5` (`data.dataset.normalize_images`), and
returns `embedding` (N, embedding size); N is dynamic. After export, onnxruntime runs random inputs in [-1, 1] at
`--batch-size` and at another batch size (proving the dynamic axis) and the largest absolute difference from PyTorch
is reported. The network, embedding size, input normalization and opset are written into the model's metadata_props.

`--opset` must be one the TorchScript-based exporter writes (`OPSETS`, 7 to 20 with torch 2.13).

`--int8`: a statically quantized model (onnxruntime's `quantize_static`, QDQ format: weights INT8 per output channel,
activations UINT8 per tensor, BatchNormalization left in float), from the FP32 export after its parity check and
onnxruntime's pre-processing (`quant_pre_process`: shape inference and graph optimization, which folds BatchNorms
into convolutions where it can). The activation ranges are calibrated on `--calibration`, a folder of aligned
112x112 face crops (searched recursively; at most `--calibration-count`, drawn with `--seed`; `--calibration-method`
minmax, entropy or percentile). The check, on held-out faces (`--held-out FOLDER`, or one in five of the calibration
folder, kept out of the calibration): each face's cosine between its INT8 and FP32 embeddings, min and mean; the
export fails (exit 1, no file) when the mean is below `--min-cosine` (default 0.99). With `--bin` (repeatable, e.g.
the generated `val.bin`), the verification accuracy (10 folds, flip-summed) of both models. `--exclude` keeps nodes
(by name or operator type, repeatable) in float.

Every export carries its card (`evaluation.card`): JSON in its `metadata_props` and `<out>.README.md` beside it (the
source model's card with the file's format; an INT8 model's card holds the comparison with FP32 instead of the
source's results). `safetensors` copies the checkpoint's card facts the same way (`<out>.README.md`).

A model that computes nothing meaningful is refused (exit 2): NaN or infinite weights (`models.weights`), a checkpoint
folder's model that fails its checksum, and finite weights whose embeddings are not finite on the parity inputs.

Exit status: 0 done; 1 the export ran but onnxruntime disagrees with PyTorch by more than `--tolerance` (a result
that failed its check, not bad input; a NaN from onnxruntime counts as an infinite difference); 2 bad input, or an
output that cannot be written (one line on stderr). Either failure leaves no file behind, neither a half-written
output nor a temporary one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.card import base_card, describe_input, read_card, write_card_for
from models.cli import atomic_output, report_input_error, setup_logging
from models.errors import InputError
from models.weights import load_backbone, resolve_weights_path

logger = logging.getLogger(__name__)

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_COUNT = 512
DEFAULT_MIN_COSINE = 0.99
# One face in this many of the calibration folder is held out for the check when no --held-out folder is given.
HELD_OUT_EVERY = 5


def _exporter_opsets() -> range:
    """The opsets `torch.onnx.export(..., dynamo=False)` writes: torch's own bounds (private constants, so with the
    values of torch 2.13 as a fallback). Opset 6 and below export but onnxruntime runs none of them."""
    from torch.onnx import _constants

    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    return range(max(low, 7), high + 1)


OPSETS = _exporter_opsets()


class ExportError(InputError):
    """Input that cannot be exported; the message names the file."""


class ParityError(Exception):
    """onnxruntime and PyTorch disagree by more than the tolerance: the export's result failed its check (exit 1).

    Not an `InputError`: the input was fine, the exported graph computes something else (an operator exported
    wrongly, or a `--tolerance` tighter than float rounding)."""


def export_onnx(
    backbone: nn.Module,
    out: Path,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 2,
    metadata: dict[str, str] | None = None,
) -> None:
    """TorchScript-based export (`dynamo=False`: no onnxscript needed) with a dynamic batch axis, then metadata."""
    import onnx
    from torch.onnx.errors import OnnxExporterError

    backbone = backbone.eval()
    example = torch.zeros(batch_size, 3, 112, 112)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        try:
            torch.onnx.export(
                backbone,
                (example,),
                str(out),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except OnnxExporterError as err:  # an operator this opset lacks: the user's choice of --opset
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ExportError(f"--opset {opset}: the backbone cannot be exported at this opset ({first})") from None
    model = onnx.load(str(out))
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def check_parity(
    backbone: nn.Module,
    onnx_path: Path,
    batch_sizes: Sequence[int],
    tolerance: float,
    seed: int = 0,
    name: Path | None = None,
    source: Path | None = None,
) -> float:
    """Max |onnxruntime - PyTorch| over random inputs in [-1, 1], one batch per size; raise above `tolerance`.

    PyTorch's embeddings must be finite (an `ExportError` naming `source`, the weights: a NaN on both sides would
    otherwise agree); a non-finite onnxruntime value counts as an infinite difference. `name`: the path to name in
    messages (the file checked may be a temporary one)."""
    import onnxruntime as ort

    name = name or onnx_path
    largest = 0.0

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in batch_sizes:
        data = torch.rand(size, 3, 112, 112, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = backbone.eval()(data).numpy()
        if not np.isfinite(expected).all():
            raise ExportError(
                f"{source or name}: the model's embeddings are not finite (NaN or infinite) on a batch of {size} "
                "random faces: a diverged or damaged model, refused"
            )
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: data.numpy()})
        if actual.shape != expected.shape:
            raise ParityError(f"{name}: batch of {size} gives shape {actual.shape}, PyTorch {expected.shape}")
        # max() would pass a NaN by (NaN compares False): a non-finite output is an infinite difference.
        difference = float(np.abs(actual - expected).max()) if np.isfinite(actual).all() else math.inf
        largest = max(largest, float(np.abs(expected).max()))
        logger.info(
            "parity, batch of %d: max abs difference %.3g (largest |embedding| value %.3g)",
            size,
            difference,
            float(np.abs(expected).max()),
        )
        worst = max(worst, difference)
    if not worst <= tolerance:  # NaN fails too
        raise ParityError(
            f"{name}: onnxruntime differs from PyTorch by up to {worst:.3g}, above the tolerance {tolerance:g} "
            f"(largest |embedding| value {largest:.3g}; --tolerance sets the threshold)"
        )
    return worst


def check_opset(opset: int) -> None:
    """An opset the TorchScript-based exporter writes, or ExportError naming the range."""
    if opset not in OPSETS:
        raise ExportError(
            f"--opset {opset}: not an opset this exporter writes ({OPSETS.start} to {OPSETS.stop - 1} with torch "
            f"{torch.__version__.split('+')[0]})"
        )


def onnx_metadata(weights: Path, network: str, embedding_size: int, opset: int) -> dict[str, str]:
    """What every exported ONNX file (FP32 and INT8) carries: the network, how to feed it, where it came from."""
    from trainer.checkpoint import MODEL_METADATA_INPUT

    return {
        "network": network,
        "embedding_size": str(embedding_size),
        "input": MODEL_METADATA_INPUT,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "opset": str(opset),
        "source": weights.name,
        "producer": "arcface-accelerate",
    }


def onnx_command(
    weights: Path,
    out: Path,
    network: str | None,
    embedding_size: int | None,
    opset: int,
    batch_size: int,
    tolerance: float,
) -> float:
    """Export, check parity at `batch_size` and `batch_size + 3`, and move the file into place; returns the max diff."""
    if batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {batch_size}")
    check_opset(opset)
    backbone, loaded = load_backbone(weights, network, embedding_size)
    network, embedding_size = loaded["network"], int(loaded["embedding_size"])
    metadata = onnx_metadata(weights, network, embedding_size, opset)
    with atomic_output(out) as tmp:  # a failed check or write leaves no file
        export_onnx(backbone, tmp, opset, batch_size, metadata)
        worst = check_parity(backbone, tmp, [batch_size, batch_size + 3], tolerance, name=out, source=weights)
        format_facts = {"file": "onnx", "opset": opset, "precision": "fp32", "parity_max_abs_diff": f"{worst:.3g}"}
        _add_metadata(tmp, {"card": json.dumps(export_card(weights, metadata, format_facts))})
    readme = write_card_for(out)
    logger.info("card: %s", readme)
    logger.info(
        "%s -> %s (%s, %d-d, opset %d): max abs difference %.3g (tolerance %g)",
        weights,
        out,
        network,
        embedding_size,
        opset,
        worst,
        tolerance,
    )
    return worst


def export_card(
    weights: Path, metadata: dict[str, str], format_facts: dict[str, Any], keep_results: bool = True
) -> dict:
    """The card of an export: the source model's (or one built from its metadata), with the export's format."""
    source = resolve_weights_path(weights, verify=False)
    card = read_card(source) or base_card(metadata, "onnx")
    card["format"] = format_facts
    card["input"] = describe_input(str(format_facts["file"]))
    card["exported_from"] = str(source)
    if not keep_results:
        card.pop("results", None)
    return card


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    """Add `entries` to an ONNX file's `metadata_props` in place (a temporary file of this export)."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


# --------------------------------------------------------------------------------------------------------------
# INT8


def _list_faces(folder: Path) -> list[Path]:
    from evaluation.embed import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise ExportError(f"{folder}: not a folder of aligned face crops")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _load_faces(paths: Sequence[Path]) -> torch.Tensor:
    """uint8 (N, 3, 112, 112) of aligned crops; another size or an unreadable file is an `ExportError` naming it."""
    from evaluation.embed import EmbedError, prepare_crop, read_image

    crops = []
    for path in paths:
        try:
            crops.append(prepare_crop(read_image(path), None, str(path)))
        except EmbedError as err:
            raise ExportError(f"calibration faces: {err}") from None
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def split_faces(calibration: Path, held_out: Path | None, count: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(calibration faces, held-out faces): without a held-out folder, one in `HELD_OUT_EVERY` of a seeded shuffle
    of the calibration folder is held out; at most `count` calibration faces, drawn from the rest."""
    files = _list_faces(calibration)
    order = np.random.default_rng(seed).permutation(len(files))
    shuffled = [files[i] for i in order]
    if held_out is None:
        if len(files) < 2:
            raise ExportError(f"{calibration}: {len(files)} face; a split needs 2 (or give --held-out)")
        held = shuffled[::HELD_OUT_EVERY]
        rest = [p for i, p in enumerate(shuffled) if i % HELD_OUT_EVERY]
    else:
        held, rest = _list_faces(held_out), shuffled
    return rest[:count], held


class _FaceBatches:
    """onnxruntime's `CalibrationDataReader`: normalized float32 batches of the calibration faces."""

    def __init__(self, faces: torch.Tensor, batch_size: int) -> None:
        from data.dataset import normalize_images

        self.batches = [
            {INPUT_NAME: normalize_images(faces[i : i + batch_size]).numpy()} for i in range(0, len(faces), batch_size)
        ]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def onnx_embeddings(path: Path, faces: torch.Tensor, flip: bool = False, batch_size: int = 64) -> np.ndarray:
    """Un-normalized embeddings (N, D) of uint8 crops by an ONNX model (`flip`: each face's mirror image instead)."""
    import onnxruntime as ort

    from data.dataset import normalize_images

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = []
    for start in range(0, len(faces), batch_size):
        batch = faces[start : start + batch_size]
        data = normalize_images(batch.flip(3) if flip else batch).numpy()
        chunks.append(session.run([OUTPUT_NAME], {INPUT_NAME: data})[0])
    return np.concatenate(chunks).astype(np.float64)


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return (first * second).sum(axis=1) / np.maximum(norms, 1e-12)


def bin_accuracy(path: Path, bin_file: Path) -> tuple[float, float]:
    """The `.bin` verification accuracy +- std of an ONNX model (flip-summed, 10 folds, `evaluation.verification`)."""
    from evaluation.verification import NUM_FOLDS, compute_accuracy, load_bin

    images, issame = load_bin(bin_file, folds=NUM_FOLDS)
    summed = onnx_embeddings(path, images) + onnx_embeddings(path, images, flip=True)
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    acc, std, _ = compute_accuracy(summed[0::2], summed[1::2], issame)
    return acc, std


def quantize(
    fp32: Path,
    out: Path,
    faces: torch.Tensor,
    method: str,
    exclude: Sequence[str],
    batch_size: int = 32,
) -> list[str]:
    """`quantize_static` of an FP32 ONNX file into `out` (QDQ, per-channel INT8 weights, UINT8 activations);
    returns the nodes kept in float by `exclude` (node names or operator types)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32.with_name(f"{fp32.stem}.prepared.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))
        graph = onnx.load(str(prepared)).graph
        excluded = [node.name for node in graph.node if node.name in exclude or node.op_type in exclude]
        # The nodes reading the input stay in float: normalized pixels take 256 values half a UINT8 step off its
        # grid ((x/255 - 0.5)/0.5 spans 255 steps of 2/255), so quantizing them rounds ties, and the output would
        # hang on the last bit of the normalization. The first convolution is a small share of the MACs.
        excluded += [node.name for node in graph.node if INPUT_NAME in node.input and node.name not in excluded]
        unknown = [name for name in exclude if not any(name in (n.name, n.op_type) for n in graph.node)]
        if unknown:
            raise ExportError(f"--exclude {unknown[0]!r}: no node or operator type of that name in the graph")
        # BatchNormalization stays in float: a BN the optimizer could not fold into a convolution has 1-d weights,
        # which per-channel quantization cannot take.
        op_types = sorted({node.op_type for node in graph.node} - {"BatchNormalization"})
        calibrate_method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[method]
        quantize_static(
            str(prepared),
            str(out),
            _FaceBatches(faces, batch_size),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded or None,
            calibrate_method=calibrate_method,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return excluded


def int8_command(
    weights: Path,
    out: Path,
    calibration: Path,
    held_out: Path | None,
    bins: Sequence[Path],
    network: str | None = None,
    embedding_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    method: str = "minmax",
    count: int = DEFAULT_CALIBRATION_COUNT,
    seed: int = 0,
    exclude: Sequence[str] = (),
    min_cosine: float = DEFAULT_MIN_COSINE,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Export FP32 (parity-checked), quantize, compare on held-out faces (and `bins`), write `out` with its card;
    returns the report (what the card's `int8` section holds). A mean cosine below `min_cosine` is a `ParityError`."""
    import tempfile

    from evaluation.card import result_section

    if method not in CALIBRATION_METHODS:
        raise ExportError(f"--calibration-method {method!r}: one of {', '.join(CALIBRATION_METHODS)}")
    check_opset(opset)
    if count < 1:
        raise ExportError(f"--calibration-count must be at least 1, got {count}")
    backbone, loaded = load_backbone(weights, network, embedding_size)
    network, embedding_size = loaded["network"], int(loaded["embedding_size"])
    cal_paths, held_paths = split_faces(calibration, held_out, count, seed)
    cal_faces, held_faces = _load_faces(cal_paths), _load_faces(held_paths)
    for bin_file in bins:  # every file is read before the long work
        from evaluation.verification import NUM_FOLDS, check_bin

        check_bin(bin_file, NUM_FOLDS)
    logger.info(
        "INT8: calibrating on %d faces of %s (%s), checking on %d held-out faces",
        len(cal_faces),
        calibration,
        method,
        len(held_faces),
    )
    metadata = onnx_metadata(weights, network, embedding_size, opset)
    with (
        tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as work,
        atomic_output(out) as tmp,
    ):
        fp32 = Path(work) / "fp32.onnx"
        export_onnx(backbone, fp32, opset, 2, metadata)
        check_parity(backbone, fp32, [2, 5], tolerance, name=out, source=weights)
        excluded = quantize(fp32, tmp, cal_faces, method, exclude)
        cos = cosines(onnx_embeddings(tmp, held_faces), onnx_embeddings(fp32, held_faces))
        report: dict[str, Any] = {
            "calibration": {"folder": str(calibration), "faces": len(cal_faces), "method": method, "seed": seed},
            "held_out": {"folder": str(held_out or calibration), "faces": len(held_faces)},
            "cosine_int8_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
            "excluded_nodes": excluded,
            "verification": {},
        }
        for bin_file in bins:
            fp32_acc, int8_acc = bin_accuracy(fp32, bin_file), bin_accuracy(tmp, bin_file)
            report["verification"][bin_file.stem] = {
                "pairs_file": str(bin_file),
                "fp32": {"acc": fp32_acc[0], "std": fp32_acc[1]},
                "int8": {"acc": int8_acc[0], "std": int8_acc[1]},
            }
        logger.info("INT8 vs FP32 on %d held-out faces: cosine min %.5f, mean %.5f", len(cos), cos.min(), cos.mean())
        for name, entry in report["verification"].items():
            logger.info("%s: accuracy FP32 %.5f, INT8 %.5f", name, entry["fp32"]["acc"], entry["int8"]["acc"])
        if not cos.mean() >= min_cosine:
            raise ParityError(
                f"{out}: the INT8 model's embeddings have a mean cosine of {cos.mean():.5f} to FP32's on "
                f"{len(cos)} held-out faces, below --min-cosine {min_cosine:g}: try another --calibration-method, "
                "more --calibration-count faces, or --exclude the layers that lose most (e.g. Gemm)"
            )
        rows = [["held-out faces", len(cos), f"min {cos.min():.5f}, mean {cos.mean():.5f}", ""]]
        for name, entry in report["verification"].items():
            fp32_text = f"{entry['fp32']['acc']:.5f} +- {entry['fp32']['std']:.5f}"
            rows.append(
                [f"{name} accuracy", "", fp32_text, f"{entry['int8']['acc']:.5f} +- {entry['int8']['std']:.5f}"]
            )
        note = (
            f"static INT8 (QDQ, per-channel weights) calibrated with {method} on {len(cal_faces)} faces of "
            f"{calibration.name}; cosine of each held-out face's INT8 and FP32 embeddings"
        )
        section = result_section(
            "INT8 against FP32", ["check", "faces", "cosine / FP32", "INT8"], rows, report, note, "trainer.export"
        )
        quantization = {
            "scheme": "static INT8, QDQ: weights QInt8 per channel, activations QUInt8 per tensor",
            "calibration": f"{method}, {len(cal_faces)} faces",
            "excluded": excluded,
        }
        format_facts = {"file": "onnx-int8", "opset": opset, "precision": "int8 (QDQ)"}
        card = export_card(weights, metadata, format_facts, keep_results=False)
        card["results"] = {"int8": section}
        _add_metadata(tmp, {**metadata, "quantization": json.dumps(quantization), "card": json.dumps(card)})
    logger.info("card: %s", write_card_for(out))
    logger.info("%s -> %s (%s, %d-d, INT8)", weights, out, network, embedding_size)
    return report


def safetensors_command(checkpoint: Path, out: Path) -> None:
    """Copy a checkpoint's `model.safetensors` (metadata included) after verifying the checkpoint's checksums."""
    import yaml

    from evaluation.card import read_model_metadata, run_card, write_model_metadata
    from models.run_folder import CheckpointFolder, RunFolder

    folder = CheckpointFolder(checkpoint)
    if not folder.manifest.is_file():
        raise ExportError(f"{checkpoint}: not a complete checkpoint folder (no {folder.MANIFEST})")
    folder.verify()  # a CheckpointError (an InputError) names the file that does not match
    source = folder.model
    if not source.is_file():
        raise ExportError(f"{checkpoint}: no {folder.MODEL}")
    run = RunFolder.of_checkpoint(folder.path)
    config = yaml.safe_load(run.config.read_text()) if run is not None and run.config.is_file() else None
    with atomic_output(out) as tmp:
        shutil.copyfile(source, tmp)
        if config is not None:  # the run's recipe: the card of a finished run's model, at this checkpoint's step
            card = run_card(read_model_metadata(tmp), config, step=folder.step)
            write_model_metadata(tmp, {"card": json.dumps(card, default=str)})
    logger.info("%s -> %s", source, out)
    logger.info("card: %s", write_card_for(out))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    onnx = commands.add_parser("onnx", help="model.safetensors -> model.onnx, with an onnxruntime parity check")
    onnx.add_argument(
        "--weights", type=Path, required=True, help="a model.safetensors, or a run or checkpoint folder holding one"
    )
    onnx.add_argument("--network", help="backbone name (default: the file's metadata)")
    onnx.add_argument("--embedding-size", type=int, help="default: the file's metadata, else the weights' shapes")
    onnx.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    onnx.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default: %(default)s)",
    )
    onnx.add_argument("--batch-size", type=int, default=2, help="example batch for tracing and parity (default: 2)")
    onnx.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted |onnxruntime - PyTorch| (default: %(default)g)",
    )
    int8 = onnx.add_argument_group("INT8 (--int8)")
    int8.add_argument("--int8", action="store_true", help="a statically quantized INT8 model (QDQ)")
    int8.add_argument("--calibration", type=Path, help="a folder of aligned 112x112 faces to calibrate on")
    int8.add_argument("--held-out", type=Path, help="faces to check on (default: 1 in 5 of --calibration, kept out)")
    int8.add_argument(
        "--bin", dest="bins", action="append", type=Path, default=[], help="a .bin: accuracy of FP32 and INT8"
    )
    int8.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax")
    int8.add_argument(
        "--calibration-count", type=int, default=DEFAULT_CALIBRATION_COUNT, help="faces to calibrate on at most"
    )
    int8.add_argument("--seed", type=int, default=0, help="which faces calibrate and which are held out")
    int8.add_argument("--exclude", action="append", default=[], help="a node name or operator type kept in float")
    int8.add_argument(
        "--min-cosine",
        type=float,
        default=DEFAULT_MIN_COSINE,
        help="fail below this mean INT8/FP32 cosine on the held-out faces (default: %(default)g)",
    )
    weights = commands.add_parser("safetensors", help="a checkpoint's model.safetensors, checksums verified")
    weights.add_argument("--checkpoint", type=Path, required=True, help="runs/x/checkpoints/step-XXXXXXXX")
    weights.add_argument("--out", type=Path, required=True, help="the model.safetensors to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if args.command == "onnx" and args.int8:
            if args.calibration is None:
                raise ExportError("--int8 needs --calibration FOLDER (aligned face crops)")
            int8_command(
                args.weights,
                args.out,
                args.calibration,
                args.held_out,
                args.bins,
                args.network,
                args.embedding_size,
                args.opset,
                args.calibration_method,
                args.calibration_count,
                args.seed,
                args.exclude,
                args.min_cosine,
                args.tolerance,
            )
        elif args.command == "onnx":
            if args.calibration or args.bins or args.held_out:
                raise ExportError("--calibration, --held-out and --bin are for --int8")
            onnx_command(
                args.weights, args.out, args.network, args.embedding_size, args.opset, args.batch_size, args.tolerance
            )
        else:
            safetensors_command(args.checkpoint, args.out)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except InputError as exc:
        return report_input_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
