"""Bad input through every `python -m` tool: one line on stderr (`error: ...` naming the file), exit status 2, no
traceback, and nothing half-written (write failures come from a real file-size limit, RLIMIT_FSIZE, and from folders
that take no files: a path through a regular file, a path under /proc). Broken models (a checkpoint's model that
fails its checksum, NaN weights) are refused by every reader, never scored."""

from __future__ import annotations

import builtins
import functools
import os
import pickle
import resource
import shutil
import stat
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


def _limit_file_size(limit: int = FILE_SIZE_LIMIT) -> None:
    """In the child: writes past the limit fail with EFBIG (Python ignores SIGXFSZ, so no signal kills it)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_tool(module: str, *args: object, limit_file_size: bool | int = False) -> subprocess.CompletedProcess[str]:
    """`python -m module args`; `limit_file_size`: True for `FILE_SIZE_LIMIT` bytes, or a number of bytes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="80")
    limit = FILE_SIZE_LIMIT if limit_file_size is True else int(limit_file_size)
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=functools.partial(_limit_file_size, limit) if limit_file_size else None,
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
    # 10 pairs, verification's minimum (one per fold): every pair of the 4 faces, and 4 more.
    combos = [(a, b) for a in range(4) for b in range(a + 1, 4)] + [(0, 2), (1, 3), (0, 3), (1, 2)]
    (root / "pairs.txt").write_text("".join(f"p{a}/0.jpg p{b}/0.jpg 0\n" for a, b in combos))
    (root / "empty").mkdir()
    (root / "zero").mkdir()
    (root / "zero" / "train.rec").touch()
    (root / "zero" / "train.idx").touch()
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    jpegs = [(images / f"p{i}" / "0.jpg").read_bytes() for i in range(4)]
    with open(root / "two.bin", "wb") as handle:  # 2 pairs, one genuine and one impostor
        pickle.dump((jpegs, [True, False]), handle, protocol=4)
    with open(root / "ten.bin", "wb") as handle:  # 10 pairs (the folds), 5 genuine and 5 impostor
        pickle.dump(([jpegs[i % 4] for i in range(20)], [i % 2 == 0 for i in range(10)]), handle, protocol=4)
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["fc.weight"][0, :3] = float("nan")
    save_file(nan_state, str(root / "nan.safetensors"), metadata={"network": "r_lite", "embedding_size": "16"})
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
        "two_pair_bin": root / "two.bin",
        "ten_pair_bin": root / "ten.bin",
        "nan": root / "nan.safetensors",
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


def test_verification_of_a_bin_with_fewer_pairs_than_folds(files: dict[str, Path]) -> None:
    proc = run_tool("evaluation.verification", "--weights", files["weights"], "--bin", files["two_pair_bin"])
    assert_one_line(proc, f"file {files['two_pair_bin']}: 2 pairs, fewer than the 10 folds")


