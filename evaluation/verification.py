"""Pair verification on insightface `.bin` files (LFW, CFP-FP, AgeDB-30, ...): loading, the 10-fold protocol,
a trainer callback and a CLI.

Protocol (insightface's `eval/verification.py`): embed each image and its horizontal flip, sum the two, L2-normalize;
the score of a pair is the squared L2 distance; 10 folds without shuffling; in each fold the threshold from
`THRESHOLDS` with the best accuracy on the other nine folds is applied to the held-out fold; the mean and std of the
ten fold accuracies are reported. XNorm is the mean L2 norm of the un-normalized embeddings (originals and flips).

A file with fewer pairs than folds (`NUM_FOLDS`) is refused when it is loaded for verification (`check_bin`,
`load_bin(..., folds=NUM_FOLDS)`): the trainer at start, the callback and the CLI alike. Fewer folds would give a
number that is not the protocol's and cannot be compared with any published one. A model whose embeddings are not
finite is refused too (`NonFiniteEmbeddingsError`), rather than scored at chance accuracy.

Reading: `data.bin_file.read_bin` (a restricted unpickler: the file is never trusted to run code).

    python -m evaluation.verification --weights model.safetensors --bin lfw.bin --bin cfp_fp.bin
    python -m evaluation.verification --weights runs/r50 --root /data/ms1m --bin lfw --bin calfw
    python -m evaluation.verification --weights runs/r50 --root /data/ms1m --bins all [--card]

The sets by name (`BIN_NAMES`, insightface's `val_targets` names, shipped as `<name>.bin` in its training archives):
`lfw`, `cfp_fp`, `cfp_ff`, `agedb_30`, `calfw`, `cplfw`, `vgg2_fp`. A `--bin` that is not an existing file is a name
under `--root` (`lfw` -> `<root>/lfw.bin`, as insightface's `val_targets` resolve against the data folder); `--bins
all` takes every one of the seven found under `--root` (insightface's callback skips the missing ones the same way;
a name given explicitly must exist). Every set is evaluated with the same protocol; the table has a row per set
(pairs, accuracy +- std, XNorm) and their mean. `--card` adds the table to the model's card (`evaluation.card`).

`--weights` also takes a run's output folder or a checkpoint folder (its `model.safetensors`, checked against the
checkpoint's manifest). Bad input (a missing, unfitting, damaged or non-finite model, an unreadable `.bin` or one with
fewer than 10 pairs) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from data.bin_file import BinFormatError, image_bytes, read_bin
from data.dataset import mirror_images, normalize_images
from data.recordio import decode_image
from models.errors import InputError

logger = logging.getLogger(__name__)

# insightface's grid of squared-distance thresholds: 0, 0.01, ..., 3.99 (squared L2 of unit vectors is in [0, 4]).
THRESHOLDS = np.arange(0, 4, 0.01)
# insightface's k: every fold holds out at least one pair, so a file needs at least this many pairs.
NUM_FOLDS = 10
# The verification sets insightface ships as `<name>.bin` beside its training data (MS1M-ArcFace, MS1M-RetinaFace,
# Glint360K), by the names its configs use (`val_targets`); `all` stands for every one of them that is there.
BIN_NAMES = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")
ALL_BINS = "all"


class NonFiniteEmbeddingsError(ValueError):
    """The backbone's embeddings hold NaN or infinite values: a diverged or damaged model, nothing to score."""


@dataclass(frozen=True)
class VerificationResult:
    """One target's numbers: mean and std of the fold accuracies, XNorm, and the number of pairs."""

    acc: float
    std: float
    xnorm: float
    num_pairs: int


def _fit(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Resize the shorter side to the target and centre-crop, like insightface's `resize_short` on square crops."""
    height, width = image_size
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width]


def check_bin(path: str | Path, folds: int = NUM_FOLDS) -> int:
    """Whether a `.bin` can be verified on, before it is needed (the trainer calls it at start, on every rank):
    readable, safe, the `(images, issame)` layout, at least `folds` pairs. Returns the number of pairs; raises
    `BinFormatError` (an `InputError`) naming the file. Images are decoded later, by `load_bin`."""
    return len(read_bin(path, folds)[1])


