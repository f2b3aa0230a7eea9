"""All-to-all 1:1 verification on a labelled set of faces, in the style of insightface's MFR challenge ("MR-All"):
TAR at FAR 1e-6 and 1e-4 over every pair of images, per group when groups are given.

    python -m evaluation.all_to_all faces/ --model runs/r50/model.safetensors [--groups groups.csv] [--out r.json]
    python -m evaluation.all_to_all faces.txt --model model.onnx --flip         # a list: 'path label' per line
    python -m evaluation.all_to_all --embeddings faces.safetensors [--groups groups.csv]

Input: a folder with one sub-folder per identity (`faces/<identity>/<image>`, the training layout; names are paths
relative to the folder), a text list (`path label` per line, paths relative to the list's folder, `#` comments), or
`--embeddings FILE.safetensors` (tensor `embeddings` (N, D), identities from a `labels` tensor or, as
`evaluation.embed` writes them, from the first folder of each name in the metadata `names`). `--save-embeddings`
writes the embeddings of a model run in that format, so the metric can be run again without the model.

Pairs: all N(N-1)/2 unordered pairs of distinct images; genuine when both images have the same identity, impostor
otherwise. Scores are cosines of L2-normalized embeddings (float32). The threshold at a FAR f is the convention of
`evaluation.calibrate`: with n impostor pairs, k = floor(f n) false accepts are allowed and the threshold is the
(k+1)-th largest impostor score; TAR is the share of genuine pairs strictly above it (the FAR measured there is at
most f, lower on ties). A FAR below 1 / n cannot be measured on these pairs: the point is marked not resolved.

Groups (`--groups CSV`, lines `name,group`, an optional header): `name` is an image's name or an identity; each
group is evaluated on its own pairs (both images in the group), with its own threshold, as the MFR challenge reports
per race; the whole set is always evaluated too. Images without a group only count in the whole set.

The algorithm (`all_to_all`): never an N x N matrix. Images are sorted by identity, so genuine pairs sit in the
diagonal blocks. The upper triangle of the score matrix is computed in blocks of `block` x `block` rows/columns
(one float32 matrix product each). Genuine scores are taken from the blocks whose identity ranges overlap (4 bytes
per genuine pair are kept). For the impostors only the largest K = k_max + 1 are needed, k_max the largest number of
allowed false accepts over the targets: a buffer holds every impostor score strictly above a bound t (at first -inf);
each block adds its scores above t (one comparison per score, the indices of the few above it, the genuine and
lower-triangle ones among those dropped); when the buffer exceeds max(2K, `min_buffer`) it is cut to its K largest
(`np.partition`) and t becomes the smallest of them. A score at or below t can never be among the K largest (K
scores >= t are kept), and every score above t is kept, so at the end the buffer's K largest are exactly the K
largest impostor scores, ties included. Memory: the embeddings, one block, the buffer (about 2K floats) and the
genuine scores. Cost: N^2 D / 2 multiply-adds plus two passes over each score; 100,000 x 512-d took
docs/benchmarks.md's time on 2 cores (`bench/all_to_all.py`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.benchmark_cli import (
    add_model_arguments,
    add_result_arguments,
    check_result_paths,
    print_table,
    write_results,
)
from evaluation.calibration import allowed_false_accepts
from evaluation.embed import FaceImage
from models.cli import atomic_output, report_input_error, setup_logging
from models.errors import InputError

logger = logging.getLogger(__name__)

FAR_TARGETS = (1e-6, 1e-4)
DEFAULT_BLOCK = 4096
# The buffer of candidate impostor scores is cut back to the K largest when it holds more than this (or 2K).
MIN_BUFFER = 1 << 22
# k_max + 1 floats are kept at least: refuse targets that would keep more than this (a FAR far above MFR's).
MAX_KEPT = 200_000_000
ALL_GROUP = "all"


class AllToAllError(InputError):
    """Input that cannot be evaluated all-to-all; the message names the file or value."""


@dataclass(frozen=True)
class TarAtFar:
    """One target: the threshold (the (k+1)-th largest impostor score), the FAR measured there, the TAR, k, and
    whether the target FAR can be measured with these impostor pairs at all (`resolved`: FAR x n >= 1)."""

    far_target: float
    threshold: float
    far: float
    tar: float
    allowed_false_accepts: int
    resolved: bool


@dataclass(frozen=True)
class AllToAllResult:
    group: str
    num_images: int
    num_identities: int
    num_genuine: int
    num_impostor: int
    points: list[TarAtFar]


def _as_matrix(embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if matrix.dim() != 2:
        raise ValueError(f"need (N, D) embeddings, got shape {tuple(matrix.shape)}")
    return matrix.contiguous()


def all_to_all(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int],
    far_targets: Sequence[float] = FAR_TARGETS,
    group: str = ALL_GROUP,
    block: int = DEFAULT_BLOCK,
    min_buffer: int = MIN_BUFFER,
) -> AllToAllResult:
    """TAR at each FAR over all unordered pairs of `embeddings` (N, D), used as given (normalize them first: scores
    are dot products, computed in float32), `labels` (N,) the identity of each (module docstring: the algorithm)."""
    labels = np.asarray(labels)
    matrix = _as_matrix(embeddings)
    count = len(matrix)
    if labels.shape != (count,):
        raise ValueError(f"{count} embeddings but {labels.shape} labels")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    order = np.argsort(labels, kind="stable")
    matrix, labels = matrix[torch.from_numpy(order)].contiguous(), labels[order]
    _, codes = np.unique(labels, return_inverse=True)  # identities as 0..I-1, ascending like the sort
    codes = codes.astype(np.int64)
    sizes = np.bincount(codes)
    num_genuine = int((sizes * (sizes - 1) // 2).sum())
    num_impostor = count * (count - 1) // 2 - num_genuine
    if num_impostor == 0:
        raise AllToAllError(f"group {group!r}: {count} images of {len(sizes)} identity: no impostor pair")
    if num_genuine == 0:
        raise AllToAllError(f"group {group!r}: no identity has two images: no genuine pair")
    allowed = [allowed_false_accepts(far, num_impostor) for far in far_targets]
    kept = max(allowed) + 1
    if kept > MAX_KEPT:
        raise AllToAllError(
            f"a FAR of {max(far_targets):g} over {num_impostor} impostor pairs allows {kept - 1} false accepts: "
            f"more than the {MAX_KEPT} scores this tool keeps in memory; ask for a lower FAR"
        )
    genuine_parts: list[np.ndarray] = []
    buffer: list[np.ndarray] = []
    buffered = 0
    bound = -math.inf
    scores = torch.empty((block, block), dtype=torch.float32)
    for row in range(0, count, block):
        row_end = min(row + block, count)
        rows = matrix[row:row_end]
        row_codes = codes[row:row_end]
        for col in range(row, count, block):
            col_end = min(col + block, count)
            out = scores[: row_end - row, : col_end - col]
            torch.mm(rows, matrix[col:col_end].T, out=out)
            values = out.numpy()
            col_codes = codes[col:col_end]
            diagonal = col == row
            candidates = values > bound
            # Sorted by identity: a block can hold genuine pairs only where its identity ranges overlap (near the
            # diagonal); there, and in the diagonal blocks' lower triangles, masks drop what is not an impostor pair.
            if row_codes[-1] >= col_codes[0]:
                same = row_codes[:, None] == col_codes[None, :]
                if diagonal:
                    upper = np.triu(np.ones(same.shape, dtype=bool), k=1)
                    same &= upper
                    candidates &= upper
                genuine_parts.append(values[same])
                candidates &= ~same
            elif diagonal:
                candidates &= np.triu(np.ones(candidates.shape, dtype=bool), k=1)
            chosen = values[candidates]  # boolean indexing copies: the block buffer is reused
            if len(chosen):
                buffer.append(chosen)
                buffered += len(chosen)
            if buffered > max(2 * kept, min_buffer):
                top = _largest(np.concatenate(buffer), kept)
                buffer, buffered, bound = [top], len(top), float(top.min())
    impostor_top = np.sort(_largest(np.concatenate(buffer) if buffer else np.zeros(0, np.float32), kept))[::-1]
    genuine = np.concatenate(genuine_parts) if genuine_parts else np.zeros(0, np.float32)
    if len(genuine) != num_genuine or len(impostor_top) != min(kept, num_impostor):
        raise AssertionError(f"counted {len(genuine)} of {num_genuine} genuine pairs, kept {len(impostor_top)}")
    points = []
    for far, k in zip(far_targets, allowed, strict=True):
        threshold = float(impostor_top[k])
        false_accepts = int((impostor_top > threshold).sum())  # every score above it is among the kept
        points.append(
            TarAtFar(
                far_target=far,
                threshold=threshold,
                far=false_accepts / num_impostor,
                tar=float((genuine > threshold).mean()),
                allowed_false_accepts=k,
                resolved=far * num_impostor >= 1.0 - 1e-9,
            )
        )
    return AllToAllResult(group, count, len(sizes), num_genuine, num_impostor, points)


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """The `count` largest of `values` (all of them if fewer), in no order."""
    if len(values) <= count:
        return values
    return np.partition(values, len(values) - count)[len(values) - count :]


def evaluate_groups(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    far_targets: Sequence[float] = FAR_TARGETS,
    block: int = DEFAULT_BLOCK,
) -> list[AllToAllResult]:
    """The whole set, then each group on its own pairs (images with group None are in the whole set only)."""
    results = [all_to_all(embeddings, labels, far_targets, ALL_GROUP, block)]
    if groups is not None:
        for name in sorted({g for g in groups if g is not None}, key=str):
            members = np.array([g == name for g in groups])
            results.append(all_to_all(embeddings[members], labels[members], far_targets, str(name), block))
    return results


# --------------------------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class Labelled:
    """Images (or embeddings) with their identity names: `names[i]` is image i's name, `identities[i]` its label."""

    names: list[str]
    identities: list[str]


