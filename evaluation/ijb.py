"""IJB-B / IJB-C evaluation of backbones (.safetensors) or ONNX models: 1:1 TAR at FAR, 1:N CMC and TPIR at FPIR.

1:N runs where its files are there.

    python -m evaluation.ijb --weights model.safetensors --root IJB_release/IJBC --target IJBC --out results/
    accelerate launch --config_file accelerate_configs/cpu_ddp_2proc.yaml -m evaluation.ijb --weights ... --out ...

Each process aligns and embeds a contiguous share of the faces; the shares are gathered back into file order, so
the numbers do not depend on the batch size or the number of processes (up to float rounding in the backbone).
Layout and protocol: `evaluation.ijb_meta`, `evaluation.ijb_metrics`, docs/ijb.md.

`--weights` also takes a run's output folder or a checkpoint folder (its `model.safetensors`, checked against the
checkpoint's manifest). Bad input (a missing, unfitting or damaged model, one whose weights or embeddings are not
finite, a malformed meta file, an unreadable image, an output folder that cannot be written) is one line on stderr
and exit status 2; the output files are written atomically. A TAR at a FAR below 1 / impostor pairs is not resolved:
`n/r` in the table, null in `results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.dataset import mirror_images, normalize_images
from data.recordio import decode_image
from evaluation.alignment import ALIGNED_SIZE, align_face
from evaluation.ijb_meta import TARGETS, Faces, IJBFormatError, Protocol, load_protocol
from evaluation.ijb_metrics import (
    CMC_RANKS,
    FAR_TARGETS,
    FPIR_TARGETS,
    IdentificationResult,
    RocPoint,
    RocResult,
    face_features,
    identification_metrics,
    pair_scores,
    template_features,
    verification_metrics,
)
from models.cli import atomic_output, output_folder, report_input_error, setup_logging
from models.errors import InputError
from models.weights import WeightsError, load_backbone

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

# An embedder maps a normalized float32 (B, 3, 112, 112) batch on the run's device to (B, D) embeddings.
Embedder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a run of the report."""

    name: str
    kind: Literal["safetensors", "onnx"]
    path: Path


@dataclass(frozen=True)
class Settings:
    """The published ablations: flip test (F), feature norm kept (N), detector-score weighting (D)."""

    flip: bool = True
    norm: bool = True
    det_score: bool = True


@dataclass
class RunResult:
    spec: ModelSpec
    description: dict[str, Any]
    embeddings: np.ndarray  # (N, views, D) float32, file order
    template_ids: np.ndarray
    template_feats: np.ndarray
    scores: np.ndarray
    verification: RocResult
    identification: list[IdentificationResult]


# --------------------------------------------------------------------------------------------------------------
# Models


def load_torch_embedder(
    path: Path, network: str | None, embedding_size: int | None, device: torch.device
) -> tuple[Embedder, dict[str, Any]]:
    """A backbone from a safetensors state dict (`models.weights.load_backbone`: network and size from the
    arguments, else the file's metadata)."""
    backbone, metadata = load_backbone(path, network, embedding_size, device)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return backbone(batch).float()

    description = {"kind": "safetensors", "path": str(path), "network": metadata["network"]}
    return embed, {**description, "embedding_size": int(metadata["embedding_size"])}


