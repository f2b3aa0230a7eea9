"""RFW and TinyFace on fixtures written in the releases' layouts (tests/fixtures/rfw.py, tests/fixtures/tinyface.py):
the readers, the metrics against closed forms and brute force, and the CLIs in-process on a small model, checked
against embeddings computed here without the tools."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.io import savemat

from evaluation import rfw, tinyface
from evaluation.verification import compute_accuracy
from models import build_backbone
from tests.fixtures.rfw import GROUPS, RFWFixture, make_rfw_fixture
from tests.fixtures.tinyface import TinyFaceFixture, make_tinyface_fixture

DIM = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=DIM).eval()
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(path),
        metadata={"network": "r_lite", "embedding_size": str(DIM)},
    )
    return path


def reference_embeddings(model: Path, crops: np.ndarray) -> np.ndarray:
    """Flip-summed, L2-normalized embeddings of uint8 (N, 112, 112, 3) RGB crops, without evaluation.embed."""
    from safetensors.torch import load_file

    backbone = build_backbone("r_lite", num_features=DIM).eval()
    backbone.load_state_dict(load_file(str(model)))
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        summed = backbone(x) + backbone(torch.flip(x, dims=[3]))
    return torch.nn.functional.normalize(summed, dim=1).numpy()


# --------------------------------------------------------------------------------------------------------------
# RFW


@pytest.fixture(scope="module")
def rfw_set(tmp_path_factory: pytest.TempPathFactory) -> RFWFixture:
    return make_rfw_fixture(tmp_path_factory.mktemp("rfw"))


def test_rfw_reader_matches_the_fixture(rfw_set: RFWFixture) -> None:
    """The root above `test/` is found; pairs read as written (LFW naming, zero-padded); landmarks keyed by
    identity/file."""
    protocols = rfw.load_protocol(rfw_set.root.parent)
    assert [p.group for p in protocols] == list(GROUPS)
    for protocol in protocols:
        assert protocol.pairs == rfw_set.pairs[protocol.group]
        assert protocol.landmarks is not None and set(protocol.landmarks) == set(rfw_set.faces[protocol.group])


def test_rfw_alignment_recovers_the_faces(rfw_set: RFWFixture) -> None:
    protocol = rfw.load_protocol(rfw_set.root, ["Asian"])[0]
    crops, names = rfw.load_crops(protocol)
    originals = np.stack([rfw_set.faces["Asian"][n] for n in names]).astype(np.float64)
    difference = np.abs(crops.permute(0, 2, 3, 1).numpy() - originals)
    # Interior only (the border mixes in the loose crop's background); JPEG and two resamplings cost a few levels.
    assert difference[:, 8:-8, 8:-8].mean() < 6.0
    unaligned = rfw.load_protocol(rfw_set.root, ["Asian"], align=False)[0]
    assert unaligned.landmarks is None


def test_rfw_reader_errors(tmp_path: Path, rfw_set: RFWFixture) -> None:
    bad = tmp_path / "pairs.txt"
    bad.write_text("m.01\t1\n")
    with pytest.raises(rfw.RFWFormatError, match=r"pairs.txt:1: expected 'name i j'"):
        rfw.read_pairs(bad)
    bad.write_text("/a/b.jpg 0 1 2 3\n")
    with pytest.raises(rfw.RFWFormatError, match="12 fields"):
        rfw.read_landmarks(bad)
    with pytest.raises(rfw.RFWFormatError, match="not an RFW test folder"):
        rfw.load_protocol(tmp_path)
    name = rfw_set.pairs["Indian"][0][0]
    image = rfw_set.root / "data" / "Indian" / name
    moved = image.with_suffix(".moved")
    image.rename(moved)
    try:
        with pytest.raises(rfw.RFWFormatError, match=f"are missing \\(first: {name}\\)"):
            rfw.load_protocol(rfw_set.root, ["Indian"])
    finally:
        moved.rename(image)


def test_rfw_accuracy_closed_form() -> None:
    """Same pairs at distance 0, different pairs orthogonal, m same pairs orthogonal too: with insightface's first
    best threshold (0.01) exactly those m pairs are wrong, fold by fold."""
    pairs, embeddings = [], {}
    wrong = {3, 17, 18, 55}
    for index in range(80):
        a, b = f"a{index}", f"b{index}"
        same = index % 2 == 0 or index in wrong
        embeddings[a] = np.eye(3)[0]
        embeddings[b] = np.eye(3)[0] if same and index not in wrong else np.eye(3)[1]
        pairs.append((a, b, same))
    acc, std = rfw.group_accuracy(embeddings, pairs)
    per_fold = np.array([1 - len([w for w in wrong if fold * 8 <= w < fold * 8 + 8]) / 8 for fold in range(10)])
    assert acc == pytest.approx(per_fold.mean()) and std == pytest.approx(per_fold.std())


def test_rfw_summary_closed_form() -> None:
    groups = [rfw.GroupResult(g, 6000, acc, 0.0) for g, acc in zip(GROUPS, (0.90, 0.95, 0.98, 0.96), strict=True)]
    result = rfw.summarize(groups)
    assert result.mean == pytest.approx(0.9475)
    assert result.std == pytest.approx(math.sqrt(((0.9 - 0.9475) ** 2 + 0.0025**2 + 0.0325**2 + 0.0125**2) / 4))
    assert result.ser == pytest.approx(0.10 / 0.02)
    assert math.isinf(rfw.summarize([*groups[:3], rfw.GroupResult("Indian", 10, 1.0, 0.0)]).ser)


def test_rfw_cli(rfw_set: RFWFixture, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rfw.json"
    assert rfw.main(["--model", str(model), "--root", str(rfw_set.root), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    accuracies = []
    for protocol in rfw.load_protocol(rfw_set.root):
        crops, names = rfw.load_crops(protocol)
        table = dict(zip(names, reference_embeddings(model, crops.permute(0, 2, 3, 1).numpy()), strict=True))
        first = np.stack([table[a] for a, _, _ in protocol.pairs])
        second = np.stack([table[b] for _, b, _ in protocol.pairs])
        acc, std, _ = compute_accuracy(first, second, [s for _, _, s in protocol.pairs])
        group = results["groups"][protocol.group]
        assert group["pairs"] == 40 and group["acc"] == pytest.approx(acc) and group["std"] == pytest.approx(std)
        accuracies.append(acc)
    assert results["mean"] == pytest.approx(np.mean(accuracies)) and results["std"] == pytest.approx(np.std(accuracies))


# --------------------------------------------------------------------------------------------------------------
# TinyFace


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> TinyFaceFixture:
    return make_tinyface_fixture(tmp_path_factory.mktemp("tinyface"))


def test_tinyface_reader_matches_the_fixture(tiny_set: TinyFaceFixture) -> None:
    for root in (tiny_set.root, tiny_set.root.parent, tiny_set.root.parent.parent):
        protocol = tinyface.load_protocol(root)
        assert [p.name for p in protocol.probes] == [n for n, _ in tiny_set.probes]
        assert protocol.probe_ids.tolist() == [i for _, i in tiny_set.probes]
        assert [p.name for p in protocol.gallery[: len(tiny_set.gallery)]] == [n for n, _ in tiny_set.gallery]
        assert protocol.num_distractors == len(tiny_set.distractors)
        assert (protocol.gallery_ids[len(tiny_set.gallery) :] == -1).all()


def test_tinyface_mat_variants(tmp_path: Path) -> None:
    """A cell row instead of a column, and a file without ids (AdaFace's fallback: the number before '_')."""
    path = tmp_path / "probe.mat"
    row = np.empty((1, 2), dtype=object)
    row[0, 0], row[0, 1] = "12_1.jpg", "7_3.jpg"
    savemat(path, {"probe_set": row, "probe_ids": np.array([[12.0, 7.0]])})
    assert tinyface.read_mat_list(path, "probe_set", "probe_ids") == (["12_1.jpg", "7_3.jpg"], pytest.approx([12, 7]))
    savemat(path, {"probe_set": row})
    names, ids = tinyface.read_mat_list(path, "probe_set", "probe_ids")
    assert ids.tolist() == [12, 7]
    with pytest.raises(tinyface.TinyFaceFormatError, match="no 'gallery_set'"):
        tinyface.read_mat_list(path, "gallery_set", "gallery_ids")


def brute_ranks(probes: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray) -> list[int]:
    """Per probe, by a full sort: the position of its first mate when ties are ordered against it (non-mates first)."""
    ranks = []
    for feat, identity in zip(probes, probe_ids, strict=True):
        scores = gallery @ feat
        # Sort by score descending, and among equal scores put non-mates first.
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], gallery_ids[j] == identity))
        ranks.append(next(i for i, j in enumerate(order) if gallery_ids[j] == identity) + 1)
    return ranks


