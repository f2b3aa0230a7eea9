"""TinyFace (Cheng et al., ACCV 2018): closed-set identification of native low-resolution faces, rank-1 / 5 / 20.

    python -m evaluation.tinyface --model runs/r50/model.safetensors --root tinyface [--aligned DIR] [--card]

The release's layout (`Testing_Set/` of `tinyface.zip`; AdaFace's `validation_lq` and the release's own evaluation
code read it so):

    Testing_Set/Probe/                          3,728 probe faces
    Testing_Set/Gallery_Match/                  4,443 gallery faces of the probes' identities
    Testing_Set/Gallery_Distractor/             153,428 distractor faces (no probe's identity)
    Testing_Set/probe_img_ID_pairs.mat          `probe_set` (a cell column of file names), `probe_ids` (N x 1)
    Testing_Set/gallery_match_img_ID_pairs.mat  `gallery_set`, `gallery_ids`

`--root` may be `Testing_Set` itself, the folder holding it, or the one holding `tinyface/Testing_Set` (AdaFace's
layout). Identities are the `.mat` files' ids (or, when a file has no ids, the number before the first `_` of a file
name, as AdaFace reads them). `--aligned DIR` reads the images from an aligned copy with the same three sub-folders
(AdaFace's `aligned_pad_0.1_pad_high`) instead. Every image is resized to 112x112 (bilinear, whatever its size: the
faces are about 20 pixels high), as those loaders feed the network.

Protocol: each probe is searched in the gallery (matches and distractors together) by cosine of flip-summed,
L2-normalized embeddings (`--no-flip`: the image alone). A probe's rank is 1 + the number of gallery faces of other
identities scoring at least as high as its best-scoring face of its own identity (a tie counts against the probe);
rank-k is the share of probes with rank <= k. Probes without any gallery face of their identity (none in the
release) are left out and counted. The score matrix is computed in chunks of probes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from evaluation.benchmark_cli import (
    add_model_arguments,
    add_result_arguments,
    check_result_paths,
    print_table,
    write_results,
)
from models.cli import report_input_error, setup_logging
from models.errors import InputError

if TYPE_CHECKING:
    from evaluation.embed import FaceEmbedder

logger = logging.getLogger(__name__)

RANKS = (1, 5, 20)
PROBE, MATCH, DISTRACTOR = "Probe", "Gallery_Match", "Gallery_Distractor"
PROBE_MAT, MATCH_MAT = "probe_img_ID_pairs.mat", "gallery_match_img_ID_pairs.mat"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SIZE = 112
_PROBE_CHUNK = 256


class TinyFaceFormatError(InputError):
    """A TinyFace folder that is not in the release's layout; the message names the file."""


@dataclass(frozen=True)
class Protocol:
    """Image paths and identities of the probes and of the gallery (matches, then distractors: identity -1)."""

    probes: list[Path]
    probe_ids: np.ndarray
    gallery: list[Path]
    gallery_ids: np.ndarray
    num_distractors: int


@dataclass(frozen=True)
class IdentificationResult:
    ranks: dict[int, float]
    probes: int
    probes_without_mate: int
    gallery: int
    distractors: int


def find_testing_set(root: Path) -> Path:
    for candidate in (root, root / "Testing_Set", root / "tinyface" / "Testing_Set"):
        if (candidate / PROBE_MAT).is_file() and (candidate / MATCH_MAT).is_file():
            return candidate
    raise TinyFaceFormatError(
        f"{root}: no TinyFace Testing_Set ({PROBE_MAT} and {MATCH_MAT} in it, in Testing_Set/ or tinyface/Testing_Set/)"
    )


def _label_from_name(name: str, path: Path) -> int:
    head = Path(name).name.split("_", 1)[0]
    if not head.isdigit():
        raise TinyFaceFormatError(f"{path}: no ids in the file and {name!r} does not start with '<id>_'")
    return int(head)