def list_labelled(source: Path) -> tuple[list[FaceImage], Labelled]:
    """The images of an identity-folder tree or a `path label` list, and their labels (`evaluation.embed`'s
    `FaceImage`s, in a fixed order)."""
    from evaluation.embed import list_images, read_image

    if source.is_dir():
        images = list_images(source)
        loose = [image.name for image in images if "/" not in image.name]
        if loose:
            raise AllToAllError(
                f"{source}: {loose[0]} is not in an identity sub-folder (the layout is <folder>/<identity>/<image>)"
            )
        return images, Labelled([i.name for i in images], [i.name.split("/", 1)[0] for i in images])
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllToAllError(f"{source}: no such file or folder") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AllToAllError(f"{source}: not a readable list of 'path label' lines ({err})") from None
    images, identities = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise AllToAllError(f"{source}:{number}: expected 'path label', got {raw.strip()!r}")
        path = source.parent / fields[0]
        images.append(FaceImage(fields[0], functools.partial(read_image, path)))
        identities.append(fields[1])
    if not images:
        raise AllToAllError(f"{source}: no images listed")
    return images, Labelled([i.name for i in images], identities)


def read_embeddings(path: Path) -> tuple[np.ndarray, Labelled]:
    """`--embeddings`: tensor `embeddings` (N, D); identities from a `labels` tensor or from the first folder of each
    of the metadata's `names` (what `evaluation.embed` writes for an identity-folder tree)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            keys = set(handle.keys())
            if "embeddings" not in keys:
                raise AllToAllError(f"{path}: no tensor 'embeddings' (it has {sorted(keys)})")
            embeddings = handle.get_tensor("embeddings")
            labels = handle.get_tensor("labels") if "labels" in keys else None
    except (SafetensorError, OSError) as err:
        raise AllToAllError(f"{path}: not a readable safetensors file ({err})") from None
    if embeddings.ndim != 2:
        raise AllToAllError(f"{path}: 'embeddings' has shape {embeddings.shape}, expected (N, D)")
    names: list[str] | None = None
    if "names" in metadata:
        try:
            names = [str(n) for n in json.loads(metadata["names"])]
        except ValueError:
            raise AllToAllError(f"{path}: metadata 'names' is not a JSON list") from None
    if "identities" in metadata:  # what --save-embeddings writes beside its labels
        try:
            identities = [str(n) for n in json.loads(metadata["identities"])]
        except ValueError:
            raise AllToAllError(f"{path}: metadata 'identities' is not a JSON list") from None
    elif labels is not None:
        identities = [str(v) for v in np.asarray(labels).reshape(-1).tolist()]
    elif names is not None:
        if any("/" not in n for n in names):
            raise AllToAllError(f"{path}: no 'labels' tensor, and its names are not <identity>/<image> paths")
        identities = [n.split("/", 1)[0] for n in names]
    else:
        raise AllToAllError(f"{path}: neither a 'labels' tensor nor metadata 'names' to take identities from")
    names = names or [f"{i}" for i in range(len(embeddings))]
    if not len(names) == len(identities) == len(embeddings):
        raise AllToAllError(f"{path}: {len(embeddings)} embeddings, {len(names)} names, {len(identities)} labels")
    return np.asarray(embeddings, np.float32), Labelled(names, identities)


def read_groups(path: Path, labelled: Labelled) -> np.ndarray:
    """Each image's group from a `name,group` CSV (`name` an image name or an identity; an image's own entry wins);
    None for an image without one."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
    except FileNotFoundError:
        raise AllToAllError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AllToAllError(f"{path}: not a readable 'name,group' CSV ({err})") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["name", "group"]:
        rows = rows[1:]
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise AllToAllError(f"{path}: row {number} is {row!r}, expected 'name,group'")
        table[row[0].strip()] = row[1].strip()
    groups = np.array(
        [
            table.get(name, table.get(identity))
            for name, identity in zip(labelled.names, labelled.identities, strict=True)
        ],
        dtype=object,
    )
    missing = int(sum(g is None for g in groups))
    if missing == len(groups):
        raise AllToAllError(f"{path}: no image or identity of the input is named in it")
    if missing:
        logger.warning(
            "%d of %d images have no group in %s: they count in the whole set only", missing, len(groups), path
        )
    return groups


