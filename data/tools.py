"""Dataset tools: ``python -m data.tools {pack,shuffle,build-bin,extract,inspect,scan} ...`` (``--help`` on each).

* ``pack IMAGE_DIR OUT_DIR``: an image folder (``IMAGE_DIR/<identity>/<image>``, the layout of
  :mod:`data.image_folder`, same labels) into insightface-layout ``train.rec``/``train.idx`` + ``property``, and
  ``identities.txt`` (``label<TAB>folder``). JPEG files are stored byte for byte, others re-encoded as JPEG.
  Every image is decoded first: unreadable ones and ones that are not 112x112 are skipped with a warning.
* ``shuffle IN_DIR OUT_DIR``: the images of a ``.rec`` rewritten in a random order, for sequential readers
  (DALI's ``readers.mxnet``, MXNet's ``ImageRecordIter``) that only shuffle within a buffer. An insightface layout
  cannot survive this: its identity records give each identity a *contiguous* key range, which shuffled records no
  longer have. So the output is the plain ``im2rec`` layout, the one those readers expect: keys ``0 .. N-1`` in file
  order, every record an image with a flag-0 header (a float label; array labels are reduced to their class), the
  original key kept in the header's ``id2``, and ``property`` for the class count. ``RecordFaceDataset`` reads both.
* ``build-bin PAIRS_TXT IMAGE_ROOT OUT.bin``: a verification ``.bin`` (pickled ``(list of encoded images, list of
  bool)``, protocol 4, pair ``i`` = images ``2i``, ``2i+1``) from a pairs list. Lines are ``path1 path2 0|1``
  (paths relative to ``IMAGE_ROOT``, 1 = same identity; blank lines and ``#`` comments skipped), or LFW's
  ``pairs.txt`` (first line ``folds pairs`` or ``pairs``, then ``name i j`` / ``name1 i name2 j`` meaning
  ``IMAGE_ROOT/name/name_000i.jpg``). Images are stored byte for byte after a decode check. Fewer than 10 pairs
  (verification's 10 folds) is written with a warning: verification refuses such a file.
* ``extract SRC OUT_DIR``: the images of a dataset as files, to look at them or to feed the tools that take image
  folders. SRC a ``.rec`` (a folder holding ``train.rec``/``train.idx``, or a ``.rec`` with its ``.idx``):
  ``OUT_DIR/<label>/<key>.jpg`` (the stored bytes; a non-JPEG record is re-encoded as JPEG) and ``OUT_DIR/labels.csv``
  (``path,label``): the layout of ``pack`` and of an ``image_folder`` source; the label folders are zero-padded to one
  width (``007``), so their sorted order is the label order and ``pack`` of the output gives the same labels back.
  SRC a verification ``.bin``: ``OUT_DIR/<i:05d>.jpg`` (image ``i``; pair ``p`` is images ``2p`` and ``2p+1``) and
  ``OUT_DIR/pairs.txt`` (``path1 path2 0|1``, ``build-bin``'s format and that of ``evaluation.compare --pairs``, so
  ``build-bin OUT_DIR/pairs.txt OUT_DIR x.bin`` gives the same ``.bin`` back). OUT_DIR must not exist
  or be empty; it is written in a temporary folder beside it and renamed into place, so a failure leaves nothing.
  Unreadable records are skipped with a warning (a ``.bin`` with one is refused: its pairs would be broken).
* ``inspect REC_DIR``: files, layout, images, identities, headers; ``--grid out.png`` writes a grid of samples.
* ``scan REC_DIR``: reads and decodes every image record, lists the unusable ones (key, byte offset, reason);
  exit status 1 if there are any.

Bad input, and an output that cannot be written (a full disk, a file-size limit, a path that is a folder), prints
one line naming the file and exits with status 2; no half-written output is left behind.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from data.dataset import IMAGE_SIZE, BadSampleError, RecordFaceDataset, decode_face
from data.image_folder import list_image_folder
from data.recordio import (
    IRHeader,
    RecordIOError,
    RecordWriter,
    decode_image,
    pack,
    read_insightface_layout,
    write_insightface_layout,
    write_property_file,
)
from models.cli import OutputError, atomic_output, output_folder, report_input_error
from models.errors import InputError

logger = logging.getLogger(__name__)

console = Console(soft_wrap=True)
# The folds of the verification protocol (evaluation.verification.NUM_FOLDS; data may not import evaluation, a test
# checks the two agree): a .bin with fewer pairs is refused by verification.
VERIFICATION_FOLDS = 10
error_console = Console(stderr=True, soft_wrap=True)

_T = TypeVar("_T")
_R = TypeVar("_R")
# Images handed to a pool worker at once: large enough to amortize the inter-process round trip.
_CHUNK = 64


class ToolError(InputError):
    """A user-facing failure: one line, naming the file."""


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=True,
        # A bar is for a person at a terminal; captured stderr gets only the errors (one line each).
        disable=not error_console.is_terminal,
    )


def _parallel_map(
    function: Callable[[_T], _R], items: Sequence[_T], workers: int, chunksize: int = _CHUNK
) -> Iterator[_R]:
    """``map`` in input order, over a pool of ``workers`` forked processes (in this process for 1)."""
    if workers <= 1:
        yield from map(function, items)
        return
    # fork: the workers inherit the module state (e.g. the dataset being scanned) instead of re-importing torch.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(function, items, chunksize=chunksize)


def _fresh_output(out_dir: Path, names: Iterable[str]) -> None:
    output_folder(out_dir)
    for name in names:
        if (out_dir / name).exists():
            raise ToolError(f"{out_dir / name} already exists; choose another output folder or delete it")


# ----------------------------------------------------------------------------------------------------------------
# pack


def _encode_for_pack(job: tuple[str, int]) -> tuple[bytes | None, str]:
    """``(bytes to store, "")`` for one image file, or ``(None, reason)`` when it is unusable."""
    path, quality = job
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, f"cannot read: {error.strerror or error}"
    try:
        image = decode_face(data)
    except BadSampleError as error:
        return None, str(error)
    if simplejpeg.is_jpeg(data):
        return data, ""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB"), ""


def cmd_pack(args: argparse.Namespace) -> int:
    image_dir, out_dir = Path(args.image_dir), Path(args.out_dir)
    if not 1 <= args.quality <= 100:
        raise ToolError(f"--quality must be in 1..100, got {args.quality}")
    identities, paths, labels = list_image_folder(image_dir)
    _fresh_output(out_dir, ("train.rec", "train.idx", "property", "identities.txt"))
    jobs = [(str(image_dir / path), args.quality) for path in paths]
    skipped: list[tuple[str, str]] = []

    def samples(progress: Progress) -> Iterator[tuple[int, bytes]]:
        task = progress.add_task("pack", total=len(jobs))
        expected = 0  # the next identity that must show up, so that no label is left without images
        results = _parallel_map(_encode_for_pack, jobs, args.workers)
        for (data, reason), path, label in zip(results, paths, labels.tolist(), strict=True):
            progress.advance(task)
            if data is None:
                logger.warning("%s: %s; skipped", image_dir / path, reason)
                skipped.append((path, reason))
                continue
            if label > expected:
                raise ToolError(_empty_identity(image_dir, identities[expected], skipped))
            expected = label + 1
            yield label, data
        if expected < len(identities):
            raise ToolError(_empty_identity(image_dir, identities[expected], skipped))

    rec, idx = out_dir / "train.rec", out_dir / "train.idx"
    try:
        with _progress() as progress:
            write_insightface_layout(rec, idx, samples(progress), out_dir / "property", (IMAGE_SIZE, IMAGE_SIZE))
        lines = "".join(f"{label}\t{name}\n" for label, name in enumerate(identities))
        with atomic_output(out_dir / "identities.txt") as tmp:
            tmp.write_text(lines, encoding="utf-8")
    except (InputError, OSError) as error:
        _remove(rec, idx, out_dir / "property", out_dir / "identities.txt")
        if isinstance(error, OSError):
            raise OutputError(f"{out_dir}: cannot write the packed dataset ({error.strerror or error})") from None
        raise
    console.print(
        f"packed {len(paths) - len(skipped)} images of {len(identities)} identities into {rec}"
        + (f" (skipped {len(skipped)} unusable images, listed above)" if skipped else ""),
        markup=False,
        highlight=False,
    )
    return 0


def _remove(*paths: Path) -> None:
    """Delete what a failed command had started to write: no half-written output stays behind."""
    for path in paths:
        path.unlink(missing_ok=True)


def _empty_identity(image_dir: Path, name: str, skipped: list[tuple[str, str]]) -> str:
    reasons = [reason for path, reason in skipped if path.startswith(f"{name}/")]
    first = f" (first: {reasons[0]})" if reasons else ""
    return f"{image_dir / name}: no usable image{first}; every identity needs at least one"


# ----------------------------------------------------------------------------------------------------------------
# shuffle


def cmd_shuffle(args: argparse.Namespace) -> int:
    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    dataset = RecordFaceDataset(in_dir, random_flip=False)
    if in_dir.resolve() == out_dir.resolve():
        raise ToolError(f"{out_dir}: the output folder must differ from the input folder")
    _fresh_output(out_dir, ("train.rec", "train.idx", "property"))
    order = np.random.default_rng(args.seed).permutation(len(dataset))
    rec, idx = out_dir / "train.rec", out_dir / "train.idx"
    try:
        with _progress() as progress, RecordWriter(rec, idx) as writer:
            task = progress.add_task("shuffle", total=len(order))
            for new_key, index in enumerate(order.tolist()):
                key = int(dataset.image_keys[index])
                header, payload = dataset.reader.unpack_idx(key)
                label = dataset._label(key, header, dataset.num_classes)
                # flag 0 and a float label: record 0 must read as an image, not as an insightface layout record.
                writer.write_idx(new_key, pack(IRHeader(0, float(label), new_key, key), payload))
                progress.advance(task)
        write_property_file(out_dir / "property", dataset.num_classes, (IMAGE_SIZE, IMAGE_SIZE))
    except RecordIOError as error:
        _remove(rec, idx, out_dir / "property")
        raise ToolError(f"{error}; `python -m data.tools scan {in_dir}` lists every broken record") from None
    except OSError as error:
        _remove(rec, idx, out_dir / "property")
        raise OutputError(f"{out_dir}: cannot write the shuffled dataset ({error.strerror or error})") from None
    console.print(
        f"wrote {len(order)} images in shuffled order (seed {args.seed}, plain im2rec layout) to {rec}",
        markup=False,
        highlight=False,
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
# build-bin


def _is_int(text: str) -> bool:
    return text.isdigit()


def read_pairs(pairs_path: Path, image_root: Path) -> list[tuple[Path, Path, bool, int]]:
    """``(image 1, image 2, same, line number)`` for every pair of a pairs file (module docstring formats)."""
    try:
        text = pairs_path.read_text(encoding="utf-8")
    except OSError as error:
        raise ToolError(f"{pairs_path}: cannot read ({error.strerror or error})") from None
    lines = [
        (number, line.split())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ToolError(f"{pairs_path}: no pairs")
    lfw = 1 <= len(lines[0][1]) <= 2 and all(_is_int(field) for field in lines[0][1])
    pairs = []
    for number, fields in lines[1:] if lfw else lines:
        where = f"{pairs_path}, line {number}"
        if lfw and len(fields) == 3 and _is_int(fields[1]) and _is_int(fields[2]):
            name = fields[0]
            pairs.append((_lfw_path(image_root, name, fields[1]), _lfw_path(image_root, name, fields[2]), True, number))
        elif lfw and len(fields) == 4 and _is_int(fields[1]) and _is_int(fields[3]):
            first, second = _lfw_path(image_root, fields[0], fields[1]), _lfw_path(image_root, fields[2], fields[3])
            pairs.append((first, second, False, number))
        elif not lfw and len(fields) == 3 and fields[2] in ("0", "1"):
            pairs.append((image_root / fields[0], image_root / fields[1], fields[2] == "1", number))
        else:
            expected = "'name i j' or 'name1 i name2 j' (LFW pairs.txt)" if lfw else "'path1 path2 0|1'"
            raise ToolError(f"{where}: malformed pair {' '.join(fields)!r}; expected {expected}")
    if not pairs:
        raise ToolError(f"{pairs_path}: no pairs")
    return pairs


def _lfw_path(image_root: Path, name: str, number: str) -> Path:
    return image_root / name / f"{name}_{int(number):04d}.jpg"


def cmd_build_bin(args: argparse.Namespace) -> int:
    pairs_path, image_root, out_path = Path(args.pairs), Path(args.image_root), Path(args.out)
    if not image_root.is_dir():
        raise ToolError(f"image root not found: {image_root}")
    pairs = read_pairs(pairs_path, image_root)
    cache: dict[Path, bytes] = {}  # LFW uses an image in several pairs: read and check it once
    other_size = 0
    bins: list[bytes] = []
    with _progress() as progress:
        task = progress.add_task("build-bin", total=len(pairs))
        for first, second, _, number in pairs:
            for path in (first, second):
                if path not in cache:
                    try:
                        data = path.read_bytes()
                        shape = decode_image(data).shape
                    except OSError as error:
                        raise ToolError(f"{pairs_path}, line {number}: {path}: {error.strerror or error}") from None
                    except RecordIOError as error:
                        raise ToolError(f"{pairs_path}, line {number}: {path}: {error}") from None
                    other_size += shape[:2] != (IMAGE_SIZE, IMAGE_SIZE)
                    cache[path] = data
                bins.append(cache[path])
            progress.advance(task)
    if other_size:
        logger.warning(
            "%d of %d images are not %dx%d: load_bin resizes them, but verification expects aligned face crops",
            other_size,
            len(cache),
            IMAGE_SIZE,
            IMAGE_SIZE,
        )
    if len(pairs) < VERIFICATION_FOLDS:
        logger.warning(
            "%s: %d pairs; verification (evaluation.verification, and training's eval.bins) needs at least %d, one per "
            "fold, and will refuse this file (embed and calibrate can still read it)",
            out_path,
            len(pairs),
            VERIFICATION_FOLDS,
        )
    with atomic_output(out_path) as tmp, open(tmp, "wb") as handle:
        pickle.dump((bins, [same for _, _, same, _ in pairs]), handle, protocol=4)
    same = sum(pair[2] for pair in pairs)
    console.print(
        f"wrote {len(pairs)} pairs ({same} same, {len(pairs) - same} different) to {out_path}",
        markup=False,
        highlight=False,
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
# extract


def _staging_folder(out_dir: Path) -> Path:
    """A new folder beside `out_dir` to write into, refused when `out_dir` is a file or holds anything."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ToolError(f"{out_dir}: exists and is not an empty folder; choose another output folder or delete it")
    output_folder(out_dir.parent)
    try:
        return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.extract-"))
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot be written ({error.strerror or error})") from None