def resolve_bins(entries: Sequence[str], root: Path | str | None) -> list[Path]:
    """The `.bin` files that `entries` name: an existing file is itself; a name is `<root>/<name>.bin` (or
    `<root>/<name>`); `all` is every `BIN_NAMES` file found under `root`, in that order. A name that is not there is a
    `BinFormatError` naming where it was looked for; so is `all` when none is; a set named twice is refused."""
    folder = Path(root) if root else None
    found: list[Path] = []
    for entry in entries:
        if entry == ALL_BINS:
            if folder is None:
                raise BinFormatError(f"--bins {ALL_BINS}: give --root, the folder holding the .bin files")
            present = [folder / f"{name}.bin" for name in BIN_NAMES if (folder / f"{name}.bin").is_file()]
            if not present:
                raise BinFormatError(
                    f"--bins {ALL_BINS}: none of {', '.join(f'{n}.bin' for n in BIN_NAMES)} is in {folder}"
                )
            missing = [name for name in BIN_NAMES if not (folder / f"{name}.bin").is_file()]
            if missing:
                logger.info("--bins all: %s not in %s", ", ".join(missing), folder)
            found += present
            continue
        candidates = [Path(entry)]
        if folder is not None and not Path(entry).is_absolute():
            candidates += [folder / entry, folder / f"{entry}.bin"]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            hint = "" if folder is not None or Path(entry).suffix else " (a set name needs --root)"
            raise BinFormatError(
                f"{entry}: not found (looked at {', '.join(map(str, candidates))}){hint}; the sets by name: "
                f"{', '.join(BIN_NAMES)}"
            )
        found.append(match)
    stems = [path.stem for path in found]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise BinFormatError(f"the set {twice[0]!r} is named twice ({', '.join(str(p) for p in found)})")
    return found


def load_bin(
    path: str | Path, image_size: tuple[int, int] = (112, 112), folds: int | None = None
) -> tuple[torch.Tensor, list[bool]]:
    """Load a verification `.bin`: `(images, issame)`, images uint8 `(2N, 3, H, W)` RGB, pair i = images 2i, 2i+1.

    Images of another size are resized (shorter side) and centre-cropped to `image_size`. `folds`: refuse a file
    with fewer pairs (verification passes `NUM_FOLDS`; embedding and calibration need no folds).
    """
    path = Path(path)
    bins, issame = read_bin(path, folds)
    images = torch.empty((len(bins), 3, *image_size), dtype=torch.uint8)
    for index, item in enumerate(bins):
        buf = image_bytes(item, path, index)
        try:
            image = decode_image(buf)
        except Exception as err:  # decoders raise their own error types
            raise BinFormatError(f"file {path}: image {index} cannot be decoded ({err})") from None
        images[index] = torch.from_numpy(np.ascontiguousarray(_fit(image, image_size).transpose(2, 0, 1)))
    return images, issame


