"""Data that disagrees with itself, through the real CLI (`python -m trainer.main`): one line on stderr naming both
sides, exit status 2, nothing trained."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from data.recordio import IRHeader, RecordWriter, pack
from models.errors import EXIT_BAD_INPUT
from tests.launching import REPO, TINY, env_for

pytestmark = [pytest.mark.e2e, pytest.mark.tier2]


def _headers_only(root: Path, labels: list[int]) -> Path:
    """A plain im2rec folder (no layout record): labels in the headers, a few payload bytes (the run stops before
    any image is decoded)."""
    root.mkdir(parents=True)
    with RecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, label in enumerate(labels):
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), b"not decoded"))
    return root


def _cut_idx(root: Path) -> str:
    lines = (root / "train.idx").read_text().splitlines(keepends=True)
    (root / "train.idx").write_text("".join(lines[:40]))
    return f"{root / 'train.idx'} lists 40 records, but {root / 'train.rec'} holds 109"


def _wrong_property(root: Path) -> str:
    (root / "property").write_text("50,112,112\n")
    return f"{root / 'property'} says 50 classes, but the labels of {root / 'train.rec'} span 12 (0..11)"


@pytest.mark.parametrize("damage", [_cut_idx, _wrong_property], ids=["idx_lists_40_of_109", "property_50_of_12"])
def test_inconsistent_recordio_is_one_line_and_exit_2(tmp_path: Path, damage: Callable[[Path], str]) -> None:
    root = _headers_only(tmp_path / "data", [k % 12 for k in range(109)])
    expected = damage(root)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "--config", str(TINY), "--data.source", "recordio"]
        + ["--data.root", str(root), "--output", str(out)],
        cwd=REPO,
        env=env_for(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
