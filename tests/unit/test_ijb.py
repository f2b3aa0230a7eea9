"""IJB evaluation: alignment against closed forms, the metrics against brute force on known features, and the real
CLI on a generated IJB-shaped benchmark (`tests/fixtures/ijb.py`): its numbers against brute force on the
embeddings it saved, batch-size invariance, the ablation switches, several models, ONNX, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.alignment import ARCFACE_TEMPLATE, align_face, estimate_similarity, warp_affine
from evaluation.ijb import main, model_specs, shard
from evaluation.ijb_metrics import (
    FAR_TARGETS,
    face_features,
    identification_metrics,
    pair_scores,
    template_features,
    verification_metrics,
)
from tests.fixtures.ijb import IJBFixture, make_ijb_fixture, make_weights

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------------------
# Alignment


def _similarity(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty): ordinary least squares solves it."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_known_similarity_is_recovered_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = _similarity(rng.uniform(0.3, 3.0), rng.uniform(-math.pi, math.pi), tuple(rng.uniform(-80, 80, 2)))
        src = rng.uniform(0, 150, (5, 2))
        np.testing.assert_allclose(estimate_similarity(src, _apply(truth, src)), truth, rtol=0, atol=1e-9)


def test_noisy_landmarks_get_the_least_squares_similarity() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        src = ARCFACE_TEMPLATE + rng.normal(0, 4, (5, 2))
        dst = _apply(_similarity(1.3, 0.4, (10.0, -5.0)), src) + rng.normal(0, 3, (5, 2))
        np.testing.assert_allclose(estimate_similarity(src, dst), _lstsq_similarity(src, dst), atol=1e-9)


def test_mirrored_landmarks_get_the_best_rotation_not_a_reflection() -> None:
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0]) + np.array([120.0, 0.0])
    matrix = estimate_similarity(ARCFACE_TEMPLATE, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    np.testing.assert_allclose(matrix, _lstsq_similarity(ARCFACE_TEMPLATE, mirrored), atol=1e-9)


def test_degenerate_landmarks_are_refused() -> None:
    with pytest.raises(ValueError, match="same point"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_bilinear_warp_of_a_linear_image_is_exact_and_borders_are_zero() -> None:
    height, width = 50, 60
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.repeat((2 * xs + ys + 10).astype(np.uint8)[..., None], 3, axis=2)
    matrix = _similarity(1.4, 0.3, (-20.0, 5.0))
    out = warp_affine(image, matrix, (40, 45))
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    oy, ox = np.mgrid[0:40, 0:45]
    src = _apply(inverse, np.stack([ox.ravel(), oy.ravel()], 1)).reshape(40, 45, 2)
    sx, sy = src[..., 0], src[..., 1]
    # Bilinear interpolation reproduces a linear function exactly where all four neighbours are inside.
    inside = (sx >= 0) & (sx <= width - 1) & (sy >= 0) & (sy <= height - 1)
    expected = 2 * sx + sy + 10
    assert inside.sum() > 300
    assert np.abs(out[..., 0][inside] - expected[inside]).max() <= 0.5 + 1e-9
    # A pixel more than one pixel outside reads only the zero border.
    outside = (sx < -1) | (sx > width) | (sy < -1) | (sy > height)
    assert outside.sum() > 100 and not out[outside].any()
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_alignment_puts_the_landmarks_on_the_template() -> None:
    """Dots drawn at landmarks carried by a known similarity land on the template after alignment."""
    truth = _similarity(1.2, -0.35, (30.0, 12.0))
    landmarks = _apply(truth, ARCFACE_TEMPLATE)
    ys, xs = np.mgrid[0:170, 0:160]
    canvas = np.zeros((170, 160), dtype=np.float64)
    for x, y in landmarks:
        canvas += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
    image = np.repeat(np.clip(np.rint(canvas), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    aligned = align_face(image, landmarks).astype(np.float64)[..., 0]
    assert aligned.shape == (112, 112)
    ay, ax = np.mgrid[0:112, 0:112]
    for x, y in ARCFACE_TEMPLATE:
        window = (np.abs(ax - x) <= 4) & (np.abs(ay - y) <= 4)
        weights = aligned * window
        centroid = np.array([(weights * ax).sum(), (weights * ay).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.15)


# --------------------------------------------------------------------------------------------------------------
# Metrics against brute force


def _brute_templates(features: np.ndarray, templates: list[int], medias: list[int]) -> dict[int, np.ndarray]:
    """Per template: per media the mean of its faces, summed, normalized; written with dictionaries and loops."""
    groups: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for feature, template, media in zip(features, templates, medias, strict=True):
        groups[template][media].append(feature)
    out = {}
    for template, by_media in groups.items():
        total = sum(np.mean(faces, axis=0) for faces in by_media.values())
        out[template] = total / math.sqrt(float(np.dot(total, total)))
    return out


def _brute_face_features(
    embeddings: np.ndarray, flips: np.ndarray | None, det: list[float], norm: bool, det_score: bool
) -> np.ndarray:
    rows = []
    for i, embedding in enumerate(embeddings.astype(np.float64)):
        feature = embedding + flips[i].astype(np.float64) if flips is not None else embedding
        if not norm:
            feature = feature / math.sqrt(float(np.dot(feature, feature)))
        if det_score:
            feature = feature * det[i]
        rows.append(feature)
    return np.array(rows)


def _brute_tar(labels: list[int], scores: list[float], far: float) -> float:
    """Every distinct score as an "accept if >=" threshold gives a (false, true accepts) point; like insightface
    (sklearn's `roc_curve` default) only the staircase's corners are read, plus accept-nothing; the point closest to
    the FAR target wins, ties to the higher TAR. Corners matter on small sets: the last point of a flat stretch shares
    its FAR with the step up after it, so reading every point can land one genuine pair lower."""
    genuine = np.array([s for s, label in zip(scores, labels, strict=True) if label == 1])
    impostor = np.array([s for s, label in zip(scores, labels, strict=True) if label == 0])
    counts = [(int((impostor >= t).sum()), int((genuine >= t).sum())) for t in sorted(set(scores), reverse=True)]
    corners = [counts[0], counts[-1]]
    for before, here, after in zip(counts[:-2], counts[1:-1], counts[2:], strict=True):
        if (here[0] - before[0], here[1] - before[1]) != (after[0] - here[0], after[1] - here[1]):
            corners.append(here)
    points = [(0.0, 0.0)] + [(fa / len(impostor), ta / len(genuine)) for fa, ta in corners]
    return min(points, key=lambda point: (abs(point[0] - far), -point[1]))[1]


def _brute_identification(
    template_feats: dict[int, np.ndarray],
    probes: list[int],
    subject_of: dict[int, int],
    gallery: list[int],
    fpir: float,
) -> dict[str, float]:
    mated_ranks, mated_scores, nonmated_best = [], [], []
    for probe in probes:
        best: dict[int, float] = {}
        for template in gallery:
            score = float(np.dot(template_feats[probe], template_feats[template]))
            best[subject_of[template]] = max(best.get(subject_of[template], -9.0), score)
        subject = subject_of[probe]
        if subject in best:
            mated_ranks.append(sum(1 for s in best.values() if s >= best[subject]))
            mated_scores.append(best[subject])
        else:
            nonmated_best.append(max(best.values()))
    # The lowest threshold (a non-mated score, or -inf) that lets at most fpir of the non-mated probes above it.
    candidates = [-math.inf, *nonmated_best]
    feasible = [t for t in candidates if sum(s > t for s in nonmated_best) <= fpir * len(nonmated_best) + 1e-9]
    threshold = min(feasible)
    hits = sum(1 for r, s in zip(mated_ranks, mated_scores, strict=True) if r == 1 and s > threshold)
    return {
        "rank1": sum(r <= 1 for r in mated_ranks) / len(mated_ranks),
        "rank5": sum(r <= 5 for r in mated_ranks) / len(mated_ranks),
        "rank10": sum(r <= 10 for r in mated_ranks) / len(mated_ranks),
        "tpir": hits / len(mated_ranks),
    }


def _known_features(seed: int, num_subjects: int = 30, dim: int = 8) -> dict[str, Any]:
    """Faces of subjects (centre + noise), in templates of one or more media."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (num_subjects, dim))
    features, templates, medias, subject_of = [], [], [], {}
    template = 0
    for subject in range(num_subjects):
        for _ in range(4):
            template += 1
            subject_of[template] = subject
            for _ in range(int(rng.integers(1, 4))):
                media = int(rng.integers(0, 3))
                features.append(centres[subject] + rng.normal(0, 1.2, dim))
                templates.append(template)
                medias.append(media)
    return {
        "features": np.array(features) * rng.uniform(0.5, 2.0, (len(features), 1)),
        "templates": np.array(templates),
        "medias": np.array(medias),
        "subject_of": subject_of,
    }


def test_tar_at_far_matches_brute_force_on_known_features() -> None:
    data = _known_features(0)
    ids, feats = template_features(data["features"], data["templates"], data["medias"])
    brute = _brute_templates(data["features"], list(data["templates"]), list(data["medias"]))
    assert list(ids) == sorted(brute)
    np.testing.assert_allclose(feats, np.array([brute[t] for t in ids]), atol=1e-12)
    all_templates = sorted(brute)
    t1 = np.array([a for i, a in enumerate(all_templates) for _ in all_templates[i + 1 :]])
    t2 = np.array([b for i, _ in enumerate(all_templates) for b in all_templates[i + 1 :]])
    labels = np.array([int(data["subject_of"][a] == data["subject_of"][b]) for a, b in zip(t1, t2, strict=True)])
    scores = pair_scores(ids, feats, t1, t2)
    brute_scores = [float(np.dot(brute[a], brute[b])) for a, b in zip(t1, t2, strict=True)]
    np.testing.assert_allclose(scores, brute_scores, atol=1e-12)
    result = verification_metrics(labels, scores)
    assert result.num_genuine == 180 and result.num_impostor == len(labels) - 180
    tars = [point.tar for point in result.points]
    assert tars == [_brute_tar(list(labels), brute_scores, far) for far in FAR_TARGETS]
    assert 0 < tars[2] < tars[-1] < 1  # the numbers are informative, not all 0 or 1
    # 6,960 impostor pairs resolve a FAR of 1/6960 and above: 1e-3 and up, not 1e-4 and below.
    assert result.num_impostor == 6960
    assert [point.resolved for point in result.points] == [False, False, False, True, True, True]


def test_far_below_one_impostor_pair_is_not_resolved() -> None:
    labels, scores = np.r_[np.ones(5), np.zeros(1000)], np.r_[np.linspace(0.5, 0.9, 5), np.linspace(-0.5, 0.6, 1000)]
    points = verification_metrics(labels, scores).points
    assert [point.resolved for point in points] == [False, False, False, True, True, True]  # 1e-3 * 1000 = 1
    assert [p.resolved for p in verification_metrics(labels[:-1], scores[:-1]).points][3] is False  # 999 impostors


def test_face_features_follow_the_ablation_switches() -> None:
    embeddings = np.array([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 1.0]]])
    det = np.array([0.5, 2.0])
    np.testing.assert_allclose(face_features(embeddings, det), [[2.0, 2.0], [0.0, 6.0]])
    np.testing.assert_allclose(face_features(embeddings, det, flip=False), [[1.5, 2.0], [0.0, 4.0]])
    np.testing.assert_allclose(face_features(embeddings, det, det_score=False), [[4.0, 4.0], [0.0, 3.0]])
    np.testing.assert_allclose(
        face_features(embeddings, det, norm=False), [[0.5 / math.sqrt(2), 0.5 / math.sqrt(2)], [0.0, 2.0]]
    )


