"""Native MXNet RecordIO (``.rec`` + ``.idx``), byte-compatible with ``mxnet.recordio``; no MXNet needed.

Format (dmlc-core's RecordIO, as written by ``MXIndexedRecordIO``):

* A record is stored as one or more frames. A frame is ``uint32 magic``, ``uint32 lrecord`` (upper 3 bits: the
  continuation flag ``cflag``, lower 29 bits: the frame's data length), the data, zero padding to 4 bytes.
* dmlc-core's writer never lets the magic word appear at a 4-byte-aligned position of the stored data, so a reader
  that lost its place can re-synchronise on it: wherever the record holds the magic at an aligned position, the
  writer ends the frame there (cflag 1 for the first frame, 2 for a middle one), drops those 4 bytes and starts the
  next frame after them; the last frame of a split record has cflag 3, an unsplit record cflag 0. Readers put the
  magic back between frames. We reproduce this exactly, so our files are byte-identical to MXNet's.
* Records of 2^29 bytes or more are refused, as dmlc-core refuses them (its length field has 29 bits).
* All integers are little-endian (MXNet writes native order; every platform it ships on is little-endian).
* ``.idx`` is text, one ``key<TAB>offset`` line per record, offset in bytes into ``.rec``; keys need not follow
  file order (insightface writes record 0 last).

Image records start with an ``IRHeader`` (see :func:`pack`); insightface datasets add a layout on top of the keys
(see :func:`read_insightface_layout`).
"""

from __future__ import annotations

import io
import logging
import mmap
import numbers
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from models.errors import InputError

logger = logging.getLogger(__name__)

RECORD_MAGIC = 0xCED7230A
# dmlc-core stores a frame's length in 29 bits and refuses any record that does not fit.
MAX_RECORD_BYTES = (1 << 29) - 1
IR_HEADER_SIZE = 24

_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_FRAME_HEADER = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_CFLAG_WHOLE, _CFLAG_FIRST, _CFLAG_MIDDLE, _CFLAG_LAST = 0, 1, 2, 3
# A record is read with one pread sized by the gap to the next indexed offset, capped so an .idx that lists only a
# few records of a huge .rec does not make us read gigabytes; longer records take a second pread.
_READ_AHEAD_BYTES = 1 << 20


class RecordIOError(InputError, ValueError):
    """A malformed or inconsistent RecordIO file; the message names the file and the key and/or byte offset."""


class MissingRecordFileError(RecordIOError, FileNotFoundError):
    """A ``.rec``, ``.idx`` or dataset file that does not exist."""


class IRHeader(NamedTuple):
    """MXNet's image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader | Sequence[Any], payload: bytes) -> bytes:
    """Prefix ``payload`` with an IRHeader, with ``mxnet.recordio.pack``'s semantics.

    A number label sets ``flag = 0``; any other label is stored as float32 values after the header, with
    ``flag`` = their count and the header's float label 0 (an empty array gives ``flag = 0`` and no values).
    """
    flag, label, record_id, record_id2 = header
    if isinstance(label, numbers.Number):
        flag, label_field, label_bytes = 0, float(label), b""  # type: ignore[arg-type]  # any Number, as MXNet
    else:
        values = np.asarray(label, dtype=np.float32)
        flag, label_field, label_bytes = values.size, 0.0, values.astype("<f4").tobytes()
    return _IR_HEADER.pack(flag, label_field, record_id, record_id2) + label_bytes + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload, with ``mxnet.recordio.unpack``'s semantics.

    With ``flag > 0`` the label is a float32 array of ``flag`` values read after the header.
    """
    if len(record) < IR_HEADER_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_HEADER_SIZE}-byte IRHeader")
    flag, label, record_id, record_id2 = _IR_HEADER.unpack_from(record)
    payload = record[IR_HEADER_SIZE:]
    if flag == 0:
        return IRHeader(flag, label, record_id, record_id2), payload
    num_label_bytes = 4 * flag
    if len(payload) < num_label_bytes:
        raise RecordIOError(
            f"IRHeader announces {flag} float32 labels ({num_label_bytes} bytes) but only {len(payload)} bytes follow"
        )
    labels = np.frombuffer(payload, dtype="<f4", count=flag).astype(np.float32)
    return IRHeader(flag, labels, record_id, record_id2), payload[num_label_bytes:]


