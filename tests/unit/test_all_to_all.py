"""All-to-all 1:1 (evaluation.all_to_all): the chunked selection against a brute-force computation of every pair
(exact, ties included), per group, the inputs and the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from evaluation.all_to_all import AllToAllError, Labelled, all_to_all, main, read_embeddings, read_groups


def brute_force(embeddings: np.ndarray, labels: np.ndarray, far_targets: tuple[float, ...]) -> list[tuple]:
    """Every pair's score in float64, sorted: (threshold, TAR, FAR) per target, calibrate.py's convention written
    out: k = floor(FAR x n), the threshold the (k+1)-th largest impostor score, TAR the genuine share above it."""
    scores = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    upper = np.triu_indices(len(embeddings), k=1)
    pair_scores = scores[upper]
    same = (labels[:, None] == labels[None, :])[upper]
    genuine, impostor = pair_scores[same], np.sort(pair_scores[~same])[::-1]
    out = []
    for far in far_targets:
        k = min(int(np.floor(far * len(impostor) + 1e-9)), len(impostor) - 1)
        threshold = impostor[k]
        out.append(
            (threshold, float((genuine > threshold).mean()), float((impostor > threshold).sum() / len(impostor)))
        )
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_exact_against_every_pair_with_ties(seed: int, block: int) -> None:
    """Small integer vectors: every dot product is exact in float32 and many scores tie, at the threshold too. Tiny
    blocks and a tiny buffer make the selection cut its candidates many times."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(30, 90))
    embeddings = rng.integers(-2, 3, size=(count, 3)).astype(np.float32)
    labels = rng.integers(0, 9, size=count)
    far_targets = (0.001, 0.01, 0.05, 0.3)
    result = all_to_all(embeddings, labels, far_targets, block=block, min_buffer=3)
    expected = brute_force(embeddings, labels, far_targets)
    assert (
        len(set(np.round(embeddings @ embeddings.T).ravel())) <= 25
    )  # 25 distinct scores for thousands of pairs: ties
    for point, (threshold, tar, far) in zip(result.points, expected, strict=True):
        assert (point.threshold, point.tar, point.far) == (threshold, tar, far)
        assert point.far <= point.far_target or not point.resolved


def test_random_unit_vectors_against_float64() -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 16))
    labels = rng.integers(0, 40, 400)
    embeddings = centres[labels] + 0.8 * rng.standard_normal((400, 16))
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    far_targets = (1e-4, 1e-3, 1e-2)
    result = all_to_all(embeddings, labels, far_targets, block=37, min_buffer=50)
    for point, (threshold, tar, far) in zip(result.points, brute_force(embeddings, labels, far_targets), strict=True):
        assert point.threshold == pytest.approx(threshold, abs=1e-6)
        assert point.tar == tar and point.far == far
    sizes = np.bincount(labels)
    assert result.num_genuine == int((sizes * (sizes - 1) // 2).sum())
    assert result.num_genuine + result.num_impostor == 400 * 399 // 2


def test_unresolved_far_and_refusals() -> None:
    embeddings = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 3]]
    result = all_to_all(embeddings, np.array([0, 0, 1, 1, 2, 3]), (1e-6, 0.5))
    low, half = result.points
    assert not low.resolved and low.allowed_false_accepts == 0 and low.threshold == 0.0  # the top impostor score
    assert half.resolved and half.allowed_false_accepts == 6  # 13 impostor pairs
    with pytest.raises(AllToAllError, match="no impostor pair"):
        all_to_all(embeddings[:2], np.array([0, 0]))
    with pytest.raises(AllToAllError, match="no genuine pair"):
        all_to_all(embeddings[:3], np.array([0, 1, 2]))


def test_groups_are_their_own_pairs(tmp_path: Path) -> None:
    """A group is evaluated on the pairs inside it: the same numbers as the metric on that subset alone."""
    rng = np.random.default_rng(0)
    embeddings = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    identities = [f"id{v}" for v in rng.integers(0, 10, 60)]
    names = [f"{identity}/{i}.jpg" for i, identity in enumerate(identities)]
    path = tmp_path / "emb.safetensors"
    save_file({"embeddings": embeddings}, str(path), metadata={"names": json.dumps(names)})
    groups = tmp_path / "groups.csv"
    # By identity for most, one image overriding its identity's group, one identity without a group.
    lines = ["name,group"] + [f"id{v},{'A' if v < 5 else 'B'}" for v in range(9)] + [f"{names[0]},B"]
    groups.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.json"
    assert main(["--embeddings", str(path), "--groups", str(groups), "--far", "0.01", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    loaded, labelled = read_embeddings(path)
    assignment = read_groups(groups, labelled)
    assert assignment[0] == "B" and all(g is None for g, i in zip(assignment, identities, strict=True) if i == "id9")
    normalized = loaded / np.linalg.norm(loaded, axis=1, keepdims=True)
    for group in ("A", "B"):
        members = np.array([g == group for g in assignment])
        labels = np.unique(np.array(identities)[members], return_inverse=True)[1]
        ((threshold, tar, _),) = brute_force(normalized[members].astype(np.float32), labels, (0.01,))
        assert results[group]["tar_at_far"]["0.01"] == pytest.approx(tar)
        assert results[group]["threshold"]["0.01"] == pytest.approx(threshold, abs=1e-6)
        assert results[group]["num_images"] == int(members.sum())
    assert results["all"]["num_images"] == 60


def test_inputs(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_file({"embeddings": np.ones((3, 2), np.float32), "labels": np.array([4, 4, 7])}, str(path))
    _, labelled = read_embeddings(path)
    assert labelled.identities == ["4", "4", "7"]
    save_file({"embeddings": np.ones((2, 2), np.float32)}, str(path), metadata={"names": json.dumps(["a.jpg", "b"])})
    with pytest.raises(AllToAllError, match="not <identity>/<image> paths"):
        read_embeddings(path)
    groups = tmp_path / "g.csv"
    groups.write_text("x,A\n")
    with pytest.raises(AllToAllError, match="no image or identity"):
        read_groups(groups, Labelled(["a/1.jpg"], ["a"]))
    groups.write_text("a,A,extra\n")
    with pytest.raises(AllToAllError, match="row 1"):
        read_groups(groups, Labelled(["a/1.jpg"], ["a"]))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--embeddings", str(tmp_path / "absent.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "absent.safetensors" in err