def test_identification_matches_brute_force_on_known_features() -> None:
    data = _known_features(1, num_subjects=40)
    ids, feats = template_features(data["features"], data["templates"], data["medias"])
    brute = _brute_templates(data["features"], list(data["templates"]), list(data["medias"]))
    subject_of = data["subject_of"]
    # Gallery: first template of subjects 0-19, and a second template for subject 3; probes: the rest.
    gallery = [t for t in ids if subject_of[t] < 20 and (t - 1) % 4 == 0] + [int(ids[3 * 4 + 1])]
    probes = [int(t) for t in ids if t not in gallery]
    pick = np.searchsorted(ids, probes)
    gpick = np.searchsorted(ids, sorted(gallery))
    for fpir in (0.01, 0.1, 0.3):
        result = identification_metrics(
            feats[pick],
            np.array([subject_of[t] for t in probes]),
            feats[gpick],
            np.array([subject_of[t] for t in sorted(gallery)]),
            "G1",
            fpir_targets=(fpir,),
        )
        expected = _brute_identification(brute, probes, subject_of, gallery, fpir)
        assert result.num_gallery_subjects == 20 and result.num_gallery_templates == 21
        assert result.num_mated == 20 * 3 - 1 and result.num_nonmated == 20 * 4
        assert [result.cmc[1], result.cmc[5], result.cmc[10]] == pytest.approx(
            [expected["rank1"], expected["rank5"], expected["rank10"]], abs=1e-12
        )
        assert result.tpir[0].tpir == pytest.approx(expected["tpir"], abs=1e-12)
        assert result.tpir[0].fpir <= fpir
    assert 0 < expected["tpir"] < expected["rank1"] < 1


