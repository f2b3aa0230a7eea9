"""Are these two faces the same person? Cosine similarities of two images or of a pair list.

    python -m evaluation.compare --model runs/default/model.safetensors a.jpg b.jpg
    python -m evaluation.compare --model model.onnx --pairs pairs.txt [--image-root DIR] [--out scores.csv]

Pair list: `path1 path2 [label]` per line (label 1 = same, 0 = different; optional), paths relative to
`--image-root` (default: the list's folder), `#` comments and blank lines skipped: the format of
`python -m data.tools build-bin` and of `evaluation.calibrate --pairs`. Images are aligned 112x112 crops, or are
aligned with `--landmarks` (the format of `evaluation.embed`).

With a calibrated model (`python -m evaluation.calibrate`), each pair is also called "same" (score strictly above the
model's threshold) or "different"; `--threshold` overrides it. Flip-summing follows the calibration unless
`--flip/--no-flip` says otherwise. An image that cannot be read fails a two-image comparison (exit 2); in a pair list
its pairs are reported and left without a score. `--out` writes a CSV (`first,second,label,score,same`) atomically;
a folder that takes no files is refused before any work, a failed write (disk full, file-size limit) leaves no file.
A model whose embeddings are not finite (NaN or infinite) is refused (exit 2), never scored.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.calibrate import measure
from evaluation.calibration import resolve_flip
from evaluation.card import print_input_line
from evaluation.embed import (
    EmbedError,
    FaceEmbedder,
    LabelledPair,
    check_writable_folder,
    crop_images,
    read_image,
    read_landmarks,
    read_pair_list,
    resolve_device,
    score_pairs,
)
from models.cli import atomic_output, report_input_error, setup_logging
from models.errors import InputError

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 50


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="two images to compare")
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors (or a run folder) or .onnx")
    parser.add_argument("--pairs", type=Path, help="a pair list instead of two images")
    parser.add_argument("--image-root", type=Path, help="where the pair list's paths start (default: its folder)")
    parser.add_argument("--landmarks", type=Path, help="5-point landmarks per image (CSV or JSON) to align them")
    parser.add_argument("--threshold", type=float, help="decide same/different at this cosine (default: the model's)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="flip-sum embeddings")
    parser.add_argument("--out", type=Path, help="write the scores as CSV")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--network", help="backbone name for a file without metadata")
    args = parser.parse_args(argv)
    if (args.pairs is None) == (len(args.images) != 2) or (args.pairs is not None and args.images):
        parser.error("give two images, or --pairs FILE")
    return args


def _two_images(args: argparse.Namespace, embedder: FaceEmbedder, flip: bool) -> tuple[list[LabelledPair], list]:
    """The two-image case: any problem with either image is bad input (there is nothing else to compare)."""
    first, second = args.images
    landmarks = None
    if args.landmarks is not None:
        table = read_landmarks(args.landmarks)
        missing = [path.name for path in (first, second) if path.name not in table]
        if missing:
            raise EmbedError(f"{args.landmarks} has no landmarks for {missing[0]!r} (names are the images' file names)")
        landmarks = [table[first.name], table[second.name]]
    crops = crop_images([read_image(first), read_image(second)], landmarks)
    embeddings = embedder.embed_tensor(crops, flip, batch_size=2)  # flip already resolved (and warned about) once
    pair = LabelledPair(str(first), str(second), None, 0)
    return [pair], [float(embeddings[0] @ embeddings[1])]


def _write_csv(
    out: Path, pairs: Sequence[LabelledPair], scores: Sequence[float | None], threshold: float | None
) -> None:
    """The scores as CSV, atomically (`models.cli.atomic_output`: a failed write is an `OutputError` and leaves no
    file)."""
    with atomic_output(out) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["first", "second", "label", "score", "same"])
        for pair, score in zip(pairs, scores, strict=True):
            label = "" if pair.same is None else int(pair.same)
            same = "" if score is None or threshold is None else int(score > threshold)
            writer.writerow([pair.first, pair.second, label, "" if score is None else f"{score:.6f}", same])


def _print(
    pairs: Sequence[LabelledPair], scores: Sequence[float | None], threshold: float | None, title: str, labelled: bool
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("first", "second", *(["label"] if labelled else []), "cosine", "decision"):
        table.add_column(column, justify="right" if column in ("cosine", "label") else "left")
    for pair, score in list(zip(pairs, scores, strict=True))[:MAX_TABLE_ROWS]:
        decision = "unreadable image" if score is None else ""
        if score is not None and threshold is not None:
            decision = "same" if score > threshold else "different"
        label = ["same" if pair.same else "different"] if labelled else []
        table.add_row(pair.first, pair.second, *label, "" if score is None else f"{score:.4f}", decision)
    Console().print(table)
    if len(pairs) > MAX_TABLE_ROWS:
        logger.info("%d more pairs not shown (--out writes them all)", len(pairs) - MAX_TABLE_ROWS)


def _run(args: argparse.Namespace) -> int:
    if args.out is not None:
        if args.out.is_dir():
            raise EmbedError(f"--out {args.out}: is a folder")
        check_writable_folder(args.out)  # before the work, not after it
    embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device), network=args.network)
    print_input_line(embedder.metadata)
    flip = resolve_flip(args.flip, embedder.calibration)
    calibration = embedder.calibration
    threshold = args.threshold if args.threshold is not None else (calibration.threshold if calibration else None)
    labelled = False
    if args.pairs is not None:
        pairs = read_pair_list(args.pairs, need_labels=False)
        labelled = all(pair.same is not None for pair in pairs)
        scores, skipped = score_pairs(
            embedder, pairs, args.image_root or args.pairs.parent, args.landmarks, flip, args.batch_size
        )
        if skipped:
            logger.warning("%d pairs left without a score (unreadable images)", sum(s is None for s in scores))
    else:
        pairs, scores = _two_images(args, embedder, flip)
    if args.threshold is not None:
        where = f"threshold {args.threshold:.4f} (--threshold)"
    elif calibration is not None:
        where = f"threshold {calibration.threshold:.4f} (calibrated at FAR {calibration.far_target:g})"
    else:
        where = "no threshold: calibrate the model (python -m evaluation.calibrate) or give --threshold"
    _print(pairs, scores, threshold, f"{embedder.path.name}: cosine similarity, {where}", labelled)
    if labelled and threshold is not None:
        known = [i for i, score in enumerate(scores) if score is not None]
        far, tar = measure(np.array([scores[i] for i in known]), np.array([pairs[i].same for i in known]), threshold)
        logger.info("on these %d labelled pairs: FAR %.4f, TAR %.4f at threshold %.4f", len(known), far, tar, threshold)
    if args.out is not None:
        _write_csv(args.out, pairs, scores, threshold)
        logger.info("scores -> %s", args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.compare` CLI; returns the exit status (2 for bad input)."""
    args = _parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except InputError as err:
        return report_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
