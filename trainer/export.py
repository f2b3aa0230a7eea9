"""Export a trained backbone: ONNX checked against PyTorch with onnxruntime, or the model file of a checkpoint.

    python -m trainer.export onnx --weights runs/x/model.safetensors --out model.onnx [--opset 17]
    python -m trainer.export safetensors --checkpoint runs/x/checkpoints/step-00001234 --out model.safetensors

`onnx`: `--weights` is a `model.safetensors`, or a run or checkpoint folder holding one; network and embedding size
come from its metadata unless given (`models.weights.load_backbone`). The graph takes `data`, a float32
(N, 3, 112, 112) batch of RGB faces normalized as `(x / 255 - 0.5) / 0.5` (`data.dataset.normalize_images`), and
returns `embedding` (N, embedding size); N is dynamic. After export, onnxruntime runs random inputs in [-1, 1] at
`--batch-size` and at another batch size (proving the dynamic axis) and the largest absolute difference from PyTorch
is reported. The network, embedding size, input normalization and opset are written into the model's metadata_props.

`--opset` must be one the TorchScript-based exporter writes (`OPSETS`, 7 to 20 with torch 2.13).

A model that computes nothing meaningful is refused (exit 2): NaN or infinite weights (`models.weights`), a checkpoint
folder's model that fails its checksum, and finite weights whose embeddings are not finite on the parity inputs.

Exit status: 0 done; 1 the export ran but onnxruntime disagrees with PyTorch by more than `--tolerance` (a result
that failed its check, not bad input; a NaN from onnxruntime counts as an infinite difference); 2 bad input, or an
output that cannot be written (one line on stderr). Either failure leaves no file behind, neither a half-written
output nor a temporary one.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cli import atomic_output, report_input_error, setup_logging
from models.errors import InputError
from models.weights import load_backbone

logger = logging.getLogger(__name__)

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4


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
    from trainer.checkpoint import MODEL_METADATA_INPUT

    if batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {batch_size}")
    if opset not in OPSETS:
        raise ExportError(
            f"--opset {opset}: not an opset this exporter writes ({OPSETS.start} to {OPSETS.stop - 1} with torch "
            f"{torch.__version__.split('+')[0]})"
        )
    backbone, loaded = load_backbone(weights, network, embedding_size)
    network, embedding_size = loaded["network"], int(loaded["embedding_size"])
    metadata = {
        "network": network,
        "embedding_size": str(embedding_size),
        "input": MODEL_METADATA_INPUT,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "opset": str(opset),
        "source": weights.name,
        "producer": "arcface-accelerate",
    }
    with atomic_output(out) as tmp:  # a failed check or write leaves no file
        export_onnx(backbone, tmp, opset, batch_size, metadata)
        worst = check_parity(backbone, tmp, [batch_size, batch_size + 3], tolerance, name=out, source=weights)
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


def safetensors_command(checkpoint: Path, out: Path) -> None:
    """Copy a checkpoint's `model.safetensors` (metadata included) after verifying the checkpoint's checksums."""
    from models.run_folder import CheckpointFolder

    folder = CheckpointFolder(checkpoint)
    if not folder.manifest.is_file():
        raise ExportError(f"{checkpoint}: not a complete checkpoint folder (no {folder.MANIFEST})")
    folder.verify()  # a CheckpointError (an InputError) names the file that does not match
    source = folder.model
    if not source.is_file():
        raise ExportError(f"{checkpoint}: no {folder.MODEL}")
    with atomic_output(out) as tmp:
        shutil.copyfile(source, tmp)
    logger.info("%s -> %s", source, out)


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
    weights = commands.add_parser("safetensors", help="a checkpoint's model.safetensors, checksums verified")
    weights.add_argument("--checkpoint", type=Path, required=True, help="runs/x/checkpoints/step-XXXXXXXX")
    weights.add_argument("--out", type=Path, required=True, help="the model.safetensors to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if args.command == "onnx":
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