def test_shards_cover_every_face_once_in_order() -> None:
    for num_items in (0, 1, 5, 51):
        for world in (1, 2, 3, 8):
            covered = [i for rank in range(world) for i in shard(num_items, world, rank)]
            assert covered == list(range(num_items))


def test_the_launch_rule_is_the_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`models.launch.process_group_kwargs`, which the trainer and this evaluator both call: several processes
    without CUDA get gloo and Accelerate told it runs on CPUs, except under DeepSpeed (it would switch it off)."""
    import torch

    from models.launch import process_group_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_group_kwargs() == [] and "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert [h.backend for h in process_group_kwargs()] == ["gloo"]  # type: ignore[attr-defined]
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert [h.backend for h in process_group_kwargs()] == ["gloo"]  # type: ignore[attr-defined]
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_group_kwargs() == []


def test_runs_sharing_a_file_name_are_told_apart() -> None:
    specs = model_specs([Path("a/model.safetensors"), Path("b/model.safetensors")], [Path("m/r50.onnx")])
    assert [spec.name for spec in specs] == ["a/model", "b/model", "r50"]
    assert [spec.kind for spec in specs] == ["safetensors", "safetensors", "onnx"]


# --------------------------------------------------------------------------------------------------------------
# The CLI on the generated benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> IJBFixture:
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb"))


@pytest.fixture(scope="module")
def weights(bench: IJBFixture) -> Path:
    return make_weights(bench.root.parent / "r_lite.safetensors")


def _cli(bench: IJBFixture, weights: Path, out: Path, *extra: str, batch_size: int = 64) -> dict[str, Any]:
    argv = ["--weights", str(weights), "--root", str(bench.root), "--target", bench.target, "--out", str(out)]
    argv += ["--batch-size", str(batch_size), "--workers", "0", "--save-features", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def default_run(bench: IJBFixture, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ijb-default")
    _cli(bench, weights, out)
    return out


def _features(out: Path, name: str = "r_lite") -> Any:
    return np.load(out / f"features_{name}.npz")


def _expected_numbers(bench: IJBFixture, embeddings: np.ndarray, flips: np.ndarray | None, **switches: bool) -> dict:
    """Brute-force TARs and 1:N numbers from saved embeddings and the fixture's own record of what it wrote."""
    features = _brute_face_features(embeddings, flips, bench.det_scores, **switches)
    templates = _brute_templates(features, bench.templates, bench.medias)
    labels = [label for _, _, label in bench.pairs]
    scores = [float(np.dot(templates[a], templates[b])) for a, b, _ in bench.pairs]
    out: dict[Any, Any] = {"tar": [_brute_tar(labels, scores, far) for far in FAR_TARGETS], "scores": scores}
    for name, gallery in bench.galleries.items():
        for fpir in (0.01, 0.1):
            numbers = _brute_identification(templates, bench.probes, bench.template_subject, gallery, fpir)
            out[(name, fpir)] = numbers
    return out


