"""Face embeddings from a trained model: a folder, a file list, a `.rec` or a `.bin` of face images.

    python -m evaluation.embed --model runs/default/model.safetensors faces/ --out faces.safetensors
    python -m evaluation.embed --model model.onnx photos.txt --landmarks landmarks.csv --flip --out photos.npy

Input (one positional argument): a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff files;
names are paths relative to it), a text file list (one image path per line, relative to the list's folder; blank
lines and `#` comments skipped; names as written), a `.rec` with its `.idx` (names `<file>#<key>`), a verification
`.bin` (names `<file>#<index>`) or one image file. Images are either aligned 112x112 crops, or are aligned here with
`--landmarks` (5 points per image, mapped onto insightface's ArcFace template as in the IJB evaluation):

* CSV: `name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5` per line (an optional header line), points in pixels in the order
  left eye, right eye, nose tip, left mouth corner, right mouth corner (left/right as seen in the image);
* JSON: `{"name": [[x1, y1], ..., [x5, y5]], ...}` (or 10 numbers per name).

Every image needs an entry (names as above); entries for other names are ignored.

Output (`--out`): `.safetensors` (tensors `embeddings` (N, D) float32 and `norms` (N,), metadata `names` as a JSON
list, the model, flip and the model's calibration) or `.npy` (the array) plus `<stem>.names.txt` (one name per line,
in row order) and `<stem>.norms.npy`. `norms` is each face's embedding norm before normalization (with `--flip` the
mean of the image's and its mirror's), a quality signal: `--min-norm X` leaves out the faces below X, each logged
with its name and norm. The model's input expectations (its card, `evaluation.card`) are printed at start.
Embeddings are L2-normalized, so the dot product of two rows is their cosine similarity; `--flip` embeds each image
and its mirror image and sums the two before normalizing (default: as the model's calibration, else off). An image
that cannot be read, decoded or aligned is reported by name and skipped; it is not in the output. A model whose
embeddings are not finite (NaN or infinite) is refused: nothing is written.

Writing (`write_together`; the names, the norms, then the array): every file is written in full to a temporary
file beside it first; a failure there (a full disk, a file-size limit, a folder that takes no files) removes the
temporaries and leaves the old output as it was. Then the old files are moved aside (the array first), the new
ones renamed in (the array last) and the old ones deleted; a failed rename puts the old files back. The array is
the file that completes the output: at no moment is there an array beside a names file of another run (a run killed
in the middle can leave a names file without its array, and hidden `.<name>.*.tmp` files). The output folder is
checked to take files before any work.

Python: `FaceEmbedder.from_file("model.safetensors").embed([array_or_path, ...])`. The input normalization and
the flip are `data.dataset.normalize_images`, the one the trainer and the verification use.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.dataset import normalize_images
from evaluation.alignment import ALIGNED_SIZE, align_face
from evaluation.calibration import Calibration, read_calibration, resolve_flip
from evaluation.card import print_input_line
from models.cli import OutputError, atomic_output, file_mode, output_folder, report_input_error, setup_logging
from models.errors import InputError

if TYPE_CHECKING:
    from rich.progress import Progress

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
OUTPUT_SUFFIXES = (".safetensors", ".npy")
NUM_LANDMARKS = 5

Image = np.ndarray | str | Path


class EmbedError(InputError):
    """An input, landmarks file, model or output path that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# The model


