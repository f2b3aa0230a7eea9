"""RFW (Racial Faces in-the-Wild, Wang et al., ICCV 2019): verification accuracy per group, their mean, standard
deviation and skewed error ratio.

    python -m evaluation.rfw --model runs/r50/model.safetensors --root RFW/test [--out rfw.json] [--card]

The release's layout (`test/` of the archive, as FaceX-Zoo's `test_protocol` and bob.bio.face read it), for each
group G of African, Asian, Caucasian, Indian:

    <root>/txts/G/G_pairs.txt     LFW pairs.txt lines, tab separated: `name i j` (same identity: images i and j of
                                  `name`), `name1 i name2 j` (different); 6,000 pairs, 10 folds of 300 + 300
    <root>/txts/G/G_lmk.txt       `<path>/<identity>/<image>.jpg  label  x1 y1 ... x5 y5` per image: 5 points (left
                                  eye, right eye, nose tip, left and right mouth corner, as seen) in the loose image
    <root>/data/G/<identity>/<identity>_<i:04d>.jpg

`--root` may also be the folder holding `test/`. With the landmarks file each image is aligned onto the ArcFace
template (`evaluation.alignment`, the IJB evaluation's alignment); `--no-align` (or no landmarks file: a copy of RFW
that is already cropped, e.g. FaceX-Zoo's `RFW_crop`) reads the images as aligned crops, any other size resized on
its shorter side and centre-cropped to 112x112 as `.bin` images are.

Protocol per group: the `.bin` sets' (`evaluation.verification`): each image and its mirror image embedded, summed,
L2-normalized; the 10-fold best-threshold accuracy over the group's pairs in file order; accuracy +- std over the
folds. Across groups: the mean of the four accuracies, their standard deviation (population, ddof 0) and the skewed
error ratio SER = the largest error / the smallest error (error = 1 - accuracy; infinite when a group makes no
error). Bad input (a missing file or image, a malformed line, an image without landmarks) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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

GROUPS = ("African", "Asian", "Caucasian", "Indian")
NUM_LANDMARKS = 5


class RFWFormatError(InputError):
    """An RFW folder that is not in the release's layout; the message names the file (and line)."""


@dataclass(frozen=True)
class GroupResult:
    group: str
    pairs: int
    acc: float
    std: float


@dataclass(frozen=True)
class RFWResult:
    groups: list[GroupResult]
    mean: float
    std: float
    ser: float  # skewed error ratio: worst error / best error


@dataclass(frozen=True)
class GroupProtocol:
    """One group's pairs (image names `<identity>/<file>` under `image_dir`) and landmarks (None: aligned crops)."""

    group: str
    image_dir: Path
    pairs: list[tuple[str, str, bool]]
    landmarks: dict[str, np.ndarray] | None

    @property
    def images(self) -> list[str]:
        """Each image once, in the order the pairs name them."""
        return list(dict.fromkeys(name for first, second, _ in self.pairs for name in (first, second)))


def find_root(root: Path) -> Path:
    """The folder holding `txts/` and `data/`: `root` itself or its `test/`."""
    for candidate in (root, root / "test"):
        if (candidate / "txts").is_dir() and (candidate / "data").is_dir():
            return candidate
    raise RFWFormatError(f"{root}: not an RFW test folder (no txts/ and data/ in it or in {root / 'test'})")


def image_name(identity: str, index: str) -> str:
    """RFW's (and LFW's) file name of image `index` of `identity`: `<identity>/<identity>_<index:04d>.jpg`."""
    return f"{identity}/{identity}_{int(index):04d}.jpg"


def read_pairs(path: Path) -> list[tuple[str, str, bool]]:
    """`(image 1, image 2, same)` per line of a `G_pairs.txt` (tab or space separated)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise RFWFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RFWFormatError(f"{path}: cannot be read ({err})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            pairs.append((image_name(fields[0], fields[1]), image_name(fields[0], fields[2]), True))
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            pairs.append((image_name(fields[0], fields[1]), image_name(fields[2], fields[3]), False))
        else:
            raise RFWFormatError(f"{path}:{number}: expected 'name i j' or 'name1 i name2 j', got {line.strip()!r}")
    if not pairs:
        raise RFWFormatError(f"{path}: no pairs")
    return pairs


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """`<identity>/<file>` -> (5, 2) points from a `G_lmk.txt` (`path label x1 y1 ... x5 y5`; the last two parts of
    the path name the image, as FaceX-Zoo's cropper reads them)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RFWFormatError(f"{path}: cannot be read ({err})") from None
    landmarks: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 + 2 * NUM_LANDMARKS:
            raise RFWFormatError(
                f"{path}:{number}: expected 'path label x1 y1 ... x5 y5' (12 fields), got {len(fields)}"
            )
        try:
            points = np.array([float(v) for v in fields[2:]], dtype=np.float64).reshape(NUM_LANDMARKS, 2)
        except ValueError:
            raise RFWFormatError(f"{path}:{number}: the 10 coordinates must be numbers, got {fields[2:]}") from None
        parts = fields[0].replace("\\", "/").rstrip("/").split("/")
        if len(parts) < 2:
            raise RFWFormatError(f"{path}:{number}: {fields[0]!r} is not a <identity>/<image> path")
        landmarks[f"{parts[-2]}/{parts[-1]}"] = points
    if not landmarks:
        raise RFWFormatError(f"{path}: no landmarks")
    return landmarks


def load_protocol(root: Path, groups: Sequence[str] = GROUPS, align: bool = True) -> list[GroupProtocol]:
    """Every group's pairs and landmarks, checked: each pair's images exist and, when aligning, have landmarks."""
    root = find_root(root)
    protocols = []
    for group in groups:
        txts, image_dir = root / "txts" / group, root / "data" / group
        pairs = read_pairs(txts / f"{group}_pairs.txt")
        lmk = txts / f"{group}_lmk.txt"
        landmarks = read_landmarks(lmk) if align and lmk.is_file() else None
        if align and landmarks is None:
            logger.warning("%s: no landmarks file %s: its images are read as aligned crops", group, lmk)
        protocol = GroupProtocol(group, image_dir, pairs, landmarks)
        names = protocol.images
        missing = [n for n in names if not (image_dir / n).is_file()]
        if missing:
            raise RFWFormatError(
                f"{image_dir}: {len(missing)} of the {len(names)} images of {group}_pairs.txt are missing (first: "
                f"{missing[0]})"
            )
        if landmarks is not None:
            without = [n for n in names if n not in landmarks]
            if without:
                raise RFWFormatError(f"{lmk}: no landmarks for {len(without)} images (first: {without[0]})")
        protocols.append(protocol)
    return protocols


def load_crops(protocol: GroupProtocol, workers: int = 4) -> tuple[torch.Tensor, list[str]]:
    """uint8 (M, 3, 112, 112) crops of the group's images (`protocol.images` order), aligned when landmarks exist."""
    from data.recordio import decode_image
    from evaluation.alignment import align_face
    from evaluation.verification import _fit

    names = protocol.images

    def crop(name: str) -> np.ndarray:
        path = protocol.image_dir / name
        try:
            image = decode_image(path.read_bytes())
        except Exception as err:  # decoders raise many types
            raise RFWFormatError(f"{path}: not a readable image ({err})") from None
        if protocol.landmarks is not None:
            try:
                return align_face(image, protocol.landmarks[name])
            except ValueError as err:
                raise RFWFormatError(f"{path}: cannot be aligned ({err})") from None
        return _fit(image, (112, 112))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        crops = list(pool.map(crop, names))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), names


