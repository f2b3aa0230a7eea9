"""README's "Using the trained model" walk-through, run as written (the block between its walkthrough markers) on a
tiny run's output in place of `runs/default`: every command must succeed, in order, from a fresh folder."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from evaluation.card import read_card, read_model_metadata
from tests.launching import REPO, env_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]

BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"


def walkthrough() -> str:
    """The bash code of README.md's walk-through block."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, "the walk-through block holds no ```bash code"
    return match.group(1)


def test_readme_walkthrough_runs_as_written(tiny_run: Path, face_cache: Path, tmp_path: Path) -> None:
    script = walkthrough()
    tiny_run = shutil.copytree(tiny_run, tmp_path / "run")  # the session's tiny run: the walk-through changes it
    assert "runs/default" in script
    work = tmp_path / "clone"
    work.mkdir()
    (work / "runs").mkdir()
    (work / "runs" / "default").symlink_to(tiny_run)  # the walk-through's run folder is the tiny run
    env = dict(env_for(face_cache), PYTHONPATH=str(REPO), COLUMNS="200")
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # What the steps left, each checked for its content.
    assert (work / "val_faces" / "pairs.txt").read_text().splitlines()[0].endswith(("0", "1"))
    stored = load_file(str(work / "val.safetensors"))
    assert stored["embeddings"].shape == (80, 32) and stored["norms"].shape == (80,)
    with (work / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and {row["same"] for row in rows} <= {"0", "1"} and rows[0]["same"] != ""
    model = tiny_run / "model.safetensors"
    metadata = read_model_metadata(model)
    assert "calibration" in metadata
    card = read_card(model)
    assert {"verification", "all_to_all"} <= set(card["results"]) and card["training"]["licence"] == "not stated"
    readme = (tiny_run / "README.md").read_text()
    assert "Calibrated threshold" in readme and "All-to-all" in readme
    int8 = read_card(work / "model_int8.onnx")
    assert int8["results"]["int8"]["values"]["cosine_int8_fp32"]["mean"] >= 0.99
    assert json.loads(read_model_metadata(work / "model.onnx")["card"])["format"]["file"] == "onnx"
    assert "model r_lite (32-d): input aligned 112x112 RGB" in proc.stdout  # compare and embed say how to feed it
    assert os.path.isfile(work / "model_int8.onnx.README.md")
