"""Every bench script runs in its `--tiny` mode (seconds) and writes its JSON; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.tier2  # runs the bench scripts (docs/testing.md)

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Scripts whose --tiny run tests/unit/test_bench_train.py makes and checks field by field: not run twice.
CHECKED_IN_BENCH_TRAIN = {"train_step.py", "speed.py", "head_scaling.py", "gpu_bench.py", "plot.py"}
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if path.name not in CHECKED_IN_BENCH_TRAIN)


def _run_tiny(script: Path, folder: Path) -> dict[str, Any]:
    out = folder / f"{script.stem}.json"
    # From another folder, as a user would run it: the script must find the project itself.
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(out)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def data_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_tiny(BENCH / "data.py", tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bench_script_runs_tiny(script: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # data.py's run is shared with the test below; the figures themselves depend on the machine.
    assert request.getfixturevalue("data_results") if script.name == "data.py" else _run_tiny(script, tmp_path)


def test_every_bench_script_runs_tiny_somewhere() -> None:
    source = (Path(__file__).parent / "test_bench_train.py").read_text()
    for name in CHECKED_IN_BENCH_TRAIN:
        assert (BENCH / name).is_file() and f'_run("{name}", folder, "--tiny"' in source, name


def test_data_bench_reports_every_path(data_results: dict[str, Any]) -> None:
    assert set(data_results["raw_decode"]) >= {"simplejpeg", "pillow"}
    face_loader = {"uint8/FaceLoader", "uint8/FaceLoader, flip on device"}
    assert set(data_results["loader"]) == {"float/per-sample", "float/batched", "uint8/batched"} | face_loader
    assert all(set(data_results["loader"][name]) == {"0", "1"} for name in face_loader)
    cpu = data_results["device_side"]["cpu"]
    assert 0 < cpu["normalize_us_per_image"] and 0 < cpu["normalize_and_flip_us_per_image"]
    assert set(data_results["loader"]["uint8/batched"]) == {"0", "1"}
    assert set(data_results["dataset_in_process"]) == {"float", "uint8"}
    rates = [value["images_per_s"] for by_workers in data_results["loader"].values() for value in by_workers.values()]
    assert all(rate > 0 for rate in rates)
    assert "--tiny" in data_results["command"] and data_results["images"] == 64


def test_data_bench_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "data.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and all(flag in proc.stdout for flag in ("--gpu", "--tiny", "--out", "--root"))