def resolve_device(name: str | None) -> torch.device:
    """`--device`: cuda when available unless named; a device this machine lacks is an `EmbedError`."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EmbedError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(f"--device {name}: this machine has no CUDA device")
    return device


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


class FaceEmbedder:
    """A backbone (safetensors through `models.weights.load_backbone`, or ONNX through onnxruntime) that turns
    uint8 RGB face crops into L2-normalized embeddings; `calibration` is the threshold stored in the model file."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        path: Path,
        metadata: dict[str, str],
        device: torch.device,
    ) -> None:
        self.forward, self.path, self.metadata, self.device = forward, path, metadata, device
        self.calibration: Calibration | None = read_calibration(metadata, path)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        network: str | None = None,
        embedding_size: int | None = None,
    ) -> FaceEmbedder:
        """Load a `model.safetensors` (or a run folder holding one) or a `.onnx` model onto `device`."""
        path, device = Path(path), torch.device(device)
        if path.suffix == ".onnx":
            from evaluation.ijb import load_onnx_embedder

            forward, _ = load_onnx_embedder(path, device)  # a missing or unusable file: WeightsError, an InputError
            return cls(forward, path, _onnx_metadata(path), device)
        from models.weights import load_backbone, resolve_weights_path

        # A damaged checkpoint model or non-finite weights are refused here (models.weights), for every tool.
        backbone, metadata = load_backbone(path, network, embedding_size, device)
        return cls(backbone.eval(), resolve_weights_path(path, verify=False), metadata, device)

    def embed_tensor(
        self, images: torch.Tensor, flip: bool = False, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embeddings (N, D) float32, L2-normalized, of uint8 RGB crops `(N, 3, 112, 112)`."""
        chunks = []
        with _progress(enabled=progress) as bar:
            task = bar.add_task("embed", total=len(images))
            for start in range(0, len(images), batch_size):
                chunks.append(self.embed_batch(images[start : start + batch_size], flip))
                bar.advance(task, len(chunks[-1]))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def embed_batch(self, images: torch.Tensor, flip: bool) -> np.ndarray:
        """One forward of uint8 `(B, 3, 112, 112)` crops (2B with `flip`: each image and its mirror, summed).
        Non-finite embeddings are an `EmbedError` naming the model: no score is made of them."""
        return self.embed_batch_norms(images, flip)[0]

    def embed_batch_norms(self, images: torch.Tensor, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """`embed_batch` and each face's norm before normalization (B,): the L2 norm of its embedding, with `flip`
        the mean of the image's and its mirror image's (so the two settings give comparable norms). The norm is a
        quality signal: blurred, tiny or non-face crops get small ones (MagFace, AdaFace)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, 112, 112):
            raise ValueError(f"need uint8 (B, 3, 112, 112) crops, got {images.dtype} {tuple(images.shape)}")
        count = len(images)
        images = images.to(self.device)
        flips = None
        if flip:
            # One batch of the images and their mirror images: eval-mode layers treat every sample on its own.
            images = torch.cat([images, images])
            flips = torch.arange(2 * count, device=self.device) >= count
        with torch.inference_mode():
            out = self.forward(normalize_images(images, flips=flips)).float()
            if not bool(torch.isfinite(out).all()):
                # normalize() would turn them into NaN cosines, which compare and calibrate cannot tell from scores.
                raise EmbedError(
                    f"{self.path}: the model's embeddings are not finite (NaN or infinite): a diverged or damaged "
                    "model, refused"
                )
            norms = out.norm(dim=1)
            if flip:
                norms = (norms[:count] + norms[count:]) / 2
                out = out[:count] + out[count:]
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy(), norms.cpu().numpy()

    def embed(
        self,
        images: Sequence[Image],
        landmarks: Sequence[np.ndarray] | None = None,
        flip: bool | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Embeddings (N, D) float32, L2-normalized, of uint8 `(H, W, 3)` RGB arrays or image files; aligned
        112x112 crops, or any size with `landmarks` (one `(5, 2)` array of x, y per image). An image that cannot be
        used raises `EmbedError` naming it (the CLI skips such images instead).

        `flip`: sum each image's and its mirror image's embedding. None (the default) follows the model's
        calibration, as the CLIs do, so that its threshold holds; an explicit value that differs from the
        calibration's is used, with a warning."""
        flip = resolve_flip(flip, self.calibration)
        return self.embed_tensor(crop_images(images, landmarks), flip, batch_size)


# --------------------------------------------------------------------------------------------------------------
# Images


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 `(H, W, 3)` RGB; `EmbedError` naming the file if it is missing or not an image."""
    from data.recordio import decode_image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EmbedError(f"{path}: no such file") from None
    except OSError as err:
        raise EmbedError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return decode_image(data)
    except Exception as err:  # simplejpeg and Pillow raise many types on a file that is not an image
        raise EmbedError(f"{path}: not a readable image ({err})") from None


def prepare_crop(image: np.ndarray, landmarks: np.ndarray | None, name: str) -> np.ndarray:
    """The 112x112 uint8 RGB crop of `image`: aligned with `landmarks`, else the image itself if it is one."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise EmbedError(f"{name}: need a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    if landmarks is not None:
        try:
            return align_face(image, np.asarray(landmarks, dtype=np.float64).reshape(NUM_LANDMARKS, 2))
        except ValueError as err:
            raise EmbedError(f"{name}: cannot be aligned ({err})") from None
    if image.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise EmbedError(
            f"{name}: is {image.shape[1]}x{image.shape[0]}, not an aligned {ALIGNED_SIZE}x{ALIGNED_SIZE} crop "
            "(give --landmarks to align it)"
        )
    return image


def crop_images(images: Sequence[Image], landmarks: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """uint8 `(N, 3, 112, 112)` crops of RGB arrays or image files (`prepare_crop` each; `EmbedError` naming the
    first that cannot be used)."""
    if landmarks is not None and len(landmarks) != len(images):
        raise ValueError(f"{len(landmarks)} landmark sets for {len(images)} images")
    crops = np.empty((len(images), ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    for index, image in enumerate(images):
        name = str(image) if isinstance(image, str | Path) else f"image {index}"
        pixels = read_image(Path(image)) if isinstance(image, str | Path) else image
        crops[index] = prepare_crop(pixels, None if landmarks is None else landmarks[index], name)
    return torch.from_numpy(crops).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class FaceImage:
    """One input image: its name in the output and how to get its pixels (decoding may fail: `EmbedError`)."""

    name: str
    load: Callable[[], np.ndarray]


def _file_image(path: Path, name: str) -> FaceImage:
    return FaceImage(name, lambda: read_image(path))


def list_images(source: Path) -> list[FaceImage]:
    """The images of a folder, a file list, a `.rec`, a `.bin` or one image file (module docstring), in a fixed
    order (sorted paths, list order, key order, pair order)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise EmbedError(f"{source}: a folder without image files ({suffixes})")
        return [_file_image(p, p.relative_to(source).as_posix()) for p in files]
    if not source.exists():
        raise EmbedError(f"{source}: no such file or folder")
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [_file_image(source, source.name)]
    if suffix == ".rec":
        return _rec_images(source)
    if suffix == ".bin":
        return _bin_images(source)
    return _listed_images(source)


def _listed_images(path: Path) -> list[FaceImage]:
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        raise EmbedError(
            f"{path}: neither a folder, an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a .rec, a .bin nor a text "
            "file list"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EmbedError(f"{path}: a file list must be UTF-8 text (one image path per line)") from None
    images = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            images.append(_file_image(path.parent / entry, entry))
    if not images:
        raise EmbedError(f"{path}: a file list without any image path")
    return images


def _rec_images(path: Path) -> list[FaceImage]:
    from data.recordio import RecordIOError, RecordReader, decode_image, read_insightface_layout

    try:
        reader = RecordReader(path, path.with_suffix(".idx"))
        keys = read_insightface_layout(reader, with_identity_ranges=False).image_keys
    except RecordIOError as err:
        raise EmbedError(str(err)) from None

    def load(key: int) -> np.ndarray:
        try:
            return decode_image(reader.read_record(key)[1])
        except Exception as err:  # framing errors and decoder errors alike: this record is skipped
            raise EmbedError(f"{path.name}#{key}: {err}") from None

    return [FaceImage(f"{path.name}#{int(key)}", functools.partial(load, int(key))) for key in keys]


def _bin_images(path: Path) -> list[FaceImage]:
    from evaluation.verification import BinFormatError, load_bin

    try:
        images, _ = load_bin(path)
    except BinFormatError as err:
        raise EmbedError(str(err)) from None
    arrays = images.permute(0, 2, 3, 1).numpy()
    return [
        FaceImage(f"{path.name}#{index}", functools.partial(arrays.__getitem__, index)) for index in range(len(arrays))
    ]


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """`name -> (5, 2)` float64 landmarks from a CSV or JSON file (module docstring); errors name file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbedError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedError(f"{path}: not a readable landmarks file ({err})") from None
    if path.suffix.lower() == ".json":
        return _json_landmarks(path, text)
    landmarks: dict[str, np.ndarray] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 1 + 2 * NUM_LANDMARKS:
            raise EmbedError(
                f"{path}:{number}: expected a name and 10 numbers (name,x1,y1,...,x5,y5), got {len(row)} fields"
            )
        try:
            values = np.array([float(v) for v in row[1:]], dtype=np.float64)
        except ValueError:
            if number == 1 or not landmarks:
                continue  # a header line
            raise EmbedError(f"{path}:{number}: the 10 coordinates must be numbers, got {row[1:]}") from None
        landmarks[row[0].strip()] = values.reshape(NUM_LANDMARKS, 2)
    if not landmarks:
        raise EmbedError(f"{path}: no landmarks")
    return landmarks


def _json_landmarks(path: Path, text: str) -> dict[str, np.ndarray]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise EmbedError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise EmbedError(f"{path}: expected a JSON object mapping image names to 5 [x, y] points")
    landmarks = {}
    for name, points in raw.items():
        try:
            values = np.asarray(points, dtype=np.float64)
        except (ValueError, TypeError):
            values = np.zeros(0)
        if values.size != 2 * NUM_LANDMARKS:
            raise EmbedError(f"{path}: entry {name!r} must be 5 [x, y] points, got {points!r}")
        landmarks[str(name)] = values.reshape(NUM_LANDMARKS, 2)
    return landmarks


def match_landmarks(images: Sequence[FaceImage], landmarks: dict[str, np.ndarray], path: Path) -> list[np.ndarray]:
    """The landmarks of each image, in order; `EmbedError` when any image has none."""
    missing = [image.name for image in images if image.name not in landmarks]
    if missing:
        example = ", ".join(repr(name) for name in sorted(landmarks)[:2])
        raise EmbedError(
            f"{path} has no landmarks for {len(missing)} of the {len(images)} images (first: {missing[0]!r}; "
            f"its names look like {example})"
        )
    unused = len(landmarks) - len({image.name for image in images})
    if unused > 0:
        logger.info("%s: %d entries name no input image (ignored)", path, unused)
    return [landmarks[image.name] for image in images]


@dataclass(frozen=True)
class LabelledPair:
    """One line of a pair list: two image paths and the label, if the line has one."""

    first: str
    second: str
    same: bool | None  # None: the line has no label
    line: int


def read_pair_list(path: Path, need_labels: bool) -> list[LabelledPair]:
    """`path1 path2 [label]` lines (label 1/0, also true/false or same/different); `#` comments and blank lines
    skipped: the pair list of compare and calibrate, and `data.tools build-bin`'s format. A label is required when
    `need_labels`, else optional (`same` is None without one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbedError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedError(f"{path}: not a readable text pair list ({err})") from None
    truth = {"1": True, "0": False, "true": True, "false": False, "same": True, "different": False}
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (2, 3) or (need_labels and len(fields) != 3):
            want = "path1 path2 label" if need_labels else "path1 path2 [label]"
            raise EmbedError(f"{path}:{number}: expected '{want}', got {raw.strip()!r}")
        if len(fields) == 3 and fields[2].lower() not in truth:
            raise EmbedError(f"{path}:{number}: label {fields[2]!r} is not 1/0 (same/different)")
        same = truth[fields[2].lower()] if len(fields) == 3 else None
        pairs.append(LabelledPair(fields[0], fields[1], same, number))
    if not pairs:
        raise EmbedError(f"{path}: no pairs")
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Batches: decode and align in threads (the decoders release the GIL), embed in the calling thread


def _progress(enabled: bool) -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]embed"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        # Only on a terminal: into a log or a pipe it would leave a blank line before an error's one line.
        disable=not enabled or not console.is_terminal,
        transient=True,
    )


def iter_embeddings(
    embedder: FaceEmbedder,
    images: Sequence[FaceImage],
    landmarks: Sequence[np.ndarray] | None,
    flip: bool,
    batch_size: int,
    workers: int,
    progress: bool = True,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[tuple[str, str]]]]:
    """Per batch: (indices of the images embedded, their embeddings, their norms before normalization, (name,
    reason) of the images skipped)."""

    def crop(index: int) -> np.ndarray | str:
        image = images[index]
        try:
            return prepare_crop(image.load(), None if landmarks is None else landmarks[index], image.name)
        except EmbedError as err:
            return str(err)

    with ThreadPoolExecutor(max(1, workers)) as pool, _progress(progress) as bar:
        task = bar.add_task("embed", total=len(images))
        for start in range(0, len(images), batch_size):
            indices = list(range(start, min(start + batch_size, len(images))))
            kept, crops, skipped = [], [], []
            for index, result in zip(indices, pool.map(crop, indices), strict=True):
                if isinstance(result, str):
                    skipped.append((images[index].name, result))
                else:
                    kept.append(index)
                    crops.append(result)
            embeddings, norms = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
            if crops:
                batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
                embeddings, norms = embedder.embed_batch_norms(batch, flip)
            bar.advance(task, len(indices))
            yield kept, embeddings, norms, skipped


def embed_images(
    embedder: FaceEmbedder,
    images: Sequence[FaceImage],
    landmarks: Sequence[np.ndarray] | None = None,
    flip: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(names embedded, their embeddings (N, D), (name, reason) skipped); a skipped image is logged by name."""
    names, embeddings, _, skipped = embed_with_norms(embedder, images, landmarks, flip, batch_size, workers, progress)
    return names, embeddings, skipped


def embed_with_norms(
    embedder: FaceEmbedder,
    images: Sequence[FaceImage],
    landmarks: Sequence[np.ndarray] | None = None,
    flip: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """`embed_images` and each embedded face's norm before normalization (`FaceEmbedder.embed_batch_norms`)."""
    names: list[str] = []
    chunks: list[np.ndarray] = []
    norm_chunks: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for kept, embeddings, norms, bad in iter_embeddings(
        embedder, images, landmarks, flip, batch_size, workers, progress
    ):
        names.extend(images[index].name for index in kept)
        if kept:
            chunks.append(embeddings)
            norm_chunks.append(norms)
        for _, reason in bad:
            logger.warning("skipped %s", reason)
        skipped.extend(bad)
    if not chunks:
        return names, np.zeros((0, 0), np.float32), np.zeros(0, np.float32), skipped
    return names, np.concatenate(chunks), np.concatenate(norm_chunks).astype(np.float32), skipped


def score_pairs(
    embedder: FaceEmbedder,
    pairs: Sequence[LabelledPair],
    image_root: Path,
    landmarks_path: Path | None,
    flip: bool,
    batch_size: int,
    workers: int = 4,
) -> tuple[list[float | None], list[tuple[str, str]]]:
    """Cosine score of each pair of image paths (relative to `image_root`), None where an image was skipped;
    each distinct image is embedded once."""
    names = list(dict.fromkeys(name for pair in pairs for name in (pair.first, pair.second)))
    images = [_file_image(image_root / name, name) for name in names]
    landmarks = None
    if landmarks_path is not None:
        landmarks = match_landmarks(images, read_landmarks(landmarks_path), landmarks_path)
    embedded, embeddings, skipped = embed_images(embedder, images, landmarks, flip, batch_size, workers)
    row = {name: index for index, name in enumerate(embedded)}
    scores: list[float | None] = []
    for pair in pairs:
        if pair.first in row and pair.second in row:
            scores.append(float(embeddings[row[pair.first]] @ embeddings[row[pair.second]]))
        else:
            scores.append(None)
    return scores, skipped


# --------------------------------------------------------------------------------------------------------------
# Output


def check_output(out: Path) -> None:
    """Before any work: the output's suffix must be known and its folder must take new files."""
    if out.suffix not in OUTPUT_SUFFIXES:
        raise EmbedError(f"--out {out}: must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if out.is_dir():
        raise EmbedError(f"--out {out}: is a folder")
    check_writable_folder(out)


def names_path(out: Path) -> Path:
    """`emb.npy` -> `emb.names.txt`."""
    return out.with_name(f"{out.stem}.names.txt")


def norms_path(out: Path) -> Path:
    """`emb.npy` -> `emb.norms.npy`."""
    return out.with_name(f"{out.stem}.norms.npy")


def _npy_bytes(array: np.ndarray) -> bytes:
    # Through memory and Python's write: np.save into a file writes the data with C stdio, which loses a failed
    # write (a file-size limit leaves a truncated array and no error).
    buffer = io.BytesIO()
    np.save(buffer, array)
    return bytes(buffer.getbuffer())


def write_embeddings(
    out: Path,
    names: Sequence[str],
    embeddings: np.ndarray,
    metadata: dict[str, str],
    norms: np.ndarray | None = None,
) -> list[Path]:
    """Write the output: `.safetensors` atomically (tensors `embeddings` and, when given, `norms`), or `.npy`, its
    names file and `<stem>.norms.npy` together or not at all (`write_together`); returns the files written. A failed
    write is an `OutputError` naming the file."""
    from safetensors.numpy import save

    check_output(out)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if norms is not None and len(norms) != len(embeddings):
        raise ValueError(f"{len(norms)} norms for {len(embeddings)} embeddings")
    if out.suffix == ".safetensors":
        header = {**metadata, "names": json.dumps(list(names))}
        tensors = {"embeddings": embeddings}
        if norms is not None:
            tensors["norms"] = np.ascontiguousarray(norms, dtype=np.float32)
        # Serialized here and written by Python: a failed write is an OSError naming its reason (safetensors' own
        # writer reports it as a SafetensorError), which atomic_output turns into an OutputError.
        data = save(tensors, header)
        with atomic_output(out) as tmp:
            tmp.write_bytes(data)
        return [out]
    listing = names_path(out)
    if any("\n" in name or "\r" in name for name in names):
        raise EmbedError(f"--out {out}: a name contains a line break; write .safetensors instead")

    files: list[tuple[Path, Callable[[Path], Any]]] = [
        (listing, lambda p: p.write_text("".join(f"{n}\n" for n in names)))
    ]
    if norms is not None:
        norm_bytes = _npy_bytes(np.ascontiguousarray(norms, dtype=np.float32))
        files.append((norms_path(out), lambda p: p.write_bytes(norm_bytes)))
    array_bytes = _npy_bytes(embeddings)
    # The array last: it is what makes the output complete (module docstring).
    files.append((out, lambda p: p.write_bytes(array_bytes)))
    write_together(files)
    return [out, listing] + ([norms_path(out)] if norms is not None else [])


def write_together(files: Sequence[tuple[Path, Callable[[Path], Any]]]) -> None:
    """Write several files as one output: all of them, or none and the old ones kept (module docstring).

    `files`: `(path, write)` pairs, `write(tmp)` filling a temporary file beside `path`. Every file is written in
    full first; then the old files are moved aside in reverse order and the new ones renamed in, in order, so the last
    file completes the output (a reader that finds it finds the others of the same write). Each new file keeps the
    mode of the one it replaces. A failure is an `OutputError` naming the file.
    """
    staged: list[tuple[Path, Path]] = []  # (temporary, final): every new file, written in full
    aside: list[tuple[Path, Path]] = []  # (old file moved aside, final)
    placed: list[Path] = []
    current = files[0][0] if files else Path()
    try:
        try:
            for final, write in files:
                current = final
                if final.is_dir() and not final.is_symlink():
                    raise OutputError(f"{final}: is a folder, expected a file path")
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = _temporary(final)
                staged.append((tmp, final))
                write(tmp)
                keep = final.is_file() and not final.is_symlink()
                os.chmod(tmp, stat.S_IMODE(final.stat().st_mode) if keep else file_mode())
            # Renames within a folder need no space: a failure past this point is all but impossible, and undone.
            for _, final in reversed(staged):
                current = final
                if final.exists() or final.is_symlink():
                    old = _temporary(final, "old")
                    os.replace(final, old)
                    aside.append((old, final))
            for tmp, final in staged:
                current = final
                os.replace(tmp, final)
                placed.append(final)
        except BaseException:
            for final in placed:
                _quietly(final.unlink, missing_ok=True)
            for old, final in reversed(aside):
                _quietly(os.replace, old, final)
            aside.clear()
            raise
    except OSError as err:
        raise OutputError(f"{current}: cannot be written ({err.strerror or err})") from None
    finally:
        for tmp, _ in staged:
            _quietly(tmp.unlink, missing_ok=True)
        for old, _ in aside:
            _quietly(old.unlink, missing_ok=True)


def _temporary(path: Path, tag: str = "new") -> Path:
    """A new, unique, empty file beside `path` (`O_EXCL`: a link planted there is never written through)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}-", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _quietly(action: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Clean-up that must not hide the error being reported (a folder gone, a file already removed)."""
    try:
        action(*args, **kwargs)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------------------
# CLI helpers shared by embed, compare and calibrate


def check_writable_folder(path: Path) -> None:
    """Before any work: the folder of the output file `path` exists (created if needed) and takes a new file, tried
    with a real one (permissions alone do not tell: root, a read-only mount, /proc). An `OutputError` naming it."""
    folder = output_folder(path.parent)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as err:
        raise OutputError(f"{path}: cannot be written in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(name)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.embed", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("input", type=Path, help="a folder, a file list, a .rec, a .bin or an image")
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors (or a run folder) or .onnx")
    parser.add_argument("--out", type=Path, required=True, help="embeddings file: .safetensors, or .npy + .names.txt")
    parser.add_argument("--landmarks", type=Path, help="5-point landmarks per image (CSV or JSON) to align them")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sum each image's and its mirror's embedding (default: as the model's calibration, else off)",
    )
    parser.add_argument(
        "--min-norm",
        type=float,
        help="leave out faces whose embedding norm before normalization is below this (a quality threshold); "
        "each is logged with its name and norm",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--network", help="backbone name for a file without metadata")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        parser.error("--batch-size and --workers must be at least 1")
    return args


def _run(args: argparse.Namespace) -> int:
    check_output(args.out)
    images = list_images(args.input)
    landmarks = None
    if args.landmarks is not None:
        landmarks = match_landmarks(images, read_landmarks(args.landmarks), args.landmarks)
    embedder = FaceEmbedder.from_file(args.model, device=resolve_device(args.device), network=args.network)
    print_input_line(embedder.metadata)
    flip = resolve_flip(args.flip, embedder.calibration)
    names, embeddings, norms, skipped = embed_with_norms(
        embedder, images, landmarks, flip, args.batch_size, args.workers, progress=True
    )
    if not names:
        raise EmbedError(f"{args.input}: none of its {len(images)} images could be embedded; nothing written")
    dropped = 0
    if args.min_norm is not None:
        keep = norms >= args.min_norm
        for index in np.flatnonzero(~keep):
            logger.warning("left out %s: norm %.4f below --min-norm %g", names[index], norms[index], args.min_norm)
        dropped = int((~keep).sum())
        names = [name for name, kept in zip(names, keep, strict=True) if kept]
        embeddings, norms = embeddings[keep], norms[keep]
        if not names:
            raise EmbedError(f"{args.input}: every face's norm is below --min-norm {args.min_norm:g}; nothing written")
    metadata = {
        "model": str(embedder.path),
        "flip": str(flip).lower(),
        "normalized": "true",
        "norms": "L2 norm of each embedding before normalization (with flip: the mean of image and mirror)",
    }
    if args.min_norm is not None:
        metadata["min_norm"] = f"{args.min_norm:g}"
    if embedder.calibration is not None:
        metadata["calibration"] = embedder.calibration.to_json()
    written = write_embeddings(args.out, names, embeddings, metadata, norms=norms)
    threshold = "" if embedder.calibration is None else f"; calibrated threshold {embedder.calibration.threshold:.4f}"
    logger.info(
        "%d embeddings (%d-d%s) -> %s; %d images skipped%s%s",
        len(names),
        embeddings.shape[1],
        ", flip-summed" if flip else "",
        ", ".join(map(str, written)),
        len(skipped),
        f", {dropped} below --min-norm" if args.min_norm is not None else "",
        threshold,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m evaluation.embed` CLI; returns the exit status (2 for bad input)."""
    args = _parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except InputError as err:
        return report_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
