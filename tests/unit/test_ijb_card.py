"""`evaluation.ijb --card`: each model's 1:1 TARs go into its card, the same numbers as results.json."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.card import read_card
from evaluation.ijb import main
from tests.fixtures.ijb import make_ijb_fixture, make_weights


def test_ijb_results_go_into_the_card(tmp_path: Path) -> None:
    bench = make_ijb_fixture(tmp_path / "ijb", num_subjects=6, templates_per_subject=3)
    weights = make_weights(tmp_path / "model.safetensors")
    out = tmp_path / "out"
    argv = ["--weights", str(weights), "--root", str(bench.root), "--target", bench.target, "--out", str(out)]
    assert main([*argv, "--workers", "0", "--card"]) == 0
    document = json.loads((out / "results.json").read_text())
    section = read_card(weights)["results"]["ijb_ijbc"]
    assert section["values"]["tar_at_far"] == document["runs"][0]["verification"]["tar_at_far"]
    assert section["values"]["pairs"] == len(bench.pairs)
    readme = (tmp_path / "model.safetensors.README.md").read_text()
    assert "### IJBC" in readme and "TAR@FAR=1e-01" in readme