def _frame_record(record: memoryview) -> list[bytes | memoryview]:
    """Frame one record as dmlc-core's writer does: split at aligned magic words, pad the end to 4 bytes."""
    size = record.nbytes
    data = record.tobytes() if size else b""
    pieces: list[bytes | memoryview] = []
    frame_start = 0
    search_from = 0
    while True:
        hit = data.find(_MAGIC_BYTES, search_from)
        if hit < 0:
            break
        if hit % 4:
            # Unaligned magic words stay in the data: dmlc-core only scans 4-byte-aligned positions.
            search_from = hit + 1
            continue
        cflag = _CFLAG_FIRST if frame_start == 0 else _CFLAG_MIDDLE
        pieces.append(_FRAME_HEADER.pack(RECORD_MAGIC, (cflag << 29) | (hit - frame_start)))
        pieces.append(record[frame_start:hit])
        frame_start = search_from = hit + 4
    cflag = _CFLAG_LAST if frame_start else _CFLAG_WHOLE
    pieces.append(_FRAME_HEADER.pack(RECORD_MAGIC, (cflag << 29) | (size - frame_start)))
    pieces.append(record[frame_start:])
    pieces.append(b"\0" * (-size % 4))
    return pieces


class RecordWriter:
    """Write an indexed RecordIO pair byte-identical to ``mxnet.recordio.MXIndexedRecordIO(idx, rec, 'w')``.

    Use as a context manager; existing files are overwritten. Duplicate keys are refused (MXNet would write a second
    ``.idx`` line that shadows the first).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self._rec = open(self.rec_path, "wb")  # closed by close() / __exit__
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._offset = 0
        self._written: set[int] = set()

    def write_idx(self, key: int, record: bytes | bytearray | memoryview) -> None:
        """Append ``record`` under ``key`` and add its ``key<TAB>offset`` line to the ``.idx``."""
        key = int(key)
        view = memoryview(record).cast("B")
        if view.nbytes > MAX_RECORD_BYTES:
            raise RecordIOError(
                f"{self.rec_path}: key {key}: record of {view.nbytes} bytes is too large; RecordIO (dmlc-core) "
                f"refuses records of 2^29 = {MAX_RECORD_BYTES + 1} bytes or more"
            )
        if key in self._written:
            raise RecordIOError(f"{self.idx_path}: key {key} written twice")
        pieces = _frame_record(view)
        for piece in pieces:
            self._rec.write(piece)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._written.add(key)
        self._offset += sum(len(piece) for piece in pieces)

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of an ``.idx`` file, in file order; blank lines are skipped."""
    data = idx_path.read_bytes()
    parsed = _parse_idx_vectorised(data)
    return parsed if parsed is not None else _parse_idx_lines(idx_path, data)


# Byte classes for the vectorised parser: digits, and the whitespace a well-formed .idx contains.
_IS_DIGIT = np.zeros(256, dtype=bool)
_IS_DIGIT[list(b"0123456789")] = True
_IS_IDX_BYTE = _IS_DIGIT.copy()
_IS_IDX_BYTE[list(b" \t\r\n")] = True


