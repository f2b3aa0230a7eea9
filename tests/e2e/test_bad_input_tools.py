"""Bad input through every `python -m` tool: one line on stderr (`error: ...` naming the file), exit status 2, no
traceback, and nothing half-written (write failures come from a real file-size limit, RLIMIT_FSIZE)."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data.faces import encode_jpeg, identity_params, render_face
from models import build_backbone
from models.errors import EXIT_BAD_INPUT

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]

REPO = Path(__file__).resolve().parents[2]
# Small enough that every output below exceeds it: r_lite's weights are ~2 MB, the .bin ~12 kB.
FILE_SIZE_LIMIT = 4096


def _limit_file_size() -> None:
    """In the child: writes past the limit fail with EFBIG (Python ignores SIGXFSZ, so no signal kills it)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def run_tool(module: str, *args: object, limit_file_size: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size if limit_file_size else None,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 and exactly one stderr line, `error: ...` with every word in it (a narrow COLUMNS must not wrap it)."""
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=16)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    weights = root / "model.safetensors"
    save_file(state, str(weights), metadata={"network": "r_lite", "embedding_size": "16"})
    torch.save(state, root / "backbone.pth")
    images = root / "faces"
    rng = np.random.default_rng(0)
    for i in range(4):
        (images / f"p{i}").mkdir(parents=True)
        (images / f"p{i}" / "0.jpg").write_bytes(encode_jpeg(render_face(identity_params(0, i), rng), 90))
    (root / "pairs.txt").write_text("p0/0.jpg p1/0.jpg 0\np2/0.jpg p3/0.jpg 0\n")
    (root / "empty").mkdir()
    (root / "zero").mkdir()
    (root / "zero" / "train.rec").touch()
    (root / "zero" / "train.idx").touch()
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    return {
        "root": root,
        "weights": weights,
        "pth": root / "backbone.pth",
        "images": images,
        "pairs": root / "pairs.txt",
        "empty": root / "empty",
        "zero": root / "zero",
        "file": root / "a_file",
        "folder": root / "a_folder",
    }


def _no_leftovers(folder: Path, name: str) -> None:
    """Neither the output nor its temporary file (`.<name>.tmp`) exists."""
    assert not (folder / name).exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{name}")]


# data.tools


def test_pack_an_empty_image_folder(files: dict[str, Path], tmp_path: Path) -> None:
    proc = run_tool("data.tools", "pack", files["empty"], tmp_path / "out")
    assert_one_line(proc, str(files["empty"]), "no identity sub-folders")


def test_pack_into_a_path_that_is_a_file(files: dict[str, Path]) -> None:
    proc = run_tool("data.tools", "pack", files["images"], files["file"])
    assert_one_line(proc, f"{files['file']}: is a file, expected an output folder")


def test_inspect_a_zero_byte_rec_and_idx(files: dict[str, Path]) -> None:
    proc = run_tool("data.tools", "inspect", files["zero"])
    assert_one_line(proc, str(files["zero"] / "train.idx"), "lists no records")


def test_build_bin_write_failure_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "val.bin"
    proc = run_tool("data.tools", "build-bin", files["pairs"], files["images"], out, limit_file_size=True)
    assert_one_line(proc, f"{out}: cannot be written (File too large)")
    _no_leftovers(tmp_path, "val.bin")


# trainer.convert


def test_convert_to_a_path_that_is_a_folder(files: dict[str, Path]) -> None:
    proc = run_tool(
        "trainer.convert", "insightface-backbone", files["pth"], "--network", "r_lite", "--out", files["folder"]
    )
    assert_one_line(proc, f"{files['folder']}: is a folder, expected a file path")
    assert list(files["folder"].iterdir()) == []


def test_convert_write_failure_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    proc = run_tool(
        "trainer.convert",
        "insightface-backbone",
        files["pth"],
        "--network",
        "r_lite",
        "--out",
        out,
        limit_file_size=True,
    )
    assert_one_line(proc, f"{out}: cannot be written (", "File too large")
    _no_leftovers(tmp_path, "model.safetensors")


# trainer.export


def test_export_a_folder_without_weights(files: dict[str, Path], tmp_path: Path) -> None:
    proc = run_tool("trainer.export", "onnx", "--weights", files["empty"], "--out", tmp_path / "m.onnx")
    assert_one_line(proc, f"{files['empty']}: a folder without model.safetensors")


def test_export_write_failure_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    proc = run_tool("trainer.export", "onnx", "--weights", files["weights"], "--out", out, limit_file_size=True)
    assert_one_line(proc, f"{out}: cannot be written (File too large)")
    _no_leftovers(tmp_path, "model.onnx")


# evaluation.verification


def test_verification_of_a_malicious_bin(files: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Evil()], [True]), protocol=5))
    proc = run_tool("evaluation.verification", "--weights", files["weights"], "--bin", evil)
    assert_one_line(proc, f"file {evil}: refusing to unpickle global")
    assert not marker.exists()


# evaluation.ijb


def test_ijb_output_path_that_is_a_file(files: dict[str, Path]) -> None:
    proc = run_tool("evaluation.ijb", "--weights", files["weights"], "--root", files["root"], "--out", files["file"])
    assert_one_line(proc, f"{files['file']}: is a file, expected an output folder")