def _assert_matches(document: dict, expected: dict, bench: IJBFixture) -> None:
    run = document["runs"][0]
    impostors = sum(1 - label for *_, label in bench.pairs)
    # A FAR below 1 / impostor pairs is not resolved: no TAR is reported for it.
    resolved = [far * impostors >= 1 for far in FAR_TARGETS]
    assert list(run["verification"]["resolved"].values()) == resolved
    assert run["verification"]["lowest_far"] == pytest.approx(1 / impostors)
    want = [tar if ok else None for tar, ok in zip(expected["tar"], resolved, strict=True)]
    assert list(run["verification"]["tar_at_far"].values()) == pytest.approx(want, abs=1e-12)
    assert [value is None for value in run["verification"]["threshold"].values()] == [not ok for ok in resolved]
    for name in bench.galleries:
        got = run["identification"][name]
        for fpir in (0.01, 0.1):
            want = expected[(name, fpir)]
            assert got["cmc"] == pytest.approx({k: want[k] for k in ("rank1", "rank5", "rank10")}, abs=1e-12)
            assert got["tpir_at_fpir"][f"{fpir:g}"] == pytest.approx(want["tpir"], abs=1e-12)


def test_cli_numbers_match_brute_force_on_its_embeddings(bench: IJBFixture, default_run: Path) -> None:
    document = json.loads((default_run / "results.json").read_text())
    saved = _features(default_run)
    expected = _expected_numbers(bench, saved["embeddings"], saved["embeddings_flip"], norm=True, det_score=True)
    _assert_matches(document, expected, bench)
    np.testing.assert_allclose(saved["pair_scores"], expected["scores"], atol=1e-9)
    assert document["protocol"] == {
        "faces": len(bench.image_names),
        "templates": len(bench.template_subject),
        "pairs": len(bench.pairs),
        "genuine_pairs": sum(label for *_, label in bench.pairs),
        "impostor_pairs": sum(1 - label for *_, label in bench.pairs),
        "galleries": {name: len(templates) for name, templates in bench.galleries.items()},
        "probes": len(bench.probes),
    }
    assert document["settings"] == {"flip": True, "norm": True, "det_score": True}
    identification = document["runs"][0]["identification"]
    for key in ("cmc", "tpir_at_fpir"):
        for name, value in identification["mean"][key].items():
            assert value == pytest.approx(np.mean([identification[g][key][name] for g in bench.galleries]))
    for gallery in bench.galleries:
        assert identification[gallery]["nonmated_probes"] == 12
        for target, fpir in identification[gallery]["fpir_read"].items():
            assert fpir <= float(target)
    # The random backbone still tells the rendered identities apart somewhat: the numbers carry information.
    tars = [tar for tar in document["runs"][0]["verification"]["tar_at_far"].values() if tar is not None]
    assert len(tars) == 2 and 0 < tars[0] < tars[-1] < 1  # FAR 1e-2 and 1e-1 of ~450 impostor pairs
    assert (default_run / "roc_ijbc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_size_does_not_change_the_numbers(
    bench: IJBFixture, weights: Path, default_run: Path, tmp_path: Path
) -> None:
    document = _cli(bench, weights, tmp_path, batch_size=20)
    reference = json.loads((default_run / "results.json").read_text())
    assert document["extraction"]["batch_size"] == 20
    got, want = document["runs"][0], reference["runs"][0]
    assert got["verification"]["tar_at_far"] == want["verification"]["tar_at_far"]
    assert got["verification"]["auc"] == pytest.approx(want["verification"]["auc"], abs=1e-12)
    assert got["verification"]["threshold"] == pytest.approx(want["verification"]["threshold"], abs=1e-5)
    for name in bench.galleries:
        assert got["identification"][name]["cmc"] == want["identification"][name]["cmc"]
        assert got["identification"][name]["tpir_at_fpir"] == want["identification"][name]["tpir_at_fpir"]
    np.testing.assert_allclose(_features(tmp_path)["pair_scores"], _features(default_run)["pair_scores"], atol=1e-5)