def _publish_folder(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked before the work)
    os.replace(staging, out_dir)


def _jpeg_bytes(data: bytes) -> bytes:
    if simplejpeg.is_jpeg(data):
        return data
    return simplejpeg.encode_jpeg(np.ascontiguousarray(decode_image(data)), quality=95, colorspace="RGB")


def _extract_rec(src: Path, staging: Path) -> str:
    rec = src / "train.rec" if src.is_dir() else src
    from data.recordio import RecordReader

    reader = RecordReader(rec, rec.with_suffix(".idx"))
    layout = read_insightface_layout(reader, with_identity_ranges=False)
    written: list[tuple[int, int]] = []  # (label, key)
    skipped = 0
    with _progress() as progress:
        task = progress.add_task("extract", total=len(layout.image_keys))
        for key in (int(k) for k in layout.image_keys):
            progress.advance(task)
            try:
                header, payload = reader.read_record(key)
                data = _jpeg_bytes(payload)
            except RecordIOError as error:
                logger.warning("%s: key %d: %s; skipped", rec, key, error)
                skipped += 1
                continue
            value = header.label
            label = int(value if isinstance(value, float) else np.asarray(value, dtype=np.float64).reshape(-1)[0])
            (staging / str(label)).mkdir(exist_ok=True)
            (staging / str(label) / f"{key}.jpg").write_bytes(data)
            written.append((label, key))
    # Folder names padded to one width: their sorted order (an image folder's label order) is the labels' order.
    labels = sorted({label for label, _ in written})
    width = len(str(labels[-1])) if labels else 1
    for label in labels:
        os.replace(staging / str(label), staging / f"{label:0{width}d}")
    rows = [f"{label:0{width}d}/{key}.jpg,{label}\n" for label, key in written]
    (staging / "labels.csv").write_text("path,label\n" + "".join(rows), encoding="utf-8")
    return f"{len(rows)} images of {len(labels)} labels" + (
        f" ({skipped} unreadable records skipped)" if skipped else ""
    )


