"""Native RecordIO against files written by the real MXNet, round trips, and every malformed-input error."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data.recordio import (
    IR_HEADER_SIZE,
    MAX_RECORD_BYTES,
    RECORD_MAGIC,
    IRHeader,
    MissingRecordFileError,
    RecordIOError,
    RecordReader,
    RecordWriter,
    decode_image,
    pack,
    read_insightface_layout,
    read_property_file,
    unpack,
    write_insightface_layout,
    write_property_file,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mxnet"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text())
MAGIC = struct.pack("<I", RECORD_MAGIC)
SETS = ["scalar", "array", "magic", "insightface"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fixture_reader(name: str) -> RecordReader:
    return RecordReader(FIXTURES / EXPECTED[name]["rec"], FIXTURES / EXPECTED[name]["idx"])


def _input_record(entry: dict[str, Any]) -> bytes:
    """The record MXNet was given for a fixture entry, rebuilt with our pack()."""
    spec = entry["input"]
    payload = bytes.fromhex(spec["payload_hex"])
    if spec["pack_header"] is None:
        return payload
    flag, label, record_id, record_id2 = spec["pack_header"]
    if spec["label_type"] == "numpy.float32":
        label = np.float32(label)
    return pack(IRHeader(flag, label, record_id, record_id2), payload)


def _write(tmp_path: Path, records: list[tuple[int, bytes]], name: str = "data") -> tuple[Path, Path]:
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    with RecordWriter(rec, idx) as writer:
        for key, record in records:
            writer.write_idx(key, record)
    return rec, idx


# --- files written by MXNet -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_reads_mxnet_fixture_as_mxnet_does(name: str) -> None:
    expected = EXPECTED[name]["records"]
    reader = _fixture_reader(name)
    rec_bytes = (FIXTURES / EXPECTED[name]["rec"]).read_bytes()
    assert reader.keys.tolist() == [entry["key"] for entry in expected]
    for entry in expected:
        key = entry["key"]
        record = reader.read_idx(key)
        assert reader.offset(key) == entry["offset"]
        assert len(record) == entry["record_size"] and _sha(record) == entry["record_sha256"], key
        assert struct.unpack_from("<I", rec_bytes, entry["offset"] + 4)[0] >> 29 == entry["first_cflag"]
        if "flag" not in entry:
            continue
        header, payload = unpack(record)
        assert (header.flag, header.id, header.id2) == (entry["flag"], entry["id"], entry["id2"])
        if entry["flag"] > 0:
            assert header.label.dtype == np.float32 and header.label.tolist() == entry["label"]
        else:
            assert isinstance(header.label, float) and header.label == entry["label"]
        assert len(payload) == entry["payload_size"] and _sha(payload) == entry["payload_sha256"]
        assert reader.read_header(key).flag == header.flag


@pytest.mark.parametrize("name", SETS)
def test_mapped_read_record_equals_unpack_idx(name: str) -> None:
    # The loader's fast path (a memory map, unsplit records only) must agree with the checked path on MXNet's
    # own files: scalar and array labels, and split records (magic), which take the fallback.
    reader = _fixture_reader(name)
    for entry in EXPECTED[name]["records"]:
        if "flag" not in entry:
            continue
        key = entry["key"]
        fast_header, fast_payload = reader.read_record(key)
        header, payload = reader.unpack_idx(key)
        assert bytes(fast_payload) == payload and (fast_header.flag, fast_header.id) == (header.flag, header.id)
        assert np.array_equal(np.asarray(fast_header.label), np.asarray(header.label))
        assert type(fast_header.label) is type(header.label)


def test_magic_fixture_exercises_continuation_frames() -> None:
    # Guards the fixture itself: without split records the byte-identity test below would prove little.
    flags = [entry["first_cflag"] for entry in EXPECTED["magic"]["records"]]
    assert flags.count(1) >= 5 and flags.count(0) >= 2
    rec_bytes = (FIXTURES / "magic.rec").read_bytes()
    frame_flags = set()
    position = 0
    while position < len(rec_bytes):
        magic, lrecord = struct.unpack_from("<II", rec_bytes, position)
        assert magic == RECORD_MAGIC
        frame_flags.add(lrecord >> 29)
        position += 8 + (((lrecord & MAX_RECORD_BYTES) + 3) & ~3)
    assert frame_flags == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["scalar", "array", "magic"])
def test_writer_is_byte_identical_to_mxnet(tmp_path: Path, name: str) -> None:
    entries = EXPECTED[name]["records"]
    rec, idx = _write(tmp_path, [(entry["key"], _input_record(entry)) for entry in entries])
    assert rec.read_bytes() == (FIXTURES / EXPECTED[name]["rec"]).read_bytes()
    assert idx.read_bytes() == (FIXTURES / EXPECTED[name]["idx"]).read_bytes()


def test_insightface_layout_writer_is_byte_identical_to_mxnet(tmp_path: Path) -> None:
    fixture = EXPECTED["insightface"]
    reader = _fixture_reader("insightface")
    samples = [(image["label"], unpack(reader.read_idx(image["key"]))[1]) for image in fixture["images"]]
    rec, idx, prop = tmp_path / "train.rec", tmp_path / "train.idx", tmp_path / "property"
    layout = write_insightface_layout(rec, idx, samples, property_path=prop)
    assert rec.read_bytes() == (FIXTURES / "insightface" / "train.rec").read_bytes()
    assert idx.read_bytes() == (FIXTURES / "insightface" / "train.idx").read_bytes()
    assert prop.read_text() == (FIXTURES / "insightface" / "property").read_text()
    assert layout.image_keys.tolist() == [image["key"] for image in fixture["images"]]
    assert layout.identity_ranges == [tuple(r) for r in fixture["identity_ranges"]]
    assert layout.num_classes == fixture["num_classes"]


def test_reads_insightface_layout_and_images() -> None:
    fixture = EXPECTED["insightface"]
    reader = _fixture_reader("insightface")
    layout = read_insightface_layout(reader)
    assert layout.image_keys.dtype == np.int64
    assert layout.image_keys.tolist() == [image["key"] for image in fixture["images"]]
    assert layout.identity_ranges == [tuple(r) for r in fixture["identity_ranges"]]
    assert layout.num_classes == fixture["num_classes"] == read_property_file(FIXTURES / "insightface" / "property")[0]
    assert read_insightface_layout(reader, with_identity_ranges=False).identity_ranges is None
    for image in fixture["images"]:
        header, jpeg = reader.unpack_idx(image["key"])
        assert header.label == image["label"]
        pixels = decode_image(jpeg)
        assert pixels.shape == (112, 112, 3) and pixels.dtype == np.uint8
        # OpenCV wrote these JPEGs from BGR arrays; a standard decoder must give the colours back as RGB.
        np.testing.assert_allclose(pixels.mean(axis=(0, 1)), image["mean_rgb"], atol=0.5)


def test_plain_im2rec_layout_has_every_key_as_an_image() -> None:
    reader = _fixture_reader("scalar")  # record 0 has flag 0, as im2rec writes it
    layout = read_insightface_layout(reader)
    assert layout.image_keys.tolist() == reader.keys.tolist()
    assert layout.identity_ranges is None and layout.num_classes is None


# --- pack / unpack ----------------------------------------------------------------------------------------------


def test_pack_number_label_forces_flag_zero() -> None:
    record = pack(IRHeader(9, 2.5, 7, 1), b"img")
    assert record == struct.pack("<IfQQ", 0, 2.5, 7, 1) + b"img"
    assert pack((0, np.float32(2.5), 7, 1), b"img") == record
    header, payload = unpack(record)
    assert header == IRHeader(0, 2.5, 7, 1) and payload == b"img"


def test_pack_array_label_stores_floats_after_header() -> None:
    record = pack(IRHeader(0, [3, 4.5], 1, 0), b"p")
    assert record == struct.pack("<IfQQ", 2, 0.0, 1, 0) + struct.pack("<2f", 3.0, 4.5) + b"p"
    header, payload = unpack(record)
    assert header.flag == 2 and header.label.dtype == np.float32 and header.label.tolist() == [3.0, 4.5]
    assert payload == b"p"
    assert unpack(pack(IRHeader(0, np.array([]), 0, 0), b""))[0].flag == 0


def test_unpack_rejects_short_records() -> None:
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack(b"\0" * (IR_HEADER_SIZE - 1))
    with pytest.raises(RecordIOError, match="announces 3 float32 labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)


# --- round trips ------------------------------------------------------------------------------------------------


def _random_with_magic(rng: np.random.Generator, size: int, every: int) -> bytes:
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for position in range(0, size - 4, every):
        data[position : position + 4] = MAGIC
    return bytes(data)


def test_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = {
        7: pack(IRHeader(0, 3.0, 7, 0), b"scalar label"),
        3: pack(IRHeader(0, [1.0, 2.0, 3.0], 3, 0), b"array label"),
        11: b"",
        0: pack(IRHeader(0, 0.0, 0, 0), b""),
        5: MAGIC,
        6: MAGIC * 3 + b"x",
        8: b"ab" + MAGIC + b"cd",  # unaligned: stays in one frame
        9: b"abcd" + MAGIC + b"ef" + MAGIC + MAGIC,
        # Larger than the 1 MiB read-ahead, with aligned magic words every 4 KiB: many continuation frames.
        2: _random_with_magic(rng, 3 * 1024 * 1024 + 3, 4096),
        4: rng.integers(0, 256, 200_001, dtype=np.uint8).tobytes(),
    }
    rec, idx = _write(tmp_path, list(records.items()))
    reader = RecordReader(rec, idx)
    assert reader.keys.tolist() == list(records) and len(reader) == len(records)
    assert 9 in reader and 1 not in reader and "x" not in reader
    for key, record in records.items():
        assert reader.read_idx(key) == record, key
    assert reader.verify() == len(records)
    assert reader.read_header(3).label.tolist() == [1.0, 2.0, 3.0]


def test_reader_with_partial_index(tmp_path: Path) -> None:
    # An .idx may list only some records; each read must still stop at its own record's end.
    records = [(k, bytes([k]) * (100 + 37 * k)) for k in range(6)]
    rec, idx = _write(tmp_path, records)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[1], "", lines[4]]) + "\n")
    reader = RecordReader(rec, idx)
    assert reader.keys.tolist() == [1, 4]
    assert reader.read_idx(1) == records[1][1] and reader.read_idx(4) == records[4][1]


@pytest.mark.parametrize(
    ("second_key", "text"),
    [
        (-2, "3\t0\n-2\t16\n"),  # a negative key: parsed line by line
        (7, "3\t0\r\n\r\n  7 \t 16  "),  # CRLF, a blank line, spaces, no final newline: vectorised
        (7, "\n3\t0\n\n7\t16\n\n"),
    ],
)
def test_idx_text_variants(tmp_path: Path, second_key: int, text: str) -> None:
    rec, idx = _write(tmp_path, [(3, b"three"), (second_key, b"second")])
    assert idx.read_text() == f"3\t0\n{second_key}\t16\n"
    idx.write_text(text, newline="")
    reader = RecordReader(rec, idx)
    assert reader.keys.tolist() == [3, second_key]
    assert reader.read_idx(second_key) == b"second" and reader.read_idx(3) == b"three"


def test_reader_pickles_and_works_in_forked_workers(tmp_path: Path) -> None:
    records = [(k, _random_with_magic(np.random.default_rng(k), 5000 + k, 64)) for k in range(20)]
    rec, idx = _write(tmp_path, records)
    reader = RecordReader(rec, idx)
    reader.read_idx(0)  # the parent opens its descriptor before the fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and clone.read_idx(5) == records[5][1]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        hashes = pool.map(_hash_record, [(reader, key) for key, _ in records])
    assert hashes == [_sha(record) for _, record in records]
    assert reader.read_idx(19) == records[19][1]


def _hash_record(job: tuple[RecordReader, int]) -> str:
    reader, key = job
    return _sha(reader.read_idx(key))


# --- malformed input: every error names the file and the key or offset ------------------------------------------


def test_missing_files_are_named(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"x")])
    for missing in (idx, rec):
        missing.rename(missing.with_suffix(".gone"))
        with pytest.raises(MissingRecordFileError, match=str(missing)) as error:
            RecordReader(rec, idx)
        assert isinstance(error.value, FileNotFoundError)
        missing.with_suffix(".gone").rename(missing)


def test_idx_offset_past_end_of_rec(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"abc"), (1, b"defg")])
    with idx.open("a") as handle:
        handle.write("99\t100000\n")
    with pytest.raises(
        RecordIOError, match=r"data\.idx: key 99 points at byte offset 100000, past the end of .*data\.rec"
    ):
        RecordReader(rec, idx)


def test_wrong_magic_in_a_middle_record_fails_on_read(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a" * 10), (1, b"b" * 10), (2, b"c" * 10)])
    offset = RecordReader(rec, idx).offset(1)
    data = bytearray(rec.read_bytes())
    data[offset] ^= 0xFF
    rec.write_bytes(bytes(data))
    reader = RecordReader(rec, idx)  # only the first and last records are checked at open
    assert reader.read_idx(2) == b"c" * 10
    with pytest.raises(RecordIOError, match=rf"data\.rec: key 1 \(record at byte offset {offset}\): expected the"):
        reader.read_idx(1)


def test_read_record_reports_damage_as_unpack_idx_does(tmp_path: Path) -> None:
    payloads = [bytes([97 + key]) * 30 for key in range(3)]
    rec, idx = _write(tmp_path, [(key, pack(IRHeader(0, key, key, 0), payloads[key])) for key in range(3)])
    offset = RecordReader(rec, idx).offset(1)
    data = bytearray(rec.read_bytes())
    data[offset] ^= 0xFF
    rec.write_bytes(bytes(data))
    reader = RecordReader(rec, idx)
    assert reader.read_record(2) == (IRHeader(0, 2.0, 2, 0), payloads[2])
    with pytest.raises(RecordIOError, match=rf"data\.rec: key 1 \(record at byte offset {offset}\): expected the"):
        reader.read_record(1)
    clone = pickle.loads(pickle.dumps(reader))  # the map is per process, like the descriptor
    assert clone._map is None and clone.read_record(0)[1] == payloads[0]


def test_wrong_magic_in_last_record_fails_at_open(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a" * 10), (1, b"b" * 10)])
    data = bytearray(rec.read_bytes())
    data[20] ^= 0xFF  # key 1 starts at 8 + 12 = 20
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"data\.rec: key 1 \(record at byte offset 20\)"):
        RecordReader(rec, idx)


def test_idx_pointing_inside_a_record(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a" * 16), (1, MAGIC * 2 + b"b" * 8), (2, b"c")])
    idx.write_text(idx.read_text() + "5\t4\n")
    with pytest.raises(RecordIOError, match=r"key 5 \(record at byte offset 4\): expected the RecordIO magic"):
        RecordReader(rec, idx).read_idx(5)
    # Key 1 is split in three frames; its second frame starts 8 bytes after its first.
    second_frame = RecordReader(rec, idx).offset(1) + 8
    idx.write_text(idx.read_text().replace("5\t4\n", f"6\t{second_frame}\n"))
    with pytest.raises(RecordIOError, match=rf"key 6 \(record at byte offset {second_frame}\).*continuation flag 2"):
        RecordReader(rec, idx).read_idx(6)


def test_truncated_rec(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a" * 10), (1, b"b" * 100)])
    rec.write_bytes(rec.read_bytes()[:-40])
    with pytest.raises(RecordIOError, match=r"data\.rec: key 1 \(record at byte offset 20\) is truncated"):
        RecordReader(rec, idx)


def test_truncated_split_record(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a" * 8 + MAGIC + b"b" * 20)])
    rec.write_bytes(rec.read_bytes()[:-8])  # cuts into the second frame
    with pytest.raises(RecordIOError, match=r"key 0 \(record at byte offset 0\) is truncated: its frame at byte off"):
        RecordReader(rec, idx)


def test_malformed_idx_line(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a"), (1, b"b")])
    for bad in ("1\tabc", "1", "1\t2\t3", "1\t-4"):
        idx.write_text(f"0\t0\n{bad}\n")
        with pytest.raises(RecordIOError, match=r"data\.idx, line 2: malformed index line"):
            RecordReader(rec, idx)


def test_duplicate_and_unknown_keys(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(0, b"a"), (1, b"b")])
    reader = RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match=r"data\.idx: no record with key 7"):
        reader.read_idx(7)
    idx.write_text("0\t0\n1\t12\n0\t12\n")
    with pytest.raises(RecordIOError, match=r"data\.idx: key 0 appears more than once"):
        RecordReader(rec, idx)
    with RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as writer:
        writer.write_idx(3, b"x")
        with pytest.raises(RecordIOError, match=r"d\.idx: key 3 written twice"):
            writer.write_idx(3, b"y")


def test_writer_refuses_records_of_2_pow_29_bytes(tmp_path: Path) -> None:
    with mmap.mmap(-1, MAX_RECORD_BYTES + 1) as huge, RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as writer:
        # An anonymous mapping has the length without committing 512 MiB of memory.
        with pytest.raises(RecordIOError, match=r"d\.rec: key 4: record of 536870912 bytes is too large"):
            writer.write_idx(4, huge)
    assert (tmp_path / "d.rec").stat().st_size == 0


def test_layout_errors(tmp_path: Path) -> None:
    rec, idx = _write(tmp_path, [(1, pack(IRHeader(0, 0.0, 1, 0), b"")), (0, pack(IRHeader(0, [3, 5], 0, 0), b""))])
    with pytest.raises(RecordIOError, match=r"data\.idx: image key 2 is missing"):
        read_insightface_layout(RecordReader(rec, idx))
    with pytest.raises(RecordIOError, match=r"sample 2 has label 2 after label 0"):
        write_insightface_layout(tmp_path / "l.rec", tmp_path / "l.idx", [(0, b"a"), (0, b"b"), (2, b"c")])
    with pytest.raises(RecordIOError, match="no samples"):
        write_insightface_layout(tmp_path / "l.rec", tmp_path / "l.idx", [])


# --- images and the property file -------------------------------------------------------------------------------


def test_decode_png_grayscale_and_garbage() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    np.testing.assert_array_equal(decode_image(png.getvalue()), pixels)
    gray = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(gray, format="JPEG", quality=100)
    decoded = decode_image(gray.getvalue())
    assert decoded.shape == (9, 7, 3)
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])
    with pytest.raises(RecordIOError, match="cannot decode a 8-byte image"):
        decode_image(b"notimage")
    with pytest.raises(RecordIOError, match="cannot decode"):
        decode_image(b"\xff\xd8\xff\xe0garbage-after-a-jpeg-marker")


def test_property_file(tmp_path: Path) -> None:
    path = tmp_path / "property"
    write_property_file(path, 85742)
    assert path.read_text() == "85742,112,112\n" and read_property_file(path) == (85742, 112, 112)
    path.write_text("85742;112")
    with pytest.raises(RecordIOError, match=rf"{re.escape(str(path))}: malformed property file"):
        read_property_file(path)
    with pytest.raises(MissingRecordFileError, match="property file not found"):
        read_property_file(tmp_path / "nothing")


def _idx_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_count_records_reads_the_rec_not_the_idx(tmp_path: Path) -> None:
    """The count comes from the frame headers: the same whatever subset of the records the .idx lists, split
    records (an aligned magic word inside, so several frames) counted once."""
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    records = [bytes([k]) * (k % 9) + (MAGIC * 2 if k % 5 == 0 else b"") + b"tail"[: k % 4] for k in range(37)]
    with RecordWriter(rec, idx) as writer:
        for key, record in enumerate(records):
            writer.write_idx(key, record)
    split = sum(MAGIC in r for r in records)
    assert split == 8
    lines = _idx_lines(idx)
    for kept in (lines, lines[::2], lines[1::3], lines[:1], lines[-1:], lines[5:6] + lines[30:31]):
        idx.write_text("".join(kept))
        with RecordReader(rec, idx) as reader:
            assert reader.count_records() == 37 and reader.indexed_records == len(kept)
    # Two keys on one record: one distinct record listed.
    idx.write_text(lines[3] + "99\t" + lines[3].split("\t")[1])
    with RecordReader(rec, idx) as reader:
        assert (len(reader), reader.indexed_records, reader.count_records()) == (2, 1, 37)


def test_count_records_on_the_mxnet_fixture() -> None:
    """The fixture was written by MXNet itself: its .idx is complete, so the two counts agree."""
    for stem in ("magic", "array", "scalar", "insightface/train"):
        with RecordReader(FIXTURES / f"{stem}.rec", FIXTURES / f"{stem}.idx") as reader:
            assert reader.count_records() == reader.indexed_records == len(reader) > 0, stem


def test_count_records_refuses_a_misaligned_offset(tmp_path: Path) -> None:
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordWriter(rec, idx) as writer:
        for key in range(3):
            writer.write_idx(key, b"12345678")
    idx.write_text("0\t0\n1\t18\n2\t32\n")
    with pytest.raises(RecordIOError, match=r"a\.idx: byte offset 18 is not a multiple of 4"):
        RecordReader(rec, idx).count_records()