def load_onnx_embedder(path: Path, device: torch.device) -> tuple[Embedder, dict[str, Any]]:
    """An ONNX model through onnxruntime: input `data` (or its only input), NCHW float32 normalized RGB."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise WeightsError("--onnx needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    if not path.is_file():
        raise WeightsError(f"onnx model {path} not found")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            logger.warning("onnxruntime has no CUDA provider (pip install onnxruntime-gpu): %s runs on the CPU", path)
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise WeightsError(f"onnx model {path} cannot be loaded ({err})") from None
    inputs = session.get_inputs()
    named = [item for item in inputs if item.name == "data"]
    if not named and len(inputs) != 1:
        raise WeightsError(f"onnx model {path}: no input named 'data' among {[item.name for item in inputs]}")
    model_input = named[0] if named else inputs[0]
    shape = list(model_input.shape)
    if len(shape) != 4 or any(
        isinstance(dim, int) and dim != want for dim, want in zip(shape[1:], (3, 112, 112), strict=True)
    ):
        raise WeightsError(
            f"onnx model {path}: input {model_input.name!r} has shape {shape}, expected (N, 3, 112, 112)"
        )
    # Some exports fix the batch dimension: feed them that many images at a time, zero-padding the last chunk.
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    output_name = session.get_outputs()[0].name

    def embed(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        step = fixed_batch or len(array)
        outputs = []
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            result = np.asarray(session.run([output_name], {model_input.name: chunk})[0], dtype=np.float32)
            outputs.append(result.reshape(len(chunk), -1)[: min(step, len(array) - start)])
        return torch.from_numpy(np.concatenate(outputs))

    return embed, {"kind": "onnx", "path": str(path), "input": model_input.name, "providers": session.get_providers()}


def model_specs(weights: Sequence[Path], onnx: Sequence[Path]) -> list[ModelSpec]:
    """One run per file, named by its stem; files sharing a stem are told apart by their folder."""
    items: list[tuple[Literal["safetensors", "onnx"], Path]] = [("safetensors", p) for p in weights]
    items += [("onnx", p) for p in onnx]
    stems = [path.stem for _, path in items]
    names = []
    for (_, path), stem in zip(items, stems, strict=True):
        name = stem if stems.count(stem) == 1 else f"{path.parent.name}/{stem}"
        while name in names:
            name += "'"
        names.append(name)
    return [ModelSpec(name, kind, path) for (kind, path), name in zip(items, names, strict=True)]


# --------------------------------------------------------------------------------------------------------------
# Feature extraction


class AlignedFaces(Dataset):
    """Faces `positions` of the protocol, decoded and aligned: `(position, uint8 (3, 112, 112) RGB, error)`.

    A face that cannot be read comes back as zeros with a one-line error naming the file and line, rather than as an
    exception: in a DataLoader worker the exception would arrive wrapped in a traceback, and in a multi-process run
    a rank that raised alone would leave the others waiting in the gather.
    """

    def __init__(self, faces: Faces, image_dir: Path, landmark_file: Path, positions: range) -> None:
        self.faces = faces
        self.image_dir = image_dir
        self.landmark_file = landmark_file
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        position = self.positions[index]
        path = self.image_dir / self.faces.image_names[position]
        try:
            aligned = align_face(decode_image(path.read_bytes()), self.faces.landmarks[position])
        except Exception as err:  # decoders, the file system and degenerate landmarks raise many types
            line = self.faces.lines[position]
            message = f"{self.landmark_file}:{line}: image {path}: {err}"
            return position, torch.zeros((3, ALIGNED_SIZE, ALIGNED_SIZE), dtype=torch.uint8), message
        return position, torch.from_numpy(np.ascontiguousarray(aligned.transpose(2, 0, 1))), ""


def shard(num_items: int, num_processes: int, process_index: int) -> range:
    """This process's contiguous share: `ceil(n / p)` items each, the last shares shorter (possibly empty)."""
    per_process = -(-num_items // num_processes)
    start = min(process_index * per_process, num_items)
    return range(start, min(start + per_process, num_items))


def extract_embeddings(
    embed: Embedder,
    protocol: Protocol,
    accelerator: Accelerator,
    batch_size: int,
    flip: bool,
    workers: int,
    label: str = "",
) -> np.ndarray:
    """Embeddings `(N, views, D)` float32 of every face in file order (view 1: the flipped image), on every process.

    Collective: every process must call it, with the same protocol.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    num_faces = len(protocol.faces)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    positions = shard(num_faces, world, rank)
    dataset = AlignedFaces(protocol.faces, protocol.image_dir, protocol.landmark_file, positions)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    chunks: list[np.ndarray] = []
    error = ""
    progress = Progress(
        TextColumn(f"[bold]embed {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
        transient=True,
    )
    with progress, torch.inference_mode():
        task = progress.add_task("embed", total=len(dataset))
        for _, images, errors in loader:
            error = next((message for message in errors if message), "")
            if error:
                break  # stop reading, but still meet the other processes below
            batch = normalize_images(images.to(device))
            views = [batch, mirror_images(batch)] if flip else [batch]
            # Image and flip in one forward: in eval mode every sample is computed on its own.
            out = embed(torch.cat(views)).float().cpu().numpy()
            chunks.append(out.reshape(len(views), len(batch), -1).transpose(1, 0, 2))
            progress.advance(task, len(batch))
    # Every process reaches these collectives, failed or not; all of them then fail alike.
    failed = accelerator.gather(torch.tensor([1 if error else 0], device=device)).cpu()
    if failed.any():
        if error:
            raise IJBFormatError(error)
        raise IJBFormatError(f"process {int(failed.nonzero()[0, 0])} could not read an image (its error names it)")
    if chunks:
        local = np.concatenate(chunks)
    else:  # no faces here (more processes than faces): one dummy forward tells the embedding size
        with torch.inference_mode():
            dim = embed(torch.zeros((1, 3, ALIGNED_SIZE, ALIGNED_SIZE), device=device)).shape[-1]
        local = np.zeros((0, 2 if flip else 1, dim), dtype=np.float32)
    # Pad every share to the same length for the all-gather; shares are contiguous, so concatenating the ranks'
    # blocks and dropping each block's padding restores file order.
    per_process = -(-num_faces // world)
    block = np.zeros((per_process, *local.shape[1:]), dtype=np.float32)
    block[: len(local)] = local
    index = np.full(per_process, -1, dtype=np.int64)
    index[: len(positions)] = np.asarray(positions, dtype=np.int64)
    gathered = accelerator.gather(torch.from_numpy(block).to(device)).cpu().numpy()
    gathered_index = accelerator.gather(torch.from_numpy(index).to(device)).cpu().numpy()
    keep = gathered_index >= 0
    if not np.array_equal(gathered_index[keep], np.arange(num_faces)):
        raise RuntimeError("gathered embeddings are not in file order: the processes disagree on the sharding")
    return gathered[keep]


# --------------------------------------------------------------------------------------------------------------
# Scoring and the report


def score_run(
    spec: ModelSpec, description: dict[str, Any], embeddings: np.ndarray, protocol: Protocol, settings: Settings
) -> RunResult:
    """All numbers of one model from its embeddings."""
    faces = protocol.faces
    features = face_features(
        embeddings, faces.det_scores, flip=settings.flip, norm=settings.norm, det_score=settings.det_score
    )
    template_ids, template_feats = template_features(features, faces.templates, faces.medias)
    pairs = protocol.pairs
    scores = pair_scores(template_ids, template_feats, pairs.template1, pairs.template2)
    verification = verification_metrics(pairs.labels, scores)
    identification = []
    if protocol.probes is not None:
        probes = protocol.probes
        probe_feats = template_feats[np.searchsorted(template_ids, probes.templates)]
        for gallery in protocol.galleries:
            gallery_feats = template_feats[np.searchsorted(template_ids, gallery.templates)]
            identification.append(
                identification_metrics(probe_feats, probes.subjects, gallery_feats, gallery.subjects, gallery.name)
            )
    return RunResult(spec, description, embeddings, template_ids, template_feats, scores, verification, identification)


def _key(value: float) -> str:
    return f"{value:g}"


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: they become null."""
    return float(value) if math.isfinite(value) else None


def _measured(point: RocPoint, value: float) -> float | None:
    """A value read at a ROC point, or None (JSON null) where the point's FAR is not resolved or the value is not
    finite."""
    return _number(value) if point.resolved else None


def mean_identification(results: list[IdentificationResult]) -> dict[str, dict[str, float | None]]:
    """The mean over the galleries, the summary insightface's 1:N script prints."""
    return {
        "cmc": {f"rank{rank}": _number(float(np.mean([r.cmc[rank] for r in results]))) for rank in CMC_RANKS},
        "tpir_at_fpir": {
            _key(target): _number(float(np.mean([r.tpir[i].tpir for r in results])))
            for i, target in enumerate(FPIR_TARGETS)
        },
    }


def _identification_json(results: list[IdentificationResult]) -> dict[str, Any] | None:
    if not results:
        return None
    out: dict[str, Any] = {}
    for result in results:
        out[result.gallery] = {
            "gallery_templates": result.num_gallery_templates,
            "gallery_subjects": result.num_gallery_subjects,
            "mated_probes": result.num_mated,
            "nonmated_probes": result.num_nonmated,
            "cmc": {f"rank{rank}": _number(value) for rank, value in result.cmc.items()},
            "tpir_at_fpir": {_key(p.fpir_target): _number(p.tpir) for p in result.tpir},
            "fpir_read": {_key(p.fpir_target): _number(p.fpir) for p in result.tpir},
            "threshold": {_key(p.fpir_target): _number(p.threshold) for p in result.tpir},
        }
    out["mean"] = mean_identification(results)
    return out


def results_json(protocol: Protocol, settings: Settings, runs: list[RunResult], extraction: dict[str, Any]) -> dict:
    """The `results.json` document."""
    pairs = protocol.pairs
    return {
        "target": protocol.target,
        "root": str(protocol.root),
        "protocol": {
            "faces": len(protocol.faces),
            "templates": int(len(np.unique(protocol.faces.templates))),
            "pairs": len(pairs),
            "genuine_pairs": int(pairs.labels.sum()),
            "impostor_pairs": int(len(pairs) - pairs.labels.sum()),
            "galleries": {g.name: len(g.templates) for g in protocol.galleries},
            "probes": None if protocol.probes is None else len(protocol.probes.templates),
        },
        "settings": {"flip": settings.flip, "norm": settings.norm, "det_score": settings.det_score},
        "extraction": extraction,
        "runs": [
            {
                "name": run.spec.name,
                "model": run.description,
                "verification": {
                    # null where the FAR is not resolved: below 1 / impostor pairs nothing was measured.
                    "tar_at_far": {_key(p.far_target): _measured(p, p.tar) for p in run.verification.points},
                    "far_read": {_key(p.far_target): _measured(p, p.far) for p in run.verification.points},
                    "threshold": {_key(p.far_target): _measured(p, p.threshold) for p in run.verification.points},
                    "resolved": {_key(p.far_target): p.resolved for p in run.verification.points},
                    "lowest_far": 1.0 / run.verification.num_impostor,
                    "auc": run.verification.auc,
                },
                "identification": _identification_json(run.identification),
            }
            for run in runs
        ],
    }


def write_card_section(run: RunResult, protocol: Protocol, settings: Settings) -> Path:
    """Add a run's 1:1 TARs (and 1:N means) to its model's card (`evaluation.card`, section `ijb_<target>`)."""
    from evaluation.card import result_section, update_card
    from models.weights import resolve_weights_path

    model = run.spec.path if run.spec.kind == "onnx" else resolve_weights_path(run.spec.path, verify=False)
    points = run.verification.points
    columns = ["protocol", *[f"TAR@FAR={p.far_target:.0e}" for p in points], "AUC"]
    mode = f"N{settings.norm:d}D{settings.det_score:d}F{settings.flip:d}"
    rows: list[list[Any]] = [
        [f"{protocol.target} 1:1, {mode}", *(f"{p.tar:.5f}" if p.resolved else NOT_RESOLVED for p in points)]
        + [f"{run.verification.auc:.5f}"]
    ]
    values: dict[str, Any] = {
        "tar_at_far": {_key(p.far_target): _measured(p, p.tar) for p in points},
        "pairs": len(protocol.pairs),
        "settings": {"flip": settings.flip, "norm": settings.norm, "det_score": settings.det_score},
    }
    if run.identification:
        values["identification_mean"] = mean_identification(run.identification)
    note = f"{protocol.target} ({len(protocol.pairs)} template pairs); {NOT_RESOLVED}: FAR below 1 / impostor pairs"
    section = result_section(f"{protocol.target}", columns, rows, values, note, "evaluation.ijb")
    return update_card(model, f"ijb_{protocol.target.lower()}", section)


def plot_roc(path: Path, target: str, runs: list[RunResult]) -> bool:
    """Write the ROC curves (log-scale FAR) as a PNG; False (and a warning) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no ROC plot (pip install matplotlib)")
        return False
    figure = Figure(figsize=(7, 5), dpi=120)
    axes = figure.subplots()
    lowest = 1.0
    for run in runs:
        fpr, tpr = run.verification.fpr, run.verification.tpr
        shown = fpr > 0  # a log axis has no place for FAR 0
        axes.plot(fpr[shown], tpr[shown], lw=1.2, label=f"{run.spec.name} (AUC {100 * run.verification.auc:.2f}%)")
        in_range = shown & (fpr >= FAR_TARGETS[0])
        if in_range.any():
            lowest = min(lowest, float(tpr[in_range].min()))
    axes.set_xscale("log")
    axes.set_xlim(FAR_TARGETS[0], 1.0)
    # insightface's plots start at TAR 0.3; weaker models need more room.
    axes.set_ylim(min(0.3, math.floor(10 * lowest) / 10), 1.0)
    axes.set_xlabel("False Accept Rate")
    axes.set_ylabel("True Accept Rate")
    axes.set_title(f"ROC on {target} (1:1)")
    axes.grid(linestyle="--", linewidth=0.5)
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return True


def _percent(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:.2f}"


# What the table shows for a TAR at a FAR the pairs cannot resolve (explained in its caption).
NOT_RESOLVED = "n/r"


def print_report(protocol: Protocol, settings: Settings, runs: list[RunResult]) -> None:
    """The rich tables: TAR (%) at each FAR; 1:N CMC and TPIR (%) per gallery."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 160)
    mode = f"N{settings.norm:d}D{settings.det_score:d}F{settings.flip:d}"
    impostors = len(protocol.pairs) - int(protocol.pairs.labels.sum())
    unresolved = any(not p.resolved for run in runs for p in run.verification.points)
    caption = f"{NOT_RESOLVED}: not resolved, a FAR below 1/{impostors} (the impostor pairs)" if unresolved else None
    table = Table(title=f"{protocol.target} 1:1 verification, {mode}: TAR (%) at FAR", caption=caption)
    table.add_column("model")
    for target in FAR_TARGETS:
        table.add_column(f"{target:.0e}", justify="right")
    table.add_column("AUC (%)", justify="right")
    for run in runs:
        table.add_row(
            run.spec.name,
            *(_percent(p.tar) if p.resolved else NOT_RESOLVED for p in run.verification.points),
            _percent(run.verification.auc),
        )
    console.print(table)
    if not any(run.identification for run in runs):
        return
    table = Table(title=f"{protocol.target} 1:N identification, {mode} (%)")
    table.add_column("model")
    table.add_column("gallery")
    for rank in CMC_RANKS:
        table.add_column(f"rank-{rank}", justify="right")
    for target in FPIR_TARGETS:
        table.add_column(f"TPIR@FPIR={target:g}", justify="right")
    for run in runs:
        for result in run.identification:
            table.add_row(
                run.spec.name,
                result.gallery,
                *(_percent(result.cmc[rank]) for rank in CMC_RANKS),
                *(_percent(p.tpir) for p in result.tpir),
            )
        mean = mean_identification(run.identification)
        table.add_row(
            run.spec.name,
            "mean",
            *(_percent(math.nan if v is None else v) for v in mean["cmc"].values()),
            *(_percent(math.nan if v is None else v) for v in mean["tpir_at_fpir"].values()),
        )
    console.print(table)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def save_features(out: Path, run: RunResult) -> Path:
    """`features_<run>.npz`: per-face embeddings (and flips), template ids and features, pair scores."""
    path = out / f"features_{_safe_name(run.spec.name)}.npz"
    arrays: dict[str, Any] = {
        "embeddings": run.embeddings[:, 0],
        "template_ids": run.template_ids,
        "template_features": run.template_feats,
        "pair_scores": run.scores,
    }
    if run.embeddings.shape[1] > 1:
        arrays["embeddings_flip"] = run.embeddings[:, 1]
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to tmp
        np.savez(handle, **arrays)
    return path


# --------------------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.ijb", description=(__doc__ or "").splitlines()[0])
    models = parser.add_argument_group("models (one run each; at least one)")
    models.add_argument(
        "--weights",
        action="append",
        type=Path,
        default=[],
        help="backbone .safetensors, or a run or checkpoint folder holding one (repeatable)",
    )
    models.add_argument("--onnx", action="append", type=Path, default=[], help="ONNX model, input 'data' (repeatable)")
    models.add_argument("--network", help="backbone name for --weights (default: the file's metadata)")
    models.add_argument(
        "--embedding-size", type=int, help="embedding size (default: the file's metadata, else the weights' shapes)"
    )
    parser.add_argument("--root", type=Path, required=True, help="the benchmark folder, e.g. IJB_release/IJBC")
    parser.add_argument("--target", choices=TARGETS, default="IJBC", help="which meta files to read")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for results.json and the ROC plot")
    parser.add_argument("--batch-size", type=int, default=128, help="faces per forward (each also flipped)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    ablations = parser.add_argument_group("ablations")
    ablations.add_argument("--no-norm", action="store_true", help="L2-normalize each face's feature (drop its norm)")
    ablations.add_argument("--no-det-score", action="store_true", help="do not weight faces by detector score")
    ablations.add_argument("--no-flip", action="store_true", help="embed the image only, not its flip")
    parser.add_argument("--save-features", action="store_true", help="also write features_<run>.npz per model")
    parser.add_argument("--card", action="store_true", help="add each model's results to its card (evaluation.card)")
    args = parser.parse_args(argv)
    if not args.weights and not args.onnx:
        parser.error("give at least one --weights or --onnx model")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def build_accelerator() -> Accelerator:
    """The Accelerator of an `accelerate launch`ed evaluation: only its process group and device are used.

    Several processes on CPUs follow the trainer's rule (`models.launch.process_group_kwargs`): gloo, and
    Accelerate told it runs on CPUs.
    """
    from accelerate import Accelerator

    from models.launch import process_group_kwargs

    return Accelerator(kwargs_handlers=process_group_kwargs())


def _run(args: argparse.Namespace) -> int:
    settings = Settings(flip=not args.no_flip, norm=not args.no_norm, det_score=not args.no_det_score)
    accelerator = build_accelerator()
    setup_logging(accelerator.is_main_process)
    # Every process reads and checks the same files and so fails alike, before any collective.
    output_folder(args.out)
    protocol = load_protocol(args.root, args.target)
    specs = model_specs(args.weights, args.onnx)
    logger.info(
        "%s: %d faces, %d templates, %d pairs%s",
        protocol.target,
        len(protocol.faces),
        len(np.unique(protocol.faces.templates)),
        len(protocol.pairs),
        "" if protocol.probes is None else f", 1:N with {len(protocol.probes.templates)} probe templates",
    )
    device = accelerator.device
    embedders = []
    for spec in specs:
        if spec.kind == "onnx":
            embedders.append(load_onnx_embedder(spec.path, device))
        else:
            embedders.append(load_torch_embedder(spec.path, args.network, args.embedding_size, device))
    runs = []
    for spec, (embed, description) in zip(specs, embedders, strict=True):
        start = time.perf_counter()
        embeddings = extract_embeddings(
            embed, protocol, accelerator, args.batch_size, settings.flip, args.workers, label=spec.name
        )
        logger.info("%s: embedded %d faces in %.1f s", spec.name, len(embeddings), time.perf_counter() - start)
        # Every process holds the same gathered embeddings, so every process refuses alike (no one waits).
        finite = np.isfinite(embeddings).all(axis=(1, 2))
        if not finite.all():
            raise WeightsError(
                f"{spec.path}: the embeddings of {int((~finite).sum())} of {len(finite)} faces are not finite (NaN or "
                "infinite): a diverged or damaged model, refused"
            )
        if accelerator.is_main_process:
            runs.append(score_run(spec, description, embeddings, protocol, settings))
    if accelerator.is_main_process:
        extraction = {"batch_size": args.batch_size, "processes": accelerator.num_processes, "device": str(device)}
        document = results_json(protocol, settings, runs, extraction)
        with atomic_output(args.out / "results.json") as tmp:
            tmp.write_text(json.dumps(document, indent=2) + "\n")
        roc_path = args.out / f"roc_{protocol.target.lower()}.png"
        if plot_roc(roc_path, protocol.target, runs):
            logger.info("ROC curve: %s", roc_path)
        if args.save_features:
            for run in runs:
                logger.info("features: %s", save_features(args.out, run))
        if args.card:
            for run in runs:
                write_card_section(run, protocol, settings)
        print_report(protocol, settings, runs)
        logger.info("results: %s", args.out / "results.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.ijb` CLI; returns the exit status (2 for bad input)."""
    args = _parse_args(argv)
    try:
        return _run(args)
    except InputError as err:
        # Bad input: one line naming the file (and line), no traceback.
        return report_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