def _extract_bin(src: Path, staging: Path) -> str:
    from data.bin_file import BinFormatError, encoded_images

    try:
        images, issame = encoded_images(src)
    except BinFormatError as error:
        raise ToolError(str(error)) from None
    for index, data in enumerate(images):
        try:
            (staging / f"{index:05d}.jpg").write_bytes(_jpeg_bytes(data))
        except RecordIOError as error:
            raise ToolError(f"{src}: image {index} cannot be decoded ({error})") from None
    lines = [f"{2 * i:05d}.jpg {2 * i + 1:05d}.jpg {int(same)}\n" for i, same in enumerate(issame)]
    (staging / "pairs.txt").write_text("".join(lines), encoding="utf-8")
    same = sum(issame)
    return f"{len(images)} images, {len(issame)} pairs ({same} same, {len(issame) - same} different) in pairs.txt"


def cmd_extract(args: argparse.Namespace) -> int:
    src, out_dir = Path(args.src), Path(args.out_dir)
    if src.suffix == ".bin" and src.is_file():
        extract = _extract_bin
    elif (src.is_dir() and (src / "train.rec").is_file()) or (src.suffix == ".rec" and src.is_file()):
        extract = _extract_rec
    else:
        raise ToolError(f"{src}: neither a verification .bin, a .rec, nor a folder holding train.rec")
    staging = _staging_folder(out_dir)
    try:
        summary = extract(src, staging)
        _publish_folder(staging, out_dir)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot be written ({error.strerror or error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"extracted {summary} to {out_dir}", markup=False, highlight=False)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# inspect


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_inspect(args: argparse.Namespace) -> int:
    rec_dir = Path(args.rec_dir)
    dataset = RecordFaceDataset(rec_dir, random_flip=False)
    reader = dataset.reader
    layout = read_insightface_layout(reader)
    table = Table(title=str(rec_dir), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(".rec", f"{reader.rec_path} ({_size(reader.rec_path)})")
    table.add_row(".idx", f"{reader.idx_path} ({len(reader)} records)")
    if layout.identity_ranges is None:
        table.add_row("layout", "plain im2rec (every record an image)")
    else:
        header0 = reader.read_header(0)
        table.add_row("layout", f"insightface (record 0: flag {header0.flag}, label {np.asarray(header0.label)})")
        sizes = np.array([stop - start for start, stop in layout.identity_ranges])
        table.add_row("images per identity", f"min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}")
    table.add_row("images", str(len(dataset)))
    table.add_row("identities (classes)", str(dataset.num_classes))
    property_path = rec_dir / "property"
    table.add_row("property", property_path.read_text().strip() if property_path.is_file() else "(none)")
    first_key = int(dataset.image_keys[0])
    header, payload = reader.unpack_idx(first_key)
    table.add_row(
        "first image header",
        f"key {first_key}: flag {header.flag}, label {header.label}, id {header.id}, id2 {header.id2}",
    )
    kind = "JPEG" if simplejpeg.is_jpeg(payload) else "not JPEG"
    try:
        shape = decode_image(payload).shape
        table.add_row("first image", f"{kind}, {len(payload)} bytes, {shape[1]}x{shape[0]}")
    except RecordIOError as error:
        table.add_row("first image", f"{kind}, {len(payload)} bytes, undecodable: {error}")
    console.print(table)
    if args.grid:
        _write_grid(dataset, Path(args.grid), args.n)
        console.print(f"wrote a grid of {min(args.n, len(dataset))} samples to {args.grid}", markup=False)
    return 0


def _write_grid(dataset: RecordFaceDataset, path: Path, count: int) -> None:
    """``count`` samples spread evenly over the dataset, label in the corner; unusable ones in red."""
    if count < 1:
        raise ToolError(f"--n must be >= 1, got {count}")
    indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(np.int64))
    columns = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / columns)
    grid = Image.new("RGB", (columns * IMAGE_SIZE, rows * IMAGE_SIZE), "black")
    draw = ImageDraw.Draw(grid)
    for position, index in enumerate(indices.tolist()):
        x, y = (position % columns) * IMAGE_SIZE, (position // columns) * IMAGE_SIZE
        data, label = dataset.encoded(index) if dataset.check(index) is None else (b"", -1)
        if label >= 0:
            grid.paste(Image.fromarray(decode_face(data)), (x, y))
            draw.text((x + 2, y + 1), str(label), fill="yellow")
        else:
            draw.rectangle((x, y, x + IMAGE_SIZE - 1, y + IMAGE_SIZE - 1), fill="darkred")
            draw.text((x + 2, y + 1), f"bad key {dataset.sample_key(index)}", fill="white")
    with atomic_output(path) as tmp:
        grid.save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# scan

_SCANNED: RecordFaceDataset | None = None  # set before forking the pool: workers inherit it


class _ScannedDataset(RecordFaceDataset):
    """A `.rec` opened for scanning. The trainer refuses an `.idx` that disagrees with its `.rec` and sends the user
    here to list the broken records, so what it refuses at start is a warning here: an incomplete `.idx`, or one
    whose offsets cannot be counted (not a multiple of 4). Every listed record is then read and reported."""

    def _check_index_complete(self, allow_partial: bool) -> None:
        try:
            super()._check_index_complete(allow_partial=True)
        except RecordIOError as error:
            logger.warning("%s; listing every record the .idx points at", error)


def _scan_chunk(indices: np.ndarray) -> list[tuple[int, int, str]]:
    dataset = _SCANNED
    assert dataset is not None
    found = []
    for index in indices.tolist():
        try:
            reason = dataset.check(index)
        except RecordIOError as error:  # a label outside the classes: a hard error for training, reported here
            reason = str(error).split(": ", 1)[-1]
        if reason is not None:
            key = dataset.sample_key(index)
            found.append((key, dataset.reader.offset(key), reason))
    return found


def cmd_scan(args: argparse.Namespace) -> int:
    global _SCANNED
    rec_dir = Path(args.rec_dir)
    _SCANNED = dataset = _ScannedDataset(rec_dir, random_flip=False, spot_check=False)
    chunks = np.array_split(np.arange(len(dataset)), max(1, math.ceil(len(dataset) / 256)))
    bad: list[tuple[int, int, str]] = []
    try:
        with _progress() as progress:
            task = progress.add_task("scan", total=len(dataset))
            results = _parallel_map(_scan_chunk, chunks, args.workers, chunksize=1)  # chunks are the work units
            for chunk, found in zip(chunks, results, strict=True):
                bad.extend(found)
                progress.advance(task, len(chunk))
    finally:
        _SCANNED = None
    if not bad:
        console.print(f"{dataset.source}: all {len(dataset)} images decode", markup=False, highlight=False)
        return 0
    table = Table(title=f"{dataset.source}: {len(bad)} of {len(dataset)} images unusable")
    for column in ("key", "byte offset", "reason"):
        table.add_column(column)
    for key, offset, reason in bad:
        table.add_row(str(key), str(offset), reason)
    console.print(table)
    return 1


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.tools", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    workers = min(8, os.cpu_count() or 1)

    pack_parser = commands.add_parser("pack", help="pack an image folder into train.rec/train.idx")
    pack_parser.add_argument("image_dir", help="IMAGE_DIR/<identity>/<image>.jpg|.jpeg|.png")
    pack_parser.add_argument("out_dir", help="where train.rec, train.idx, property, identities.txt go")
    pack_parser.add_argument("--workers", type=int, default=workers, help=f"reading processes (default {workers})")
    pack_parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded non-JPEG images")
    pack_parser.set_defaults(run=cmd_pack)

    shuffle_parser = commands.add_parser("shuffle", help="rewrite a .rec with its images in random order")
    shuffle_parser.add_argument("in_dir", help="folder with train.rec/train.idx")
    shuffle_parser.add_argument("out_dir", help="where the shuffled train.rec/train.idx/property go")
    shuffle_parser.add_argument("--seed", type=int, default=0)
    shuffle_parser.set_defaults(run=cmd_shuffle)

    bin_parser = commands.add_parser("build-bin", help="build a verification .bin from a pairs list")
    bin_parser.add_argument("pairs", help="'path1 path2 0|1' lines, or LFW's pairs.txt")
    bin_parser.add_argument("image_root", help="folder the pairs' paths are relative to")
    bin_parser.add_argument("out", help="the .bin to write")
    bin_parser.set_defaults(run=cmd_build_bin)

    extract_parser = commands.add_parser("extract", help="a .rec or a .bin as an image folder (+ labels or pairs)")
    extract_parser.add_argument("src", help="a .bin, a .rec (with its .idx), or a folder holding train.rec")
    extract_parser.add_argument("out_dir", help="the folder to create (must not exist, or be empty)")
    extract_parser.set_defaults(run=cmd_extract)

    inspect_parser = commands.add_parser("inspect", help="describe a .rec; optionally write a grid of samples")
    inspect_parser.add_argument("rec_dir", help="folder with train.rec/train.idx")
    inspect_parser.add_argument("--grid", help="write a PNG grid of samples here")
    inspect_parser.add_argument("--n", type=int, default=64, help="samples in the grid (default 64)")
    inspect_parser.set_defaults(run=cmd_inspect)

    scan_parser = commands.add_parser("scan", help="decode every record and list the unusable ones")
    scan_parser.add_argument("rec_dir", help="folder with train.rec/train.idx")
    scan_parser.add_argument("--workers", type=int, default=workers, help=f"decoding processes (default {workers})")
    scan_parser.set_defaults(run=cmd_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one tool; returns the exit status (0 ok, 1 scan found bad records, 2 error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, show_time=False, markup=False)],
    )
    try:
        return int(args.run(args))
    except InputError as error:
        return report_input_error(error)
    except OSError as error:  # reading an input: the file system's message names the path
        return report_input_error(InputError(str(error)))
    except KeyboardInterrupt:
        error_console.print("interrupted", markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