def test_tinyface_identification_against_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.integers(-1, 2, size=(60, 3)).astype(np.float32)  # many exact ties
    gallery_ids = np.r_[rng.integers(0, 8, 40), np.full(20, -1)]
    probes = rng.integers(-1, 2, size=(25, 3)).astype(np.float32)
    probe_ids = rng.integers(0, 9, 25)  # identity 8 has no gallery face: left out
    rates, without = tinyface.identification(probes, probe_ids, gallery, gallery_ids, ranks=(1, 2, 5, 20), chunk=7)
    mated = np.isin(probe_ids, gallery_ids)
    ranks = np.array(brute_ranks(probes[mated], probe_ids[mated], gallery, gallery_ids))
    assert without == int((~mated).sum()) > 0
    assert rates == {k: pytest.approx(float((ranks <= k).mean())) for k in (1, 2, 5, 20)}


def test_tinyface_cli(tiny_set: TinyFaceFixture, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "tinyface.json"
    argv = ["--model", str(model), "--root", str(tiny_set.root.parent.parent), "--out", str(out), "--device", "cpu"]
    assert tinyface.main(argv) == 0
    results = json.loads(out.read_text())

    def embed(paths: list[Path]) -> np.ndarray:
        crops = [np.asarray(Image.open(p).convert("RGB").resize((112, 112), Image.Resampling.BILINEAR)) for p in paths]
        return reference_embeddings(model, np.stack(crops))

    probes = embed([tiny_set.root / "Probe" / n for n, _ in tiny_set.probes])
    gallery_paths = [tiny_set.root / "Gallery_Match" / n for n, _ in tiny_set.gallery]
    gallery_paths += [tiny_set.root / "Gallery_Distractor" / n for n in sorted(tiny_set.distractors)]
    gallery_ids = np.r_[[i for _, i in tiny_set.gallery], np.full(len(tiny_set.distractors), -1)]
    ranks = np.array(brute_ranks(probes, np.array([i for _, i in tiny_set.probes]), embed(gallery_paths), gallery_ids))
    assert results["probes"] == 12 and results["distractors"] == 8 and results["gallery"] == 20
    for k in (1, 5, 20):
        assert results["rank"][str(k)] == pytest.approx(float((ranks <= k).mean()), abs=1e-9)