@pytest.mark.parametrize("switch", ["--no-norm", "--no-det-score", "--no-flip"])
def test_ablation_switches(bench: IJBFixture, weights: Path, default_run: Path, tmp_path: Path, switch: str) -> None:
    """Each switch gives what brute force computes for that setting from the default run's embeddings."""
    document = _cli(bench, weights, tmp_path, switch)
    reference = _features(default_run)
    saved = _features(tmp_path)
    settings = {"norm": switch != "--no-norm", "det_score": switch != "--no-det-score"}
    flips = None if switch == "--no-flip" else reference["embeddings_flip"]
    expected = _expected_numbers(bench, reference["embeddings"], flips, **settings)
    _assert_matches(document, expected, bench)
    assert document["settings"] == {"flip": switch != "--no-flip", **settings}
    assert ("embeddings_flip" in saved) == (switch != "--no-flip")
    # The switch did change the scores, by far more than float rounding.
    assert np.abs(saved["pair_scores"] - reference["pair_scores"]).max() > 1e-3


@pytest.mark.fast_launch
def test_subprocess_cli_with_two_models(bench: IJBFixture, weights: Path, tmp_path: Path) -> None:
    other = make_weights(tmp_path / "other.safetensors", seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evaluation.ijb", "--weights", str(weights), "--weights", str(other)]
    cmd += ["--root", str(bench.root), "--out", str(out), "--workers", "0", "--batch-size", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="2", COLUMNS="160")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IJBC 1:1 verification" in proc.stdout and "TPIR@FPIR=0.01" in proc.stdout
    # FAR 1e-6 ... 1e-3 are below 1 / impostor pairs: marked, not printed as measured TARs.
    impostors = sum(1 - label for *_, label in bench.pairs)
    rows = [line for line in proc.stdout.splitlines() if line.lstrip("│ ").startswith(("r_lite", "other"))][:2]
    assert all(row.count("n/r") == 4 for row in rows), proc.stdout
    assert f"n/r: not resolved, a FAR below 1/{impostors}" in proc.stdout
    document = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in document["runs"]] == ["r_lite", "other"]
    assert document["runs"][0]["verification"] != document["runs"][1]["verification"]
    assert (out / "roc_ijbc.png").stat().st_size > 10_000