# --------------------------------------------------------------------------------------------------------------
# Report


def _key(far: float) -> str:
    return f"{far:g}"


def results_json(results: Sequence[AllToAllResult]) -> dict:
    return {
        result.group: {
            **{k: v for k, v in asdict(result).items() if k != "points"},
            "tar_at_far": {_key(p.far_target): (p.tar if p.resolved else None) for p in result.points},
            "threshold": {_key(p.far_target): p.threshold for p in result.points},
            "far_read": {_key(p.far_target): p.far for p in result.points},
            "resolved": {_key(p.far_target): p.resolved for p in result.points},
        }
        for result in results
    }


def card_section(results: Sequence[AllToAllResult], source: str) -> dict:
    from evaluation.card import result_section

    far_targets = [p.far_target for p in results[0].points]
    columns = ["group", "images", "identities", "genuine", "impostor", *[f"TAR@FAR={f:g}" for f in far_targets]]
    rows = [
        [r.group, r.num_images, r.num_identities, r.num_genuine, r.num_impostor]
        + [f"{p.tar:.5f}" if p.resolved else "n/r" for p in r.points]
        for r in results
    ]
    note = f"all-to-all 1:1 on {source}: every pair of images, threshold the (k+1)-th largest impostor score"
    return result_section(
        "All-to-all 1:1 (MFR style)", columns, rows, results_json(results), note, "evaluation.all_to_all"
    )