def read_mat_list(path: Path, set_key: str, id_key: str) -> tuple[list[str], np.ndarray]:
    """(file names, identities) of a `*_img_ID_pairs.mat`: a cell array of names and an id column."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except FileNotFoundError:
        raise TinyFaceFormatError(f"{path}: no such file") from None
    except Exception as err:  # scipy raises ValueError, MatReadError, ... on a bad file
        raise TinyFaceFormatError(f"{path}: not a readable .mat file ({err})") from None
    if set_key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise TinyFaceFormatError(f"{path}: no '{set_key}' (it holds {keys})")
    names = []
    for entry in np.asarray(mat[set_key], dtype=object).ravel():
        value = entry
        while isinstance(value, np.ndarray):  # a cell holds a char array, possibly nested (1, 1)
            if value.size != 1:
                break
            value = value.ravel()[0]
        names.append(str(value).strip())
    if id_key in mat:
        ids = np.asarray(mat[id_key]).ravel().astype(np.int64)
        if len(ids) != len(names):
            raise TinyFaceFormatError(f"{path}: {len(names)} names in '{set_key}' but {len(ids)} in '{id_key}'")
    else:
        ids = np.array([_label_from_name(name, path) for name in names], dtype=np.int64)
    if not names:
        raise TinyFaceFormatError(f"{path}: '{set_key}' is empty")
    return names, ids


def load_protocol(root: Path, aligned: Path | None = None) -> Protocol:
    """The probe list, the gallery match list and every distractor image, checked to exist."""
    testing = find_testing_set(root)
    images = aligned if aligned is not None else testing
    probe_names, probe_ids = read_mat_list(testing / PROBE_MAT, "probe_set", "probe_ids")
    match_names, match_ids = read_mat_list(testing / MATCH_MAT, "gallery_set", "gallery_ids")
    distractor_dir = images / DISTRACTOR
    if not distractor_dir.is_dir():
        raise TinyFaceFormatError(f"{distractor_dir}: no such folder")
    distractors = sorted(p for p in distractor_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    probes = [images / PROBE / name for name in probe_names]
    matches = [images / MATCH / name for name in match_names]
    for kind, paths in (("probe", probes), ("gallery", matches)):
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise TinyFaceFormatError(
                f"{len(missing)} of the {len(paths)} {kind} images are missing (first: {missing[0]})"
            )
    gallery_ids = np.concatenate([match_ids, np.full(len(distractors), -1, dtype=np.int64)])
    return Protocol(probes, probe_ids, matches + distractors, gallery_ids, len(distractors))


def read_resized(path: Path) -> np.ndarray:
    """An image as uint8 (112, 112, 3) RGB, resized bilinearly from whatever size it has."""
    from PIL import Image

    from data.recordio import decode_image

    try:
        image = decode_image(path.read_bytes())
    except Exception as err:  # decoders raise many types
        raise TinyFaceFormatError(f"{path}: not a readable image ({err})") from None
    if image.shape[:2] == (SIZE, SIZE):
        return image
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def identification(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_ids: np.ndarray,
    ranks: Sequence[int] = RANKS,
    chunk: int = _PROBE_CHUNK,
) -> tuple[dict[int, float], int]:
    """Closed-set rank-k rates over the probes that have a mate (module docstring), and how many have none."""
    gallery = torch.from_numpy(np.ascontiguousarray(gallery_feats, np.float32))
    gallery_ids = np.asarray(gallery_ids)
    probe_ids = np.asarray(probe_ids)
    found: list[np.ndarray] = []
    for start in range(0, len(probe_feats), chunk):
        probes = torch.from_numpy(np.ascontiguousarray(probe_feats[start : start + chunk], np.float32))
        scores = (probes @ gallery.T).numpy()
        mates = probe_ids[start : start + chunk, None] == gallery_ids[None, :]
        best_mate = np.where(mates, scores, -np.inf).max(axis=1)
        above = ((scores >= best_mate[:, None]) & ~mates).sum(axis=1)
        found.append(np.where(np.isfinite(best_mate), above + 1, 0))  # 0: no mate in the gallery
    rank = np.concatenate(found) if found else np.zeros(0, np.int64)
    mated = rank > 0
    if not mated.any():
        raise TinyFaceFormatError("no probe has a face of its identity in the gallery: nothing to identify")
    return {k: float((rank[mated] <= k).mean()) for k in ranks}, int((~mated).sum())


def evaluate(
    embedder: FaceEmbedder, protocol: Protocol, flip: bool, batch_size: int, workers: int
) -> IdentificationResult:
    """Embed the probes and the gallery with a `FaceEmbedder` and identify."""

    def embed(paths: list[Path], what: str) -> np.ndarray:
        chunks = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(paths), 4096):  # bounded memory for the 153k distractors
                crops = np.stack(list(pool.map(read_resized, paths[start : start + 4096])))
                tensor = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
                chunks.append(embedder.embed_tensor(tensor, flip=flip, batch_size=batch_size))
                logger.info("%s: %d of %d embedded", what, min(start + 4096, len(paths)), len(paths))
        return np.concatenate(chunks)

    probe_feats = embed(protocol.probes, "probes")
    gallery_feats = embed(protocol.gallery, "gallery")
    ranks, without = identification(probe_feats, protocol.probe_ids, gallery_feats, protocol.gallery_ids)
    if without:
        logger.warning("%d probes have no gallery face of their identity: left out", without)
    return IdentificationResult(ranks, len(protocol.probes), without, len(protocol.gallery), protocol.num_distractors)


def results_json(result: IdentificationResult) -> dict:
    return {
        "rank": {str(k): v for k, v in result.ranks.items()},
        "probes": result.probes,
        "probes_without_mate": result.probes_without_mate,
        "gallery": result.gallery,
        "distractors": result.distractors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.tinyface` CLI; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.tinyface", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="TinyFace's Testing_Set, or a folder holding it")
    parser.add_argument("--aligned", type=Path, help="read Probe/, Gallery_Match/, Gallery_Distractor/ from here")
    add_model_arguments(parser)
    add_result_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        from evaluation.card import print_input_line, result_section, update_card
        from evaluation.embed import FaceEmbedder, resolve_device

        check_result_paths(args.out)
        protocol = load_protocol(args.root, args.aligned)
        logger.info(
            "TinyFace: %d probes, %d gallery faces (%d distractors)",
            len(protocol.probes),
            len(protocol.gallery),
            protocol.num_distractors,
        )
        embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device))
        print_input_line(embedder.metadata)
        result = evaluate(embedder, protocol, args.flip, args.batch_size, args.workers)
        if args.out is not None:
            write_results(args.out, results_json(result))
        columns = ["probes", "gallery (distractors)", *[f"rank-{k}" for k in result.ranks]]
        row = [str(result.probes - result.probes_without_mate), f"{result.gallery} ({result.distractors})"]
        row += [f"{v:.5f}" for v in result.ranks.values()]
        if args.card:
            note = "TinyFace closed-set identification, images resized to 112x112; ties count against the probe"
            section = result_section("TinyFace", columns, [row], results_json(result), note, "evaluation.tinyface")
            update_card(embedder.path, "tinyface", section)
    except InputError as err:
        return report_input_error(err)
    print_table(f"TinyFace: {args.model.name}", columns, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
