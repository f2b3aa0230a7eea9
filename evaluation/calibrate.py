"""Calibrate a decision threshold at a target FAR and write it into the model file.

    python -m evaluation.calibrate --model runs/default/model.safetensors --bin val.bin --far 1e-2
    python -m evaluation.calibrate --model model.onnx --pairs my_pairs.txt [--landmarks landmarks.csv]
    python -m evaluation.calibrate --model model.safetensors --ijb results/ [--run NAME]

Scores are cosine similarities; two faces are "the same" when their score is strictly above the threshold.

The threshold. With n impostor (different-identity) pairs and a target FAR f, k = floor(f n) false accepts are
allowed; the threshold is the (k+1)-th largest impostor score, so at most k impostor pairs (fewer on ties) score
above it: the FAR measured on these pairs is at most f.

What the intervals cover (95 % by default, `--confidence`):

* `far_interval`: the true FAR of this threshold, i.e. the share of *new* impostor pairs that will score above it.
  For i.i.d. impostor scores from a continuous distribution, that share is distributed as Beta(k+1, n-k) whatever
  the distribution (the (k+1)-th largest of n uniforms): the interval is exact, no bootstrap is needed.
  `predicted_far_range(m)` gives the range of FARs that m new impostor pairs will show (beta-binomial).
* `tar_interval`: the true TAR of this threshold, from a percentile bootstrap of the genuine pairs (`--bootstrap`
  resamples, `--seed`). It is the uncertainty of the TAR at *this* threshold; the threshold's own uncertainty is in
  `far_interval`. (Bootstrapping the whole procedure, threshold re-chosen on each resample, under-covers the TAR at
  the target FAR when k is small: 88 % instead of 95 % in tests/unit/test_calibrate.py's simulation.)
* Both assume pairs are independent. Pairs that share identities or images (every real benchmark, `val.bin`
  included) are positively correlated, so the true uncertainty is larger than stated.

Sources: a verification `.bin` (embedded here, pair i = images 2i and 2i+1), the user's own labelled pairs (a text
file: `path1 path2 label` per line, label 1 = same, 0 = different, paths relative to `--image-root`, default the
file's folder; blank lines and `#` comments skipped), or an IJB result folder written by `python -m evaluation.ijb
--save-features` (the pair scores of `features_<run>.npz`, their labels read again from the benchmark's meta files
named in `results.json`; IJB scores compare templates, so the threshold is the one for template comparisons).

The result is written into the model's metadata under the key `calibration` (JSON; `evaluation.calibration`): the
safetensors header (the file is rewritten through a temporary file and renamed, tensors and permissions kept) or
the ONNX model's `metadata_props`, and the model's card (`evaluation.card`: its README) is rendered again with the
threshold in it. The model's folder is checked to take a new file before any work; a failed write leaves the model
untouched. `evaluation.compare` and `evaluation.embed` read it back. `--dry-run` only prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.calibration import (
    METADATA_KEY,
    Calibration,
    CalibrationError,
    allowed_false_accepts,
)
from evaluation.card import CardError, write_card_for, write_model_metadata
from evaluation.embed import (
    FaceEmbedder,
    check_writable_folder,
    read_pair_list,
    resolve_device,
    score_pairs,
)
from models.cli import report_input_error, setup_logging
from models.errors import InputError

__all__ = [
    "Calibration",
    "CalibrationError",
    "allowed_false_accepts",
    "calibrate",
    "check_writable_model",
    "ijb_scores",
    "main",
    "measure",
    "pair_scores_from_list",
    "split_scores",
    "write_calibration",
]

logger = logging.getLogger(__name__)

DEFAULT_FAR = 1e-2
DEFAULT_BOOTSTRAP = 1000
DEFAULT_CONFIDENCE = 0.95


def split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores); labels are 1/True for same-identity pairs."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"need one label per score, got {scores.shape} scores and {labels.shape} labels")
    if not np.isfinite(scores).all():
        raise CalibrationError(f"{int((~np.isfinite(scores)).sum())} scores are not finite numbers")
    return scores[labels], scores[~labels]


def measure(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(FAR, TAR) of `threshold` on labelled pairs: the shares of impostor and genuine scores strictly above it."""
    genuine, impostor = split_scores(scores, labels)
    far = float((impostor > threshold).mean()) if len(impostor) else math.nan
    tar = float((genuine > threshold).mean()) if len(genuine) else math.nan
    return far, tar