def _parse_idx_vectorised(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse a well-formed ``.idx`` without a Python loop (several times faster on millions of lines).

    Returns None for anything unusual (other bytes, negative keys, a line without exactly two numbers, numbers
    too long for int64): the line-by-line parser then gives the exact answer or the error with its line number.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if not _IS_IDX_BYTE[raw].all():
        return None
    digit = _IS_DIGIT[raw]
    starts = np.flatnonzero(digit[1:] & ~digit[:-1]) + 1
    ends = np.flatnonzero(digit[:-1] & ~digit[1:]) + 1
    if digit[0]:
        starts = np.concatenate(([0], starts))
    if digit[-1]:
        ends = np.append(ends, raw.size)
    if starts.size % 2 or (starts.size and int((ends - starts).max()) > 18):
        return None
    line = np.searchsorted(np.flatnonzero(raw == ord("\n")), starts)
    # Exactly two numbers per line: each pair shares a line, and each pair starts on a later line than the last.
    if (line[0::2] != line[1::2]).any() or (np.diff(line[0::2]) <= 0).any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(data, dtype=np.int64, sep=" ")  # whitespace of any kind separates
        except (ValueError, DeprecationWarning):
            return None
    if values.size != starts.size:
        return None
    return values[0::2].copy(), values[1::2].copy()


def _parse_idx_lines(idx_path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    keys: list[int] = []
    offsets: list[int] = []
    for line_number, line in enumerate(data.decode("ascii", errors="replace").split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
            if offset < 0 or not -(2**63) <= key < 2**63 or offset >= 2**63:
                raise ValueError
        except ValueError:
            raise RecordIOError(
                f"{idx_path}, line {line_number}: malformed index line {line.rstrip()!r}; "
                "expected '<key>\\t<byte offset>'"
            ) from None
        keys.append(key)
        offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordReader:
    """Random access to an indexed RecordIO pair (``MXIndexedRecordIO(idx, rec, 'r')`` without MXNet).

    Reads go through ``os.pread`` (or, in :meth:`read_record` and :meth:`read_header`, a read-only memory map)
    opened lazily by each process, so the reader pickles (descriptor and map are not pickled) and is safe in forked
    or spawned DataLoader workers: no file offset is shared.
    At open it checks that both files exist, that every ``.idx`` offset lies inside the ``.rec``, and that the
    first and last records of the ``.rec`` are well framed (a cut-off file shows up there); every read checks
    the framing of its record. :meth:`verify` checks every record.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise MissingRecordFileError(f"RecordIO file not found: {path}")
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._map: mmap.mmap | None = None
        self._map_pid: int | None = None
        self._rec_size = self.rec_path.stat().st_size

        keys, offsets = _parse_idx(self.idx_path)
        keys.flags.writeable = False
        self._keys = keys
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        duplicates = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if duplicates.size:
            raise RecordIOError(f"{self.idx_path}: key {int(sorted_keys[duplicates[0]])} appears more than once")
        past_end = np.flatnonzero(offsets + _FRAME_HEADER.size > self._rec_size)
        if past_end.size:
            row = int(past_end[0])
            raise RecordIOError(
                f"{self.idx_path}: key {int(keys[row])} points at byte offset {int(offsets[row])}, past the end of "
                f"{self.rec_path} ({self._rec_size} bytes); the .idx does not belong to this .rec or the .rec is "
                "truncated"
            )
        # Arrays ordered by key. Keys are usually 0..N-1 (or 1..N), which makes lookup a subtraction.
        self._first_key = int(sorted_keys[0]) if keys.size else 0
        self._contiguous = bool(keys.size == 0 or sorted_keys[-1] - sorted_keys[0] == keys.size - 1)
        self._sorted_keys = None if self._contiguous else sorted_keys
        self._offsets = offsets[order]
        # A record cannot extend past the next indexed offset: that bounds the single pread of read_idx().
        # A stable sort (timsort) is near-linear on offsets already in file order; np.unique would hash them (slow).
        starts = np.sort(offsets, kind="stable")
        starts = starts[np.concatenate(([True], starts[1:] != starts[:-1]))[: starts.size]]
        self._starts = starts  # the distinct offsets, sorted
        self._ends = np.append(starts, self._rec_size)[np.searchsorted(starts, self._offsets, side="right")]

        if keys.size:
            self.read_idx(int(keys[int(np.argmin(offsets))]))
            self.read_idx(int(keys[int(np.argmax(offsets))]))

    @property
    def keys(self) -> np.ndarray:
        """All keys in ``.idx`` order (read-only int64 array)."""
        return self._keys

    def __len__(self) -> int:
        return int(self._keys.size)

    @property
    def indexed_records(self) -> int:
        """Distinct records the ``.idx`` points at (two keys may share one offset)."""
        return int(self._starts.size)

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[call-overload]
        except (RecordIOError, TypeError, ValueError):
            return False
        return True

    def __repr__(self) -> str:
        return f"RecordReader({str(self.rec_path)!r}, {str(self.idx_path)!r}, records={len(self)})"

    def _position(self, key: int) -> int:
        if self._contiguous:
            position = key - self._first_key
            if 0 <= position < self._keys.size:
                return position
        else:
            assert self._sorted_keys is not None
            position = int(np.searchsorted(self._sorted_keys, key))
            if position < self._sorted_keys.size and int(self._sorted_keys[position]) == key:
                return position
        raise RecordIOError(f"{self.idx_path}: no record with key {key}")

    def missing_keys(self, keys: np.ndarray) -> np.ndarray:
        """The entries of ``keys`` that are not in the ``.idx`` (vectorised membership test)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._contiguous:
            present = (keys >= self._first_key) & (keys < self._first_key + self._keys.size)
        else:
            assert self._sorted_keys is not None
            positions = np.minimum(np.searchsorted(self._sorted_keys, keys), max(self._sorted_keys.size - 1, 0))
            present = self._sorted_keys[positions] == keys if self._sorted_keys.size else np.zeros(keys.shape, bool)
        return keys[~present]

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s record in the ``.rec``."""
        return int(self._offsets[self._position(int(key))])

    def _descriptor(self) -> int:
        # Reopen after fork/spawn: a descriptor inherited from the parent must not be used (or closed) by a child.
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fd_pid = pid
        return self._fd

    def read_idx(self, key: int) -> bytes:
        """The record stored under ``key``, continuation frames reassembled."""
        key = int(key)
        position = self._position(key)
        offset = int(self._offsets[position])
        span = min(int(self._ends[position]) - offset, _READ_AHEAD_BYTES)
        return self._read_record(key, offset, span)

    def _read_record(self, key: int, offset: int, span: int) -> bytes:
        fd = self._descriptor()
        buffer = os.pread(fd, span, offset)
        parts: list[bytes] = []
        cursor = 0  # relative to offset
        while True:
            frame_offset = offset + cursor
            if len(buffer) < cursor + _FRAME_HEADER.size:
                buffer = self._extend(fd, buffer, cursor + _FRAME_HEADER.size, key, offset, frame_offset)
            magic, lrecord = _FRAME_HEADER.unpack_from(buffer, cursor)
            if magic != RECORD_MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: key {key} (record at byte offset {offset}): expected the RecordIO magic "
                    f"0x{RECORD_MAGIC:08x} at byte offset {frame_offset}, found 0x{magic:08x}; the .idx offset does "
                    "not point at a record or the .rec is corrupt"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            expected_flags = (_CFLAG_WHOLE, _CFLAG_FIRST) if not parts else (_CFLAG_MIDDLE, _CFLAG_LAST)
            if cflag not in expected_flags:
                raise RecordIOError(
                    f"{self.rec_path}: key {key} (record at byte offset {offset}): frame at byte offset "
                    f"{frame_offset} has continuation flag {cflag}, expected one of {expected_flags}; the .idx "
                    "points into the middle of a split record or the .rec is corrupt"
                )
            data_start = cursor + _FRAME_HEADER.size
            frame_end = data_start + ((length + 3) & ~3)
            if len(buffer) < frame_end:
                buffer = self._extend(fd, buffer, frame_end, key, offset, frame_offset)
            parts.append(buffer[data_start : data_start + length])
            if cflag in (_CFLAG_WHOLE, _CFLAG_LAST):
                break
            cursor = frame_end
        return _MAGIC_BYTES.join(parts) if len(parts) > 1 else parts[0]

    def _extend(self, fd: int, buffer: bytes, needed: int, key: int, offset: int, frame_offset: int) -> bytes:
        """``buffer`` (the bytes from ``offset`` on) grown to ``needed`` bytes, or a truncation error."""
        more = os.pread(fd, needed - len(buffer), offset + len(buffer))
        if len(buffer) + len(more) < needed:
            raise RecordIOError(
                f"{self.rec_path}: key {key} (record at byte offset {offset}) is truncated: its frame at byte offset "
                f"{frame_offset} runs to byte offset {offset + needed}, past the end of the file "
                f"({offset + len(buffer) + len(more)} bytes)"
            )
        return buffer + more

    def _mapped(self) -> mmap.mmap | None:
        # Like the descriptor, one read-only map per process (never one inherited through fork).
        pid = os.getpid()
        if self._map_pid != pid:
            self._map = None
            self._map_pid = pid
            if self._rec_size:
                self._map = mmap.mmap(self._descriptor(), self._rec_size, access=mmap.ACCESS_READ)
        return self._map

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """:meth:`unpack_idx`, the training loader's fast path: an unsplit record is sliced out of a memory map
        (no system call; on a VM a ``pread`` of a face record costs more than a third of the record's decoding
        work besides the decode itself). Anything else (split records, damage) goes through
        :meth:`unpack_idx`, which reads, checks and names the problem. A ``.rec`` must not be truncated while a
        reader maps it (the map would fault); replacing it with a new file is safe."""
        found = self._mapped_record(int(key))
        if found is None:
            return self.unpack_idx(key)
        header, payload_start, end = found
        assert self._map is not None  # _mapped_record found the record in it
        return header, self._map[payload_start:end]

    def _mapped_record(self, key: int) -> tuple[IRHeader, int, int] | None:
        """``(header, payload start, record end)`` of an unsplit, well-framed record in the memory map, else None."""
        offset = int(self._offsets[self._position(key)])
        mapped = self._mapped()
        if mapped is None:
            return None
        magic, lrecord = _FRAME_HEADER.unpack_from(mapped, offset)
        length, start = lrecord & _LENGTH_MASK, offset + _FRAME_HEADER.size
        if (
            magic != RECORD_MAGIC
            or lrecord >> 29 != _CFLAG_WHOLE
            or length < IR_HEADER_SIZE
            or start + ((length + 3) & ~3) > self._rec_size
        ):
            return None
        flag, label, record_id, record_id2 = _IR_HEADER.unpack_from(mapped, start)
        head = start + IR_HEADER_SIZE
        if flag == 0:
            return IRHeader(0, label, record_id, record_id2), head, start + length
        if IR_HEADER_SIZE + 4 * flag > length:
            return None
        labels = np.frombuffer(mapped, dtype="<f4", count=flag, offset=head).astype(np.float32)
        return IRHeader(flag, labels, record_id, record_id2), head + 4 * flag, start + length

    def unpack_idx(self, key: int) -> tuple[IRHeader, bytes]:
        """:func:`unpack` of ``key``'s record, with errors naming the file and key."""
        record = self.read_idx(key)
        try:
            return unpack(record)
        except RecordIOError as error:
            raise RecordIOError(f"{self.rec_path}: key {key} (byte offset {self.offset(key)}): {error}") from None

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of ``key``'s record, from the memory map without touching the payload (the checked
        full read for split or damaged records)."""
        found = self._mapped_record(int(key))
        return found[0] if found is not None else self.unpack_idx(key)[0]

    def _words(self, index: np.ndarray) -> np.ndarray:
        """The little-endian uint32 words at word positions ``index`` of the ``.rec`` (a copy: no view of the map
        outlives the call, else :meth:`close` could not unmap it)."""
        mapped = self._mapped()
        assert mapped is not None  # callers check the file is not empty
        words = np.frombuffer(mapped, dtype="<u4", count=self._rec_size // 4)
        try:
            return words[index]
        finally:
            del words

    def read_labels(self, keys: np.ndarray) -> np.ndarray:
        """The class label of each record in ``keys`` (float64: the header's label, or the first value of an array
        label), read from the headers in one vectorised gather; records that are split or damaged go through
        :meth:`read_header`, which names the problem."""
        keys = np.asarray(keys, dtype=np.int64)
        missing = self.missing_keys(keys)
        if missing.size:
            self._position(int(missing[0]))  # raises, naming the key
        if self._contiguous:
            positions = keys - self._first_key
        else:
            assert self._sorted_keys is not None
            positions = np.searchsorted(self._sorted_keys, keys)
        offsets = self._offsets[positions]
        if self._rec_size < _FRAME_HEADER.size + IR_HEADER_SIZE or keys.size == 0:
            return np.asarray([self._first_label(self.read_header(int(k))) for k in keys], dtype=np.float64)
        last = self._rec_size // 4 - 1
        aligned = offsets % 4 == 0
        word = np.where(aligned, offsets // 4, 0)
        magic, lrecord, flag = (self._words(np.minimum(word + i, last)) for i in range(3))
        length = (lrecord & _LENGTH_MASK).astype(np.int64)
        fast = (
            aligned
            & (magic == RECORD_MAGIC)
            & (lrecord >> 29 == _CFLAG_WHOLE)
            & (length >= IR_HEADER_SIZE + 4 * np.minimum(flag, 1))
            & (offsets + _FRAME_HEADER.size + length <= self._rec_size)
        )
        # IRHeader after the 8-byte frame header: flag (word 2), float label (word 3); with flag > 0 the float32
        # labels follow the 24-byte IRHeader.
        label_word = np.where(flag > 0, word + 2 + IR_HEADER_SIZE // 4, word + 3)
        labels = self._words(np.where(fast, label_word, 0)).view("<f4").astype(np.float64)
        for i in np.flatnonzero(~fast).tolist():
            labels[i] = self._first_label(self.read_header(int(keys[i])))
        return labels

    @staticmethod
    def _first_label(header: IRHeader) -> float:
        label = header.label
        return float(label) if isinstance(label, float) else float(np.asarray(label, np.float64).reshape(-1)[0])

    def count_records(self) -> int:
        """How many records the ``.rec`` holds, counted from its frame headers, not taken from the ``.idx``.

        The ``.idx`` is only a shortcut: one vectorised gather reads the frame header at each distinct indexed
        offset, and when that record is unsplit and ends exactly where the next indexed record starts (the usual
        case), the gap holds nothing else. Only the other gaps (before the first indexed record, after a record the
        ``.idx`` skips, split records) are walked frame by frame. A complete ``.idx`` costs one 8-byte read per
        record from the memory map (one page touched per record: on a cold page cache, I/O over much of the file);
        an ``.idx`` listing a small part of a large ``.rec`` costs a Python walk over the unlisted records.

        Damage is not this method's business (the spot check at start, bad samples in training and `python -m
        data.tools scan` report it): an indexed record counts as one record even if its header is broken, and a
        walk stops at the first frame that is not well formed.
        """
        if self._rec_size == 0:
            return 0
        starts = self._starts  # sorted, distinct: two keys may share a record
        misaligned = np.flatnonzero(starts % 4)
        if misaligned.size:
            raise RecordIOError(
                f"{self.idx_path}: byte offset {int(starts[misaligned[0]])} is not a multiple of 4, so not the start "
                f"of a RecordIO record in {self.rec_path}"
            )
        magic, lrecord = self._words(starts // 4), self._words(starts // 4 + 1)  # offset + 8 <= size: checked at open
        framed_end = starts + _FRAME_HEADER.size + ((lrecord & _LENGTH_MASK).astype(np.int64) + 3) // 4 * 4
        next_start = np.append(starts[1:], self._rec_size)
        simple = (magic == RECORD_MAGIC) & (lrecord >> 29 == _CFLAG_WHOLE) & (framed_end == next_start)
        count = int(simple.sum())
        for i in np.flatnonzero(~simple).tolist():
            count += max(1, self._walk(int(starts[i]), int(next_start[i])))
        if starts.size == 0 or starts[0] > 0:
            count += self._walk(0, int(starts[0]) if starts.size else self._rec_size)
        return count

    def _walk(self, begin: int, end: int) -> int:
        """Well-framed records from byte ``begin`` on, up to ``end`` or the first frame that is not well formed."""
        mapped = self._mapped()
        assert mapped is not None
        count, position, inside = 0, begin, False  # inside: between the first and the last frame of a split record
        while position + _FRAME_HEADER.size <= end:
            magic, lrecord = _FRAME_HEADER.unpack_from(mapped, position)
            cflag = lrecord >> 29
            position += _FRAME_HEADER.size + ((lrecord & _LENGTH_MASK) + 3) // 4 * 4
            expected = (_CFLAG_MIDDLE, _CFLAG_LAST) if inside else (_CFLAG_WHOLE, _CFLAG_FIRST)
            if magic != RECORD_MAGIC or cflag not in expected or position > end:
                break
            inside = cflag in (_CFLAG_FIRST, _CFLAG_MIDDLE)
            count += not inside
        return count

    def verify(self) -> int:
        """Read every record (checking magic, framing and bounds); returns the number of records."""
        for key in self._keys:
            self.read_idx(int(key))
        return len(self)

    def close(self) -> None:
        """Close this process's descriptor (a later read reopens it)."""
        if self._map is not None and self._map_pid == os.getpid():
            self._map.close()
        self._map = None
        self._map_pid = None
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._fd_pid = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (AttributeError, OSError):
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_fd_pid"] = None
        state["_map"] = None
        state["_map_pid"] = None
        return state


class InsightFaceLayout(NamedTuple):
    """Which keys of a ``.rec`` are images, and the per-identity key ranges when the file records them."""

    image_keys: np.ndarray
    identity_ranges: list[tuple[int, int]] | None
    num_classes: int | None


def read_insightface_layout(reader: RecordReader, with_identity_ranges: bool = True) -> InsightFaceLayout:
    """Read insightface's layout: record 0 with ``flag > 0`` has label ``(first_identity_record, end)``.

    Then keys ``1 .. first_identity_record - 1`` are images and keys ``first_identity_record .. end - 1`` are
    identity records whose label is ``(start, end)``, the image keys of one identity. A ``.rec`` from plain
    ``im2rec`` (record 0 an image, ``flag == 0``, or no record 0) has every key, in ``.idx`` order, as an image
    and no class count. ``with_identity_ranges=False`` skips reading the identity records (one read each).
    """
    if len(reader) == 0:
        size = reader.rec_path.stat().st_size
        raise RecordIOError(
            f"{reader.idx_path} lists no records ({reader.rec_path}: {size} bytes): there is nothing to train on"
        )
    if 0 not in reader:
        return InsightFaceLayout(reader.keys.copy(), None, None)
    header0 = reader.read_header(0)
    if header0.flag == 0:
        return InsightFaceLayout(reader.keys.copy(), None, None)
    where = f"{reader.rec_path}: key 0 (byte offset {reader.offset(0)})"
    if header0.flag < 2:
        raise RecordIOError(f"{where}: layout record has flag {header0.flag}; expected a (first, end) label pair")
    first_identity, end = (int(v) for v in np.asarray(header0.label)[:2])
    if not 1 <= first_identity <= end:
        raise RecordIOError(f"{where}: layout label ({first_identity}, {end}) is not an increasing key range from 1")
    image_keys = np.arange(1, first_identity, dtype=np.int64)
    identity_keys = np.arange(first_identity, end, dtype=np.int64)
    for role, keys in (("image", image_keys), ("identity", identity_keys)):
        missing = reader.missing_keys(keys)
        if missing.size:
            raise RecordIOError(
                f"{reader.idx_path}: {role} key {int(missing[0])} is missing ({missing.size} missing in all); "
                f"record 0 of {reader.rec_path} announces images 1..{first_identity - 1} and identities "
                f"{first_identity}..{end - 1}"
            )
    identity_ranges: list[tuple[int, int]] | None = None
    if with_identity_ranges:
        identity_ranges = []
        for key in identity_keys.tolist():
            header = reader.read_header(key)
            if header.flag < 2:
                raise RecordIOError(
                    f"{reader.rec_path}: identity key {key} (byte offset {reader.offset(key)}) has flag "
                    f"{header.flag}; expected a (start, end) label pair"
                )
            start, stop = (int(v) for v in np.asarray(header.label)[:2])
            if not 1 <= start <= stop <= first_identity:
                raise RecordIOError(
                    f"{reader.rec_path}: identity key {key} (byte offset {reader.offset(key)}) has image range "
                    f"({start}, {stop}) outside the image keys 1..{first_identity - 1}"
                )
            identity_ranges.append((start, stop))
    return InsightFaceLayout(image_keys, identity_ranges, end - first_identity)


def write_insightface_layout(
    rec_path: str | Path,
    idx_path: str | Path,
    samples: Iterable[tuple[int, bytes]],
    property_path: str | Path | None = None,
    image_size: tuple[int, int] = (112, 112),
) -> InsightFaceLayout:
    """Write ``(label, encoded image)`` samples in insightface's layout and return that layout.

    Labels must be grouped and sorted: 0, 0, 1, 2, 2, ... with no class left out. Image ``i`` (from 1) is key ``i``
    with header ``(0, float(label), i, 0)``; identity ``c`` is key ``N + 1 + c`` with label ``(start, end)``;
    record 0, with label ``(N + 1, N + 1 + C)``, is written last, as insightface's builder does. With
    ``property_path``, also writes the ``property`` file.
    """
    rec_path, idx_path = Path(rec_path), Path(idx_path)
    identity_ranges: list[tuple[int, int]] = []
    key = 0
    with RecordWriter(rec_path, idx_path) as writer:
        for key, (label, image) in enumerate(samples, start=1):
            label = int(label)
            current = len(identity_ranges) - 1
            if label == current + 1:
                identity_ranges.append((key, key))
            elif label != current:
                raise RecordIOError(
                    f"{rec_path}: sample {key - 1} has label {label} after label {current}; samples must be grouped "
                    "by label in increasing order starting at 0, with no label skipped"
                )
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), image))
            identity_ranges[-1] = (identity_ranges[-1][0], key + 1)
        if key == 0:
            raise RecordIOError(f"{rec_path}: no samples to write")
        first_identity = key + 1
        for identity, (start, stop) in enumerate(identity_ranges):
            identity_key = first_identity + identity
            writer.write_idx(identity_key, pack(IRHeader(0, np.array([start, stop], np.float32), identity_key, 0), b""))
        end = first_identity + len(identity_ranges)
        writer.write_idx(0, pack(IRHeader(0, np.array([first_identity, end], np.float32), 0, 0), b""))
    if property_path is not None:
        write_property_file(property_path, len(identity_ranges), image_size)
    logger.info("wrote %d images of %d identities to %s", key, len(identity_ranges), rec_path)
    return InsightFaceLayout(np.arange(1, first_identity, dtype=np.int64), identity_ranges, len(identity_ranges))


def write_property_file(path: str | Path, num_classes: int, image_size: tuple[int, int] = (112, 112)) -> None:
    """Write insightface's ``property`` file: ``num_classes,height,width``."""
    Path(path).write_text(f"{int(num_classes)},{int(image_size[0])},{int(image_size[1])}\n", encoding="ascii")


def read_property_file(path: str | Path) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from insightface's ``property`` file."""
    path = Path(path)
    if not path.is_file():
        raise MissingRecordFileError(f"property file not found: {path}")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        num_classes, height, width = (int(field) for field in text.split(","))
    except ValueError:
        raise RecordIOError(f"{path}: malformed property file {text!r}; expected 'num_classes,height,width'") from None
    return num_classes, height, width


def decode_image(buf: bytes) -> np.ndarray:
    """Decode an encoded image to an ``(H, W, 3)`` uint8 RGB array: simplejpeg for JPEG, Pillow otherwise."""
    if simplejpeg.is_jpeg(buf):
        try:
            return simplejpeg.decode_jpeg(buf, colorspace="RGB")
        except ValueError:
            pass  # e.g. CMYK or arithmetic-coded JPEG: Pillow may still read it
    try:
        with Image.open(io.BytesIO(buf)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise RecordIOError(f"cannot decode a {len(buf)}-byte image ({bytes(buf[:4]).hex()}...): {error}") from None