def contiguous_folds(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(train, test)` index arrays of `folds` contiguous test folds, the first `n % folds` one longer: the split of
    scikit-learn's `KFold(folds, shuffle=False)`, which insightface uses (tested against it). Written here because
    importing scikit-learn costs every trainer process over a second at start-up."""
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    every = np.arange(n)
    return [(np.concatenate([every[:a], every[b:]]), every[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def compute_accuracy(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: Sequence[bool] | np.ndarray, nrof_folds: int = 10
) -> tuple[float, float, np.ndarray]:
    """insightface's k-fold verification accuracy on pair embeddings: `(mean, std, best threshold per fold)`.

    Embeddings are used as given (normalize them first); pairs closer than a threshold (squared L2, strict `<`)
    are predicted "same".
    """
    embeddings1, embeddings2 = np.asarray(embeddings1, np.float64), np.asarray(embeddings2, np.float64)
    actual = np.asarray(issame, dtype=bool)
    if embeddings1.ndim != 2 or embeddings1.shape != embeddings2.shape or len(actual) != len(embeddings1):
        raise ValueError(
            f"need two (N, D) embedding arrays and N labels: got {embeddings1.shape}, {embeddings2.shape}, "
            f"{len(actual)} labels"
        )
    if len(actual) < nrof_folds:
        raise ValueError(f"{len(actual)} pairs cannot be split into {nrof_folds} folds")
    dist = np.sum((embeddings1 - embeddings2) ** 2, axis=1)
    # correct[t, i]: whether threshold t classifies pair i right.
    correct = (dist[None, :] < THRESHOLDS[:, None]) == actual[None, :]
    accuracies = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    for fold, (train, test) in enumerate(contiguous_folds(len(dist), nrof_folds)):
        # argmax takes the first (smallest) of tied thresholds, as insightface does.
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        best_thresholds[fold] = THRESHOLDS[best]
        accuracies[fold] = correct[best, test].mean()
    return float(accuracies.mean()), float(accuracies.std()), best_thresholds


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for param in module.parameters():
        return param.device, param.dtype if param.dtype.is_floating_point else torch.float32
    return torch.device("cpu"), torch.float32


def evaluate_backbone(
    backbone: nn.Module,
    images: torch.Tensor,
    issame: Sequence[bool],
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> VerificationResult:
    """Flip-augmented verification of `backbone` on uint8 `(2N, 3, H, W)` images; restores its train/eval mode.

    Raises `NonFiniteEmbeddingsError` when an embedding is NaN or infinite (no accuracy is made up for it)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need exactly 2 per pair)")
    param_device, dtype = _module_device_dtype(backbone)
    device = torch.device(device) if device is not None else param_device
    was_training = backbone.training
    backbone.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = normalize_images(images[start : start + batch_size].to(device), dtype)
                # Originals and flips in one forward: eval-mode BatchNorm makes samples independent.
                out = backbone(torch.cat([batch, mirror_images(batch)]))
                chunks.append(out.float().cpu().numpy().reshape(2, len(batch), -1))
    finally:
        backbone.train(was_training)
    raw = np.concatenate(chunks, axis=1).astype(np.float64)  # (2, 2N, D): originals, flips
    finite = np.isfinite(raw).all(axis=(0, 2))
    if not finite.all():
        raise NonFiniteEmbeddingsError(
            f"the embeddings of {int((~finite).sum())} of {len(images)} images are not finite (NaN or infinite)"
        )
    xnorm = float(np.linalg.norm(raw, axis=2).mean())
    summed = raw[0] + raw[1]
    embeddings = summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    acc, std, _ = compute_accuracy(embeddings[0::2], embeddings[1::2], issame)
    return VerificationResult(acc=acc, std=std, xnorm=xnorm, num_pairs=len(issame))


class VerificationCallback:
    """Evaluates the backbone on each `.bin` when called (the training loop decides when); main process only.

    The files are loaded once, here; one with fewer than `NUM_FOLDS` pairs is refused (`BinFormatError`). `highest`
    keeps the best accuracy seen per target; `state_dict` / `load_state_dict` carry it across a resume. A target whose
    embeddings are not finite is logged as not evaluated and reported as NaN, never as a measured accuracy.
    """

    def __init__(self, bin_paths: list[str], batch_size: int) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.targets: dict[str, tuple[torch.Tensor, list[bool]]] = {}
        for bin_path in bin_paths:
            name = Path(bin_path).stem
            if name in self.targets:
                raise ValueError(f"two verification files are named {name!r}: {bin_paths}")
            self.targets[name] = load_bin(bin_path, folds=NUM_FOLDS)
            logger.info("verification target %s: %d pairs from %s", name, len(self.targets[name][1]), bin_path)
        self.highest: dict[str, float] = {name: 0.0 for name in self.targets}

    def __call__(self, step: int, backbone: nn.Module) -> dict[str, VerificationResult]:
        """Evaluate every target; `step` labels the log lines."""
        results: dict[str, VerificationResult] = {}
        for name, (images, issame) in self.targets.items():
            try:
                result = evaluate_backbone(backbone, images, issame, batch_size=self.batch_size)
            except NonFiniteEmbeddingsError as err:
                logger.warning("[%s][%d] not evaluated: %s", name, step, err)
                results[name] = VerificationResult(math.nan, math.nan, math.nan, len(issame))
                continue
            self.highest[name] = max(self.highest[name], result.acc)
            logger.info(
                "[%s][%d] Accuracy-Flip: %.5f+-%.5f, XNorm: %.4f, Highest: %.5f",
                name,
                step,
                result.acc,
                result.std,
                result.xnorm,
                self.highest[name],
            )
            results[name] = result
        return results

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The best accuracy so far per target, for the trainer's checkpoint."""
        return {"highest": dict(self.highest)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        """Restore `highest` from `state_dict()`; targets not evaluated by this run are ignored."""
        for name, value in state.get("highest", {}).items():
            if name in self.highest:
                self.highest[name] = float(value)


def results_table(results: dict[str, VerificationResult], title: str) -> Any:
    """A rich table: a row per set (pairs, accuracy +- std, XNorm) and, for several sets, their mean."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("set", "pairs", "accuracy +- std", "XNorm"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, result in results.items():
        table.add_row(name, str(result.num_pairs), f"{result.acc:.5f} +- {result.std:.5f}", f"{result.xnorm:.4f}")
    if len(results) > 1:
        values = list(results.values())
        table.add_section()
        table.add_row(
            "mean",
            str(sum(r.num_pairs for r in values)),
            f"{np.mean([r.acc for r in values]):.5f}",
            f"{np.mean([r.xnorm for r in values]):.4f}",
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.verification` CLI; returns the exit status."""
    from dataclasses import asdict

    from rich.console import Console

    from evaluation.card import update_card, verification_section
    from models.cli import report_input_error, setup_logging
    from models.weights import load_backbone, resolve_weights_path

    parser = argparse.ArgumentParser(prog="python -m evaluation.verification", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", required=True, type=Path, help="a model.safetensors, or a run or checkpoint folder holding one"
    )
    parser.add_argument("--network", help="backbone name (default: the file's metadata)")
    parser.add_argument(
        "--embedding-size", type=int, help="embedding size (default: the file's metadata, else the weights' shapes)"
    )
    parser.add_argument(
        "--bin", dest="bins", action="append", default=[], help="a .bin file, or a set name under --root (repeatable)"
    )
    parser.add_argument(
        "--bins",
        dest="bin_list",
        action="append",
        default=[],
        help=f"set names under --root, comma separated, or {ALL_BINS} ({', '.join(BIN_NAMES)}: those present)",
    )
    parser.add_argument("--root", type=Path, help="the folder the set names resolve in (insightface's data folder)")
    parser.add_argument("--card", action="store_true", help="add the results to the model's card (evaluation.card)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    entries = [*args.bins, *(name.strip() for group in args.bin_list for name in group.split(",") if name.strip())]
    if not entries:
        parser.error("give --bin FILE_OR_NAME (repeatable) or --bins NAMES|all")
    setup_logging()
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            raise InputError(f"--device {args.device!r}: {err}") from None
        backbone, metadata = load_backbone(args.weights, args.network, args.embedding_size, device)
        bin_paths = resolve_bins(entries, args.root)
        network, embedding_size = metadata["network"], metadata["embedding_size"]
        # Every file is read before the first evaluation: a bad one fails at once, not after the others ran.
        targets = [(bin_path, *load_bin(bin_path, folds=NUM_FOLDS)) for bin_path in bin_paths]
        results: dict[str, VerificationResult] = {}
        for bin_path, images, issame in targets:
            try:
                results[bin_path.stem] = evaluate_backbone(
                    backbone, images, issame, batch_size=args.batch_size, device=device
                )
            except NonFiniteEmbeddingsError as err:
                raise InputError(f"{args.weights} on {bin_path}: {err}: a diverged or damaged model, refused") from None
        table = results_table(results, f"Verification: {args.weights.name} ({network}, {embedding_size}-d)")
        if args.card:
            section = verification_section({name: asdict(r) for name, r in results.items()})
            update_card(resolve_weights_path(args.weights, verify=False), "verification", section)
    except InputError as err:
        return report_input_error(err)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