def calibrate(
    scores: np.ndarray,
    labels: np.ndarray,
    far_target: float = DEFAULT_FAR,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    flip: bool | None = None,
    source: str = "",
) -> Calibration:
    """The threshold at `far_target` on labelled pair scores, with its FAR and TAR intervals (module docstring)."""
    from scipy.stats import beta

    if not 0.0 < far_target < 1.0:
        raise CalibrationError(f"--far must be in (0, 1), got {far_target}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"--confidence must be in (0, 1), got {confidence}")
    if bootstrap < 1:
        raise CalibrationError(f"--bootstrap must be at least 1, got {bootstrap}")
    genuine, impostor = split_scores(scores, labels)
    if len(genuine) == 0 or len(impostor) == 0:
        raise CalibrationError(
            f"calibration needs genuine and impostor pairs; {source or 'the pairs'} has {len(genuine)} genuine and "
            f"{len(impostor)} impostor pairs"
        )
    n = len(impostor)
    k = allowed_false_accepts(far_target, n)
    if far_target * n < 1:
        logger.warning(
            "only %d impostor pairs: a FAR of %g cannot be measured (the smallest non-zero FAR is 1/%d); the "
            "threshold is the highest impostor score and its true FAR is only bounded by the interval",
            n,
            far_target,
            n,
        )
    threshold = float(-np.partition(-impostor, k)[k])  # the (k+1)-th largest impostor score
    far, tar = float((impostor > threshold).mean()), float((genuine > threshold).mean())
    tail = (1.0 - confidence) / 2
    far_low, far_high = (float(v) for v in beta.ppf([tail, 1.0 - tail], k + 1, n - k))
    rng = np.random.default_rng(seed)
    above = (genuine > threshold).astype(np.float64)
    # Resample the genuine pairs in chunks: (chunk, genuine) indices at a time bounds the memory.
    tars = np.empty(bootstrap)
    chunk = max(1, (1 << 22) // len(genuine))
    for start in range(0, bootstrap, chunk):
        size = min(chunk, bootstrap - start)
        tars[start : start + size] = above[rng.integers(0, len(genuine), (size, len(genuine)))].mean(axis=1)
    tar_low, tar_high = (float(v) for v in np.quantile(tars, [tail, 1.0 - tail]))
    return Calibration(
        far_target=far_target,
        threshold=threshold,
        far=far,
        far_interval=(far_low, far_high),
        tar=tar,
        tar_interval=(tar_low, tar_high),
        confidence=confidence,
        genuine_pairs=len(genuine),
        impostor_pairs=n,
        bootstrap=bootstrap,
        seed=seed,
        flip=flip,
        source=source,
    )


# --------------------------------------------------------------------------------------------------------------
# The model file's metadata


def check_writable_model(model: Path) -> None:
    """Before any work: `model` can take a calibration. A model inside a checkpoint folder is refused (its manifest's
    checksum would no longer match), and its folder must take a new file (`OutputError` naming the model)."""
    if (model.parent / "manifest.json").is_file():
        raise CalibrationError(
            f"{model} is inside a checkpoint (its manifest.json checksums it): calibrate a copy "
            "(python -m trainer.export safetensors --checkpoint ... --out model.safetensors)"
        )
    check_writable_folder(model)


def write_calibration(model: Path, calibration: Calibration) -> None:
    """Store `calibration` in the model file's metadata: safetensors (tensors kept) or ONNX `metadata_props`,
    rewritten through a temporary file and renamed (`models.cli.atomic_output`: the file keeps its permissions, and a
    failed write leaves it untouched and becomes an `OutputError`), and render the model's card again
    (`evaluation.card`: its README shows the threshold). A model inside a checkpoint folder is refused."""
    check_writable_model(model)
    try:
        write_model_metadata(model, {METADATA_KEY: calibration.to_json()})
    except CardError as err:
        raise CalibrationError(str(err)) from None
    write_card_for(model)  # the README shows the threshold: rendered again from the metadata just written


# --------------------------------------------------------------------------------------------------------------
# Sources of labelled scores


def ijb_scores(folder: Path, run: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(pair scores, labels, description) from an `evaluation.ijb --save-features` output folder."""
    from evaluation.ijb_meta import IJBFormatError, load_protocol

    results_path = folder / "results.json"
    try:
        results = json.loads(results_path.read_text())
        runs = [entry["name"] for entry in results["runs"]]
        root, target = Path(results["root"]), results["target"]
    except FileNotFoundError:
        raise CalibrationError(
            f"{results_path}: no such file (give the --out folder of python -m evaluation.ijb)"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"{results_path}: not a results.json of evaluation.ijb ({err})") from None
    if run is None:
        if len(runs) != 1:
            raise CalibrationError(f"{results_path} holds the runs {runs}: choose one with --run")
        run = runs[0]
    elif run not in runs:
        raise CalibrationError(f"{results_path} has no run {run!r} (runs: {', '.join(runs)})")
    features = folder / f"features_{re.sub(r'[^A-Za-z0-9._-]+', '_', run)}.npz"
    if not features.is_file():
        raise CalibrationError(f"{features}: no such file (run python -m evaluation.ijb with --save-features)")
    try:
        with np.load(features) as archive:
            scores = np.asarray(archive["pair_scores"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as err:
        raise CalibrationError(f"{features}: no readable pair_scores ({err})") from None
    try:
        protocol = load_protocol(root, target, check_images=False)
    except IJBFormatError as err:
        raise CalibrationError(f"{results_path}: the benchmark's meta files are needed for the labels: {err}") from None
    labels = np.asarray(protocol.pairs.labels).astype(bool)
    if len(labels) != len(scores):
        raise CalibrationError(f"{features}: {len(scores)} pair scores, but {root} lists {len(labels)} pairs")
    return scores, labels, f"{target} run {run} ({features.name})"


def pair_scores_from_list(
    embedder: FaceEmbedder, path: Path, image_root: Path | None, landmarks: Path | None, flip: bool, batch_size: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(scores, labels, (name, reason) of the images skipped) of a labelled pair list; a pair with an unreadable
    image is left out."""
    pairs = read_pair_list(path, need_labels=True)
    scores, skipped = score_pairs(embedder, pairs, image_root or path.parent, landmarks, flip, batch_size)
    kept = [i for i, score in enumerate(scores) if score is not None]
    if not kept:
        raise CalibrationError(f"{path}: no pair could be scored ({len(skipped)} images unreadable)")
    return (
        np.array([scores[i] for i in kept], dtype=np.float64),
        np.array([pairs[i].same for i in kept]),
        skipped,
    )


# --------------------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.calibrate", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors (or a run folder) or .onnx")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--bin", type=Path, help="a verification .bin (val.bin, lfw.bin, ...)")
    sources.add_argument("--pairs", type=Path, help="labelled pairs: 'path1 path2 label' lines (1 same, 0 different)")
    sources.add_argument("--ijb", type=Path, help="an evaluation.ijb --out folder written with --save-features")
    parser.add_argument("--run", help="with --ijb: which run of results.json (default: the only one)")
    parser.add_argument("--image-root", type=Path, help="with --pairs: where paths start (default: the file's folder)")
    parser.add_argument("--landmarks", type=Path, help="with --pairs: 5-point landmarks (README) to align the images")
    parser.add_argument("--far", type=float, default=DEFAULT_FAR, help="target FAR (default: %(default)g)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="interval level (default: 0.95)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="TAR bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip-sum embeddings")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--network", help="backbone name for a file without metadata")
    parser.add_argument("--dry-run", action="store_true", help="print the calibration, do not write the model")
    return parser.parse_args(argv)


def print_calibration(calibration: Calibration, model: Path, written: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    level = f"{calibration.confidence:.0%}"
    table = Table(title=f"Calibration of {model.name} on {calibration.source}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("pairs (genuine / impostor)", f"{calibration.genuine_pairs} / {calibration.impostor_pairs}")
    table.add_row("target FAR", f"{calibration.far_target:g}")
    table.add_row("threshold (cosine; same if above)", f"{calibration.threshold:.5f}")
    table.add_row("FAR on these pairs", f"{calibration.far:.5f}")
    table.add_row(f"true FAR of the threshold, {level} interval", "[{:.5f}, {:.5f}]".format(*calibration.far_interval))
    table.add_row("TAR on these pairs", f"{calibration.tar:.5f}")
    table.add_row(
        f"TAR, {level} bootstrap interval ({calibration.bootstrap})",
        "[{:.5f}, {:.5f}]".format(*calibration.tar_interval),
    )
    table.add_row("written into", str(model) if written else "nothing (--dry-run)")
    Console().print(table)


def _run(args: argparse.Namespace) -> int:
    from models.weights import resolve_weights_path

    if args.far <= 0 or args.far >= 1:
        raise CalibrationError(f"--far must be in (0, 1), got {args.far}")
    flip: bool | None = args.flip
    if args.ijb is not None:
        model = args.model if args.model.suffix == ".onnx" else resolve_weights_path(args.model)
        if not model.is_file():
            raise CalibrationError(f"{model}: no such file")
        if not args.dry_run:
            check_writable_model(model)
        scores, labels, source = ijb_scores(args.ijb, args.run)
        flip = None  # the IJB run's own settings (results.json) made these scores
    else:
        embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device), network=args.network)
        model = embedder.path
        if not args.dry_run:
            check_writable_model(model)  # before the embedding work, not after it
        if args.bin is not None:
            from evaluation.verification import BinFormatError, load_bin

            try:
                images, issame = load_bin(args.bin)
            except BinFormatError as err:
                raise CalibrationError(str(err)) from None
            embeddings = embedder.embed_tensor(images, flip=args.flip, batch_size=args.batch_size, progress=True)
            scores = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])
            labels, source = np.asarray(issame), args.bin.name
        else:
            scores, labels, skipped = pair_scores_from_list(
                embedder, args.pairs, args.image_root, args.landmarks, args.flip, args.batch_size
            )
            source = args.pairs.name + (f" ({len(skipped)} unreadable images skipped)" if skipped else "")
    calibration = calibrate(scores, labels, args.far, args.bootstrap, args.confidence, args.seed, flip, source)
    if not args.dry_run:
        write_calibration(model, calibration)
    print_calibration(calibration, model, written=not args.dry_run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.calibrate` CLI; returns the exit status (2 for bad input)."""
    args = _parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except InputError as err:
        return report_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
