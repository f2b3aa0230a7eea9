"""IJB evaluation across processes: `accelerate launch` with 2 CPU processes (gloo) gives the numbers of 1 process,
and an unreadable image on one rank ends every rank with the error instead of a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.ijb import main
from tests.fixtures.ijb import IJBFixture, make_ijb_fixture, make_weights

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

REPO = Path(__file__).resolve().parents[2]
TWO_PROCESSES = REPO / "accelerate_configs" / "cpu_ddp_2proc.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`accelerate launch` of the evaluator on 2 processes, on a free port (other tests may hold the config's)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCESSES)]
    cmd += ["--main_process_port", str(_free_port()), "-m", "evaluation.ijb", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="160")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> IJBFixture:
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb-dist"))


@pytest.fixture(scope="module")
def weights(bench: IJBFixture) -> Path:
    return make_weights(bench.root.parent / "r_lite.safetensors")


def test_two_processes_give_the_numbers_of_one(bench: IJBFixture, weights: Path, tmp_path: Path) -> None:
    common = ["--weights", str(weights), "--root", str(bench.root), "--workers", "0", "--save-features"]
    # 51 faces do not split evenly: the second rank's share is one face shorter and gets padded for the gather.
    assert len(bench.image_names) % 2 == 1
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "64"]) == 0
    proc = _launch([*common, "--out", str(tmp_path / "two"), "--batch-size", "10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["extraction"]["processes"] == 1 and two["extraction"]["processes"] == 2
    got, want = two["runs"][0], one["runs"][0]
    assert got["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
    assert got["verification"]["auc"] == pytest.approx(want["verification"]["auc"], abs=1e-12)
    for gallery in bench.galleries:
        assert got["identification"][gallery]["cmc"] == want["identification"][gallery]["cmc"]
        assert got["identification"][gallery]["tpir_at_fpir"] == want["identification"][gallery]["tpir_at_fpir"]
    features_one = np.load(tmp_path / "one" / "features_r_lite.npz")
    features_two = np.load(tmp_path / "two" / "features_r_lite.npz")
    # Same faces in the same order: gathered embeddings match the single process's row by row.
    np.testing.assert_allclose(features_two["embeddings"], features_one["embeddings"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features_two["pair_scores"], features_one["pair_scores"], atol=1e-5)
    assert (tmp_path / "two" / "roc_ijbc.png").is_file()


def test_an_unreadable_image_on_one_rank_stops_both(bench: IJBFixture, weights: Path, tmp_path: Path) -> None:
    images = tmp_path / "IJBC" / "loose_crop"
    images.mkdir(parents=True)
    (tmp_path / "IJBC" / "meta").symlink_to(bench.meta)
    for name in bench.image_names:
        (images / name).symlink_to(bench.root / "loose_crop" / name)
    # Face 45 of 51 lies in the second rank's share (faces 27-51).
    broken = images / bench.image_names[44]
    broken.unlink()
    broken.write_bytes(b"not a JPEG at all")
    args = ["--weights", str(weights), "--root", str(tmp_path / "IJBC"), "--out", str(tmp_path / "out")]
    proc = _launch([*args, "--workers", "0", "--batch-size", "32"], timeout=120)
    assert proc.returncode != 0
    landmarks = tmp_path / "IJBC" / "meta" / bench.meta_file("landmarks").name
    assert f"{landmarks}:45:" in proc.stderr and str(broken) in proc.stderr, proc.stderr[-3000:]
    assert "process 1 could not read an image" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "results.json").exists()