def print_results(results: Sequence[AllToAllResult], title: str) -> None:
    columns = ["group", "images", "identities", "genuine pairs", "impostor pairs"]
    columns += [f"TAR@FAR={point.far_target:g} (threshold)" for point in results[0].points]
    rows = [
        [
            result.group,
            str(result.num_images),
            str(result.num_identities),
            str(result.num_genuine),
            str(result.num_impostor),
            *[f"{p.tar:.5f} ({p.threshold:.4f})" if p.resolved else f"n/r ({p.threshold:.4f})" for p in result.points],
        ]
        for result in results
    ]
    print_table(title, columns, rows, left=1)
    if any(not p.resolved for r in results for p in r.points):
        logger.info("n/r: a FAR below 1 / impostor pairs is not resolved by this set (the threshold is its top score)")


# --------------------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.all_to_all", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("input", nargs="?", type=Path, help="a folder of identity sub-folders, or a 'path label' list")
    parser.add_argument("--embeddings", type=Path, help="a .safetensors of embeddings instead of a model and images")
    parser.add_argument("--groups", type=Path, help="'name,group' CSV: also evaluate each group on its own pairs")
    parser.add_argument(
        "--far",
        type=float,
        action="append",
        help=f"target FAR (repeatable; default {', '.join(map(str, FAR_TARGETS))})",
    )
    parser.add_argument("--save-embeddings", type=Path, help="write the embeddings (and labels) as .safetensors")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="rows and columns of one score block")
    parser.add_argument("--threads", type=int, help="torch threads for the score blocks (default: torch's)")
    add_model_arguments(parser, model_required=False, flip=False)
    add_result_arguments(parser)
    args = parser.parse_args(argv)
    if (args.embeddings is None) == (args.input is None):
        parser.error("give an input folder or list with --model, or --embeddings FILE")
    if args.input is not None and args.model is None:
        parser.error("an input folder or list needs --model")
    if args.card and args.model is None:
        parser.error("--card needs --model (the card belongs to a model file)")
    if args.block < 1 or args.batch_size < 1:
        parser.error("--block and --batch-size must be at least 1")
    return args