def test_build_bin_of_fewer_pairs_than_folds_warns(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "val.bin"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("p0/0.jpg p0/0.jpg 1\np2/0.jpg p3/0.jpg 0\n")
    proc = run_tool("data.tools", "build-bin", pairs, files["images"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 pairs" in proc.stderr and "needs at least 10" in proc.stderr, proc.stderr
    assert out.is_file()


# evaluation.embed, compare, calibrate: outputs


def test_embed_write_failure_keeps_the_old_pair(files: dict[str, Path], tmp_path: Path) -> None:
    """The names file fits under the limit, the array does not: neither is replaced, nothing else is left."""
    out = tmp_path / "e.npy"
    np.save(out, np.zeros((2, 3), np.float32))
    (tmp_path / "e.names.txt").write_text("old1\nold2\n")
    proc = run_tool("evaluation.embed", files["images"], "--model", files["weights"], "--out", out, limit_file_size=300)
    assert_one_line(proc, f"{out}: cannot be written (File too large)")
    np.testing.assert_array_equal(np.load(out), np.zeros((2, 3), np.float32))
    assert (tmp_path / "e.names.txt").read_text() == "old1\nold2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.names.txt", "e.npy"]


@pytest.mark.parametrize("where", ["through a file", "under /proc"])
def test_embed_and_compare_into_a_folder_that_takes_no_files(
    files: dict[str, Path], tmp_path: Path, where: str
) -> None:
    folder = files["file"] / "sub" if where == "through a file" else Path("/proc/arcface-accelerate-test")
    proc = run_tool("evaluation.embed", files["images"], "--model", files["weights"], "--out", folder / "e.npy")
    assert_one_line(proc, str(folder))
    proc = run_tool(
        "evaluation.compare",
        *("--model", files["weights"], "--pairs", files["pairs"], "--image-root", files["images"]),
        *("--out", folder / "scores.csv"),
    )
    assert_one_line(proc, str(folder))


def test_compare_write_failure_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    args = ["--model", files["weights"], "--pairs", files["pairs"], "--image-root", files["images"], "--out", out]
    proc = run_tool("evaluation.compare", *args, limit_file_size=40)  # the header fits, the two rows do not
    assert_one_line(proc, f"{out}: cannot be written (File too large)")
    assert list(tmp_path.iterdir()) == []


def test_calibrate_write_failure_leaves_the_model_untouched(files: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    shutil.copyfile(files["weights"], model)
    model.chmod(0o640)
    before = model.read_bytes()
    proc = run_tool(
        "evaluation.calibrate",
        *("--model", model, "--bin", files["ten_pair_bin"], "--far", "0.5", "--bootstrap", "10"),
        limit_file_size=True,
    )
    assert_one_line(proc, f"{model}: cannot be written (File too large)")
    assert model.read_bytes() == before and stat.S_IMODE(model.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# trainer.export, trainer.convert: values and files they refuse


def test_export_opset_out_of_range(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    proc = run_tool("trainer.export", "onnx", "--weights", files["weights"], "--out", out, "--opset", "99")
    assert_one_line(proc, "--opset 99: not an opset this exporter writes (7 to 20")
    assert not out.exists()


def test_convert_refuses_a_malicious_pickle(files: dict[str, Path], tmp_path: Path) -> None:
    """A real `torch.save` file whose unpickling would call builtins.print (harmless here; os.system elsewhere)."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (builtins.print, ("PAYLOAD RAN",))

    evil = tmp_path / "backbone.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": Payload()}, evil)
    out = tmp_path / "model.safetensors"
    proc = run_tool("trainer.convert", "insightface-backbone", evil, "--network", "r_lite", "--out", out)
    assert_one_line(
        proc, f"{evil}: refused: it would import builtins.print, which a weights file never needs (torch.load"
    )
    assert "PAYLOAD RAN" not in proc.stdout + proc.stderr
    assert not out.exists()


# Broken models: refused by every reader


def _damaged_checkpoint(files: dict[str, Path], root: Path) -> Path:
    """A sealed checkpoint whose model.safetensors was changed afterwards (still a loadable, finite model)."""
    from safetensors.torch import load_file

    from models.run_folder import CheckpointFolder

    folder = CheckpointFolder(root / "run" / "checkpoints" / "step-00000010")
    folder.path.mkdir(parents=True)
    shutil.copyfile(files["weights"], folder.model)
    folder.write_manifest(step=10, world_size=1)
    state = load_file(str(folder.model))
    state["features.bias"] = state["features.bias"] + 0.5
    save_file(state, str(folder.model), metadata={"network": "r_lite", "embedding_size": "16"})
    return folder.path


def test_a_damaged_checkpoint_model_is_refused_by_every_reader(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _damaged_checkpoint(files, tmp_path)
    why = "model.safetensors does not match its checksum in manifest.json"
    proc = run_tool("evaluation.verification", "--weights", checkpoint, "--bin", files["two_pair_bin"])
    assert_one_line(proc, f"checkpoint {checkpoint}: {why}")
    # The other readers, in this process: each exits 2 with the same line and writes nothing.
    from evaluation import calibrate, compare, embed
    from trainer import export

    out = tmp_path / "out"
    commands = {
        export.main: ["onnx", "--weights", str(checkpoint), "--out", str(out / "m.onnx")],
        embed.main: [str(files["images"]), "--model", str(checkpoint), "--out", str(out / "e.npy")],
        compare.main: [
            "--model",
            str(checkpoint),
            str(files["images"] / "p0" / "0.jpg"),
            str(files["images"] / "p1" / "0.jpg"),
        ],
        calibrate.main: ["--model", str(checkpoint), "--bin", str(files["ten_pair_bin"]), "--dry-run"],
    }
    for main, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == EXIT_BAD_INPUT, main.__module__
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and why in err, (main.__module__, err)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_model_with_nan_weights_is_refused(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "hold NaN or infinite values (first: key 'fc.weight', 3 values): a diverged or damaged model, refused"
    proc = run_tool("evaluation.verification", "--weights", files["nan"], "--bin", files["ten_pair_bin"])
    assert_one_line(proc, str(files["nan"]), why)  # not "accuracy 0.5", exit 0
    out = tmp_path / "scores.csv"
    proc = run_tool(
        "evaluation.compare",
        *("--model", files["nan"], "--pairs", files["pairs"], "--image-root", files["images"], "--out", out),
    )
    assert_one_line(proc, str(files["nan"]), why)  # not NaN scores, exit 0
    from trainer import export

    assert export.main(["onnx", "--weights", str(files["nan"]), "--out", str(tmp_path / "m.onnx")]) == EXIT_BAD_INPUT
    assert why in capsys.readouterr().err  # not "max abs difference 0"
    assert list(tmp_path.iterdir()) == []
