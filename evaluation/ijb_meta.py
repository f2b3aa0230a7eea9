"""Reading and checking insightface's IJB-B / IJB-C layout (`IJB_release/IJBC`); `load_protocol(root, target)`.

    meta/ijbc_face_tid_mid.txt         image_name template_id media_id         (one line per face)
    meta/ijbc_name_5pts_score.txt      image_name x1 y1 ... x5 y5 det_score    (the same faces, in the same order)
    meta/ijbc_template_pair_label.txt  template_id1 template_id2 label     (1: same subject)
    meta/ijbc_1N_gallery_G1.csv        1:N gallery 1 (IJB-B: ijbb_1N_gallery_S1.csv), optional
    meta/ijbc_1N_gallery_G2.csv        1:N gallery 2 (IJB-B: ijbb_1N_gallery_S2.csv), optional
    meta/ijbc_1N_probe_mixed.csv       1:N probes, optional
    loose_crop/<image_name>            the images the landmarks refer to

insightface pairs the face list and the landmark file by line, so both must list the same images in the same order;
this is checked. The 1:N files are the NIST protocol CSVs: a header row, then one row per image with TEMPLATE_ID and
SUBJECT_ID (found by name in the header, else taken from the first two columns, as insightface does); a template's
rows must agree on its subject. Their template ids are those of the face list. Either all three 1:N files are there
or none (then 1:N is skipped). Every problem is an `IJBFormatError` naming the file and line.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from models.errors import InputError

logger = logging.getLogger(__name__)

Target = Literal["IJBB", "IJBC"]
TARGETS: tuple[Target, ...] = ("IJBB", "IJBC")
# IJB-B names its two 1:N galleries S1/S2, IJB-C G1/G2.
GALLERY_NAMES: dict[Target, tuple[str, str]] = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
NUM_LANDMARKS = 5


class IJBFormatError(InputError, ValueError):
    """A missing or malformed IJB file; the message names the file (and line)."""


@dataclass(frozen=True)
class Faces:
    """Every face of the benchmark, in the order of the meta files."""

    image_names: list[str]
    landmarks: np.ndarray  # (N, 5, 2) float64, pixels of the loose crop
    det_scores: np.ndarray  # (N,) float64
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    lines: np.ndarray  # (N,) int64: the face's line in the landmark file, for error messages

    def __len__(self) -> int:
        return len(self.image_names)


@dataclass(frozen=True)
class TemplatePairs:
    """The 1:1 verification pairs."""

    template1: np.ndarray  # (P,) int64
    template2: np.ndarray  # (P,) int64
    labels: np.ndarray  # (P,) int64, 1 = same subject

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TemplateSet:
    """A 1:N gallery or probe set: its distinct templates (ascending) and each one's subject."""

    name: str
    templates: np.ndarray  # (T,) int64
    subjects: np.ndarray  # (T,) int64


@dataclass(frozen=True)
class Protocol:
    """One benchmark as read from disk."""

    target: Target
    root: Path
    image_dir: Path
    faces: Faces
    pairs: TemplatePairs
    galleries: tuple[TemplateSet, ...]  # empty when the 1:N files are absent
    probes: TemplateSet | None

    @property
    def landmark_file(self) -> Path:
        return meta_paths(self.root, self.target)["landmarks"]