def group_accuracy(embeddings: dict[str, np.ndarray], pairs: Sequence[tuple[str, str, bool]]) -> tuple[float, float]:
    """The 10-fold accuracy +- std of the pairs, from L2-normalized embeddings by image name."""
    from evaluation.verification import compute_accuracy

    first = np.stack([embeddings[a] for a, _, _ in pairs])
    second = np.stack([embeddings[b] for _, b, _ in pairs])
    acc, std, _ = compute_accuracy(first, second, [same for _, _, same in pairs])
    return acc, std


def summarize(groups: Sequence[GroupResult]) -> RFWResult:
    """Mean, population std and skewed error ratio (worst error / best error) of the groups' accuracies."""
    accuracies = np.array([g.acc for g in groups], dtype=np.float64)
    errors = 1.0 - accuracies
    ser = float(errors.max() / errors.min()) if errors.min() > 0 else math.inf
    return RFWResult(list(groups), float(accuracies.mean()), float(accuracies.std()), ser)


def evaluate(
    embedder: FaceEmbedder, protocols: Sequence[GroupProtocol], flip: bool, batch_size: int, workers: int
) -> RFWResult:
    """Embed each group's images with a `FaceEmbedder` and score its pairs."""
    results = []
    for protocol in protocols:
        crops, names = load_crops(protocol, workers)
        embeddings = embedder.embed_tensor(crops, flip=flip, batch_size=batch_size, progress=True)
        acc, std = group_accuracy(dict(zip(names, embeddings, strict=True)), protocol.pairs)
        logger.info("%s: %d pairs, accuracy %.5f +- %.5f", protocol.group, len(protocol.pairs), acc, std)
        results.append(GroupResult(protocol.group, len(protocol.pairs), acc, std))
    return summarize(results)


def results_json(result: RFWResult) -> dict:
    return {
        "groups": {g.group: asdict(g) for g in result.groups},
        "mean": result.mean,
        "std": result.std,
        "ser": None if math.isinf(result.ser) else result.ser,
    }


def _rows(result: RFWResult) -> list[list[str]]:
    rows = [[g.group, str(g.pairs), f"{g.acc:.5f} +- {g.std:.5f}", f"{1 - g.acc:.5f}"] for g in result.groups]
    ser = "inf (a group makes no error)" if math.isinf(result.ser) else f"{result.ser:.3f}"
    rows += [["mean", str(sum(g.pairs for g in result.groups)), f"{result.mean:.5f}", f"{1 - result.mean:.5f}"]]
    rows += [["std (across groups)", "", f"{result.std:.5f}", ""], ["skewed error ratio", "", "", ser]]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.rfw` CLI; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.rfw", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="RFW's test folder (txts/, data/) or the one above")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS, help="default: all four")
    parser.add_argument("--no-align", action="store_true", help="ignore the landmarks: the images are aligned crops")
    add_model_arguments(parser, workers="decoding and alignment threads")
    add_result_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    columns = ["group", "pairs", "accuracy +- std", "error"]
    try:
        from evaluation.card import print_input_line, result_section, update_card
        from evaluation.embed import FaceEmbedder, resolve_device

        check_result_paths(args.out)
        protocols = load_protocol(args.root, args.groups, align=not args.no_align)
        embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device))
        print_input_line(embedder.metadata)
        result = evaluate(embedder, protocols, args.flip, args.batch_size, args.workers)
        if args.out is not None:
            write_results(args.out, results_json(result))
        if args.card:
            note = "RFW: per group the .bin sets' 10-fold protocol; SER = worst error / best error"
            section = result_section("RFW", columns, _rows(result), results_json(result), note, "evaluation.rfw")
            update_card(embedder.path, "rfw", section)
    except InputError as err:
        return report_input_error(err)
    print_table(f"RFW: {args.model.name}", columns, _rows(result), left=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