def test_onnx_model_gives_the_same_numbers(bench: IJBFixture, weights: Path, default_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from models import build_backbone

    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    backbone = build_backbone(metadata["network"], num_features=int(metadata["embedding_size"]), dropout=0.0)
    backbone.load_state_dict(load_file(str(weights)))
    onnx_path = tmp_path / "r_lite.onnx"
    # A fixed batch of 3 on purpose: the evaluator must feed such models in chunks and pad the last one.
    torch.onnx.export(
        backbone.eval(), (torch.zeros(3, 3, 112, 112),), str(onnx_path), input_names=["data"], dynamo=False
    )
    out = tmp_path / "out"
    argv = ["--onnx", str(onnx_path), "--root", str(bench.root), "--out", str(out), "--workers", "0"]
    assert main([*argv, "--batch-size", "64", "--save-features"]) == 0
    document = json.loads((out / "results.json").read_text())
    reference = json.loads((default_run / "results.json").read_text())
    assert document["runs"][0]["model"]["kind"] == "onnx"
    assert document["runs"][0]["verification"]["tar_at_far"] == reference["runs"][0]["verification"]["tar_at_far"]
    assert document["runs"][0]["identification"]["G1"]["cmc"] == reference["runs"][0]["identification"]["G1"]["cmc"]
    np.testing.assert_allclose(_features(out)["embeddings"], _features(default_run)["embeddings"], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line naming the file (and line)


def _copy(bench: IJBFixture, tmp_path: Path, copy_images: bool = False) -> IJBFixture:
    root = tmp_path / bench.target
    shutil.copytree(bench.meta, root / "meta")
    if copy_images:
        shutil.copytree(bench.root / "loose_crop", root / "loose_crop")
    else:
        (root / "loose_crop").symlink_to(bench.root / "loose_crop")
    copy = IJBFixture(**{**bench.__dict__, "root": root})
    return copy


def _rewrite_line(path: Path, number: int, edit: Any) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("".join(lines))


def _drop_last_value(line: str) -> str:
    return " ".join(line.split()[:-1]) + "\n"


BAD_INPUTS = {
    "missing pair file": (lambda b: b.meta_file("pairs").unlink(), "pairs", None, "file not found"),
    "missing face list": (lambda b: b.meta_file("faces").unlink(), "faces", None, "file not found"),
    "missing 1:N probe file": (lambda b: b.meta_file("probes").unlink(), "probes", None, "1:N needs"),
    "landmark row short": (
        lambda b: _rewrite_line(b.meta_file("landmarks"), 5, _drop_last_value),
        "landmarks",
        5,
        "expected 12 values",
    ),
    "landmark not a number": (
        lambda b: _rewrite_line(b.meta_file("landmarks"), 3, lambda line: line.replace(" ", " x", 1)),
        "landmarks",
        3,
        "not a number",
    ),
    "face list out of order": (
        lambda b: _rewrite_line(b.meta_file("landmarks"), 2, lambda line: "zzz.jpg " + line.split(" ", 1)[1]),
        "landmarks",
        2,
        "same order",
    ),
    "pair row short": (lambda b: _rewrite_line(b.meta_file("pairs"), 7, _drop_last_value), "pairs", 7, "expected 3"),
    "pair label not 0/1": (
        lambda b: _rewrite_line(b.meta_file("pairs"), 4, lambda line: line.rsplit(" ", 1)[0] + " 7\n"),
        "pairs",
        4,
        "label 7",
    ),
    "pair with unknown template": (
        lambda b: _rewrite_line(b.meta_file("pairs"), 9, lambda line: "99999 " + line.split(" ", 1)[1]),
        "pairs",
        9,
        "template 99999",
    ),
    "1:N template without faces": (
        lambda b: _rewrite_line(b.meta_file("gallery2"), 3, lambda line: "88888," + line.split(",", 1)[1]),
        "gallery2",
        3,
        "template 88888",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_meta_files_give_one_line_naming_file_and_line(
    bench: IJBFixture, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    corrupt, kind, line, words = BAD_INPUTS[case]
    copy = _copy(bench, tmp_path)
    corrupt(copy)
    argv = ["--weights", str(weights), "--root", str(copy.root), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    where = str(copy.meta_file(kind)) + ("" if line is None else f":{line}:")
    assert where in err and words in err, err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("problem", ["absent", "not an image"])
def test_bad_images_give_one_line_naming_the_landmark_line(
    bench: IJBFixture, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    copy = _copy(bench, tmp_path, copy_images=True)
    number = 6
    image = copy.root / "loose_crop" / copy.image_names[number - 1]
    if problem == "absent":
        image.unlink()
    else:
        image.write_bytes(b"this is not a JPEG")
    argv = ["--weights", str(weights), "--root", str(copy.root), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"{copy.meta_file('landmarks')}:{number}:" in err and str(image) in err, err


def test_bad_weights_and_missing_models(bench: IJBFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    assert main(["--weights", str(missing), "--root", str(bench.root), "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--root", str(bench.root)])
    assert info.value.code == 2