def _run(args: argparse.Namespace) -> int:
    far_targets = tuple(args.far or FAR_TARGETS)
    if not all(0.0 < far < 1.0 for far in far_targets):
        raise AllToAllError(f"--far must be in (0, 1), got {list(far_targets)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_result_paths(args.out, args.save_embeddings)
    model_path = None
    if args.embeddings is not None:
        embeddings, labelled = read_embeddings(args.embeddings)
        source = args.embeddings.name
    else:
        from evaluation.card import print_input_line
        from evaluation.embed import FaceEmbedder, embed_images, resolve_device

        images, labelled = list_labelled(args.input)
        embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device))
        print_input_line(embedder.metadata)
        model_path = embedder.path
        names, embeddings, skipped = embed_images(embedder, images, None, args.flip, args.batch_size, args.workers)
        if skipped:
            identity = dict(zip(labelled.names, labelled.identities, strict=True))
            labelled = Labelled(names, [identity[n] for n in names])
        source = args.input.name
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
    if args.save_embeddings is not None:
        _save_embeddings(args.save_embeddings, embeddings, labelled)
    _, labels = np.unique(np.asarray(labelled.identities, dtype=object).astype(str), return_inverse=True)
    groups = read_groups(args.groups, labelled) if args.groups is not None else None
    results = evaluate_groups(embeddings, labels, groups, far_targets, args.block)
    if args.out is not None:
        write_results(args.out, results_json(results))
    if args.card and model_path is not None:
        from evaluation.card import update_card

        update_card(model_path, "all_to_all", card_section(results, source))
    print_results(results, f"All-to-all 1:1 on {source}")
    return 0


def _save_embeddings(path: Path, embeddings: np.ndarray, labelled: Labelled) -> None:
    from safetensors.numpy import save

    _, labels = np.unique(np.asarray(labelled.identities, dtype=object).astype(str), return_inverse=True)
    data = save(
        {"embeddings": np.ascontiguousarray(embeddings, np.float32), "labels": labels.astype(np.int64)},
        {"names": json.dumps(labelled.names), "identities": json.dumps(labelled.identities)},
    )
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    logger.info("embeddings: %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.all_to_all` CLI; returns the exit status (2 for bad input)."""
    args = _parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except InputError as err:
        return report_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