def meta_paths(root: Path, target: Target) -> dict[str, Path]:
    """The meta files of `target` under `root` (keys: faces, landmarks, pairs, gallery1, gallery2, probes)."""
    meta, prefix = root / "meta", target.lower()
    first, second = GALLERY_NAMES[target]
    return {
        "faces": meta / f"{prefix}_face_tid_mid.txt",
        "landmarks": meta / f"{prefix}_name_5pts_score.txt",
        "pairs": meta / f"{prefix}_template_pair_label.txt",
        "gallery1": meta / f"{prefix}_1N_gallery_{first}.csv",
        "gallery2": meta / f"{prefix}_1N_gallery_{second}.csv",
        "probes": meta / f"{prefix}_1N_probe_mixed.csv",
    }


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """`(line number, whitespace-split tokens)` of every non-blank line."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            return [(number, tokens) for number, line in enumerate(handle, 1) if (tokens := line.split())]
    except FileNotFoundError:
        raise IJBFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise IJBFormatError(f"{path}: cannot be read ({err})") from None


def _int(token: str, path: Path, line: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise IJBFormatError(f"{path}:{line}: {what} {token!r} is not an integer") from None


def _float(token: str, path: Path, line: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise IJBFormatError(f"{path}:{line}: {what} {token!r} is not a number") from None
    if not math.isfinite(value):
        raise IJBFormatError(f"{path}:{line}: {what} {token!r} is not a finite number")
    return value


def _read_face_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, templates, medias = [], [], []
    for line, tokens in _lines(path):
        if len(tokens) != 3:
            raise IJBFormatError(
                f"{path}:{line}: expected 3 values (image_name template_id media_id), got {len(tokens)}"
            )
        names.append(tokens[0])
        templates.append(_int(tokens[1], path, line, "template id"))
        medias.append(_int(tokens[2], path, line, "media id"))
    if not names:
        raise IJBFormatError(f"{path}: no faces listed")
    return names, np.array(templates, dtype=np.int64), np.array(medias, dtype=np.int64)


def _read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    expected = 2 + 2 * NUM_LANDMARKS
    names, landmarks, scores, lines = [], [], [], []
    for line, tokens in _lines(path):
        if len(tokens) != expected:
            raise IJBFormatError(
                f"{path}:{line}: expected {expected} values (image_name, {2 * NUM_LANDMARKS} landmark coordinates, "
                f"det_score), got {len(tokens)}"
            )
        names.append(tokens[0])
        landmarks.append([_float(token, path, line, "landmark coordinate") for token in tokens[1:-1]])
        scores.append(_float(tokens[-1], path, line, "detector score"))
        lines.append(line)
    if not names:
        raise IJBFormatError(f"{path}: no faces listed")
    return (
        names,
        np.array(landmarks, dtype=np.float64).reshape(-1, NUM_LANDMARKS, 2),
        np.array(scores, dtype=np.float64),
        np.array(lines, dtype=np.int64),
    )


def _line_of_row(path: Path, row: int) -> int:
    """The line number of the `row`-th non-blank line (0-based), for errors found after a fast bulk read."""
    return _lines(path)[row][0]


def _read_pairs(path: Path) -> TemplatePairs:
    # The IJB-C pair file has 15.7 million lines: NumPy's C parser reads it in seconds. Only when it refuses the file
    # does the slow line-by-line reader run, to name the offending line.
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below as an error
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        for line, tokens in _lines(path):
            if len(tokens) != 3:
                raise IJBFormatError(
                    f"{path}:{line}: expected 3 values (template_id1 template_id2 label), got {len(tokens)}"
                ) from None
            for token, what in zip(tokens, ("template id", "template id", "label"), strict=True):
                _int(token, path, line, what)
        raise IJBFormatError(f"{path}: not a table of integers") from None
    if table.size == 0:
        raise IJBFormatError(f"{path}: no pairs listed")
    if table.shape[1] != 3:
        raise IJBFormatError(f"{path}:{_line_of_row(path, 0)}: expected 3 values per line, got {table.shape[1]}")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if len(bad):
        row = int(bad[0])
        raise IJBFormatError(f"{path}:{_line_of_row(path, row)}: label {table[row, 2]} is not 0 or 1")
    if table[:, 2].min() == table[:, 2].max():
        raise IJBFormatError(
            f"{path}: every pair has label {table[0, 2]}; a ROC needs genuine (1) and impostor (0) pairs"
        )
    return TemplatePairs(template1=table[:, 0].copy(), template2=table[:, 1].copy(), labels=table[:, 2].copy())


def _read_template_set(path: Path, name: str, known_templates: np.ndarray) -> TemplateSet:
    try:
        with path.open("r", encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise IJBFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise IJBFormatError(f"{path}: cannot be read ({err})") from None
    if not rows:
        raise IJBFormatError(f"{path}: empty (expected a header row, then TEMPLATE_ID,SUBJECT_ID,... rows)")
    header = [cell.strip().upper() for cell in rows[0]]
    template_col = header.index("TEMPLATE_ID") if "TEMPLATE_ID" in header else 0
    subject_col = header.index("SUBJECT_ID") if "SUBJECT_ID" in header else 1
    needed = max(template_col, subject_col) + 1
    subject_of: dict[int, int] = {}
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < needed:
            raise IJBFormatError(f"{path}:{line}: expected at least {needed} comma-separated values, got {len(row)}")
        template = _int(row[template_col].strip(), path, line, "template id")
        subject = _int(row[subject_col].strip(), path, line, "subject id")
        if subject_of.setdefault(template, subject) != subject:
            raise IJBFormatError(
                f"{path}:{line}: template {template} has subject {subject}, an earlier row says {subject_of[template]}"
            )
    if not subject_of:
        raise IJBFormatError(f"{path}: no templates listed")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    unknown = templates[~np.isin(templates, known_templates)]
    if len(unknown):
        template = int(unknown[0])
        line = next(i for i, row in enumerate(rows[1:], 2) if row and row[template_col].strip() == str(template))
        raise IJBFormatError(f"{path}:{line}: template {template} has no faces in the face list")
    subjects = np.array([subject_of[int(t)] for t in templates], dtype=np.int64)
    return TemplateSet(name=name, templates=templates, subjects=subjects)


def load_protocol(root: str | Path, target: Target, check_images: bool = True) -> Protocol:
    """Read and check one benchmark; `check_images` also checks that every listed image file exists."""
    root = Path(root)
    if target not in TARGETS:
        raise IJBFormatError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    paths = meta_paths(root, target)
    for key in ("faces", "landmarks", "pairs"):
        if not paths[key].is_file():
            raise IJBFormatError(f"{paths[key]}: file not found (expected the insightface IJB layout under {root})")
    image_dir = root / "loose_crop"
    if not image_dir.is_dir():
        raise IJBFormatError(f"{image_dir}: image folder not found")

    names, templates, medias = _read_face_list(paths["faces"])
    lmk_names, landmarks, det_scores, lines = _read_landmarks(paths["landmarks"])
    if len(lmk_names) != len(names):
        raise IJBFormatError(
            f"{paths['landmarks']}: lists {len(lmk_names)} faces but {paths['faces']} lists {len(names)}"
        )
    for index, (name, lmk_name) in enumerate(zip(names, lmk_names, strict=True)):
        if name != lmk_name:
            raise IJBFormatError(
                f"{paths['landmarks']}:{lines[index]}: image {lmk_name!r}, but face {index + 1} of {paths['faces']} is "
                f"{name!r} (both files must list the same faces in the same order)"
            )
    if check_images:
        for name, line in zip(names, lines, strict=True):
            if not (image_dir / name).is_file():
                raise IJBFormatError(f"{paths['landmarks']}:{line}: image {image_dir / name} not found")
    faces = Faces(names, landmarks, det_scores, templates, medias, lines)

    pairs = _read_pairs(paths["pairs"])
    known = np.unique(templates)
    for column in (pairs.template1, pairs.template2):
        unknown = np.flatnonzero(~np.isin(column, known))
        if len(unknown):
            row = int(unknown[0])
            raise IJBFormatError(
                f"{paths['pairs']}:{_line_of_row(paths['pairs'], row)}: template {column[row]} has no faces in "
                f"{paths['faces']}"
            )

    one_to_n = [paths["gallery1"], paths["gallery2"], paths["probes"]]
    present = [path.is_file() for path in one_to_n]
    galleries: tuple[TemplateSet, ...] = ()
    probes: TemplateSet | None = None
    if all(present):
        first, second = GALLERY_NAMES[target]
        galleries = (
            _read_template_set(paths["gallery1"], first, known),
            _read_template_set(paths["gallery2"], second, known),
        )
        probes = _read_template_set(paths["probes"], "probes", known)
    elif any(present):
        missing = [str(path) for path, there in zip(one_to_n, present, strict=True) if not there]
        raise IJBFormatError(f"{missing[0]}: file not found (1:N needs both galleries and the probe file)")
    else:
        logger.info("no 1:N files under %s: identification is skipped", root / "meta")
    return Protocol(target, root, image_dir, faces, pairs, galleries, probes)
