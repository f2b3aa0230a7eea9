"""Verification: the restricted `.bin` loader, the 10-fold protocol against hand and brute-force numbers, the trainer
callback and the CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from data.faces import encode_jpeg, identity_params, render_face
from evaluation.verification import (
    NUM_FOLDS,
    THRESHOLDS,
    BinFormatError,
    NonFiniteEmbeddingsError,
    VerificationCallback,
    check_bin,
    compute_accuracy,
    contiguous_folds,
    evaluate_backbone,
    load_bin,
    main,
)

REPO = Path(__file__).resolve().parents[2]


def _jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_jpeg(render_face(identity_params(seed, i % 3), rng), 90) for i in range(count)]


def _write_bin(path: Path, bins: list, issame: list, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    return path


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle (protocol 2) writes for `(bins, issame)` with `str` images: BINSTRING opcodes."""
    out = [b"\x80\x02]("]
    for item in bins:
        out.append(b"T" + struct.pack("<i", len(item)) + item)
    out.append(b"e](")
    out.extend(b"\x88" if same else b"\x89" for same in issame)
    out.append(b"e\x86.")
    return b"".join(out)


def test_refuses_os_system_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Protocol 0 by hand: GLOBAL 'os system', called with one argument (REDUCE).
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(BinFormatError, match=r"refusing to unpickle global 'os\.system'") as info:
        load_bin(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_refuses_reduce_pickled_by_python(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (eval, ("1 + 1",))

    path = _write_bin(tmp_path / "evil.bin", [Evil()], [True])
    with pytest.raises(BinFormatError, match=r"refusing to unpickle global 'builtins\.eval'"):
        load_bin(path)


def test_python2_bytes_pickle_loads(tmp_path: Path) -> None:
    jpegs = _jpegs(4)
    data = _py2_pickle(jpegs, [True, False])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # the default ASCII decoding fails: the encoding='bytes' path is really taken
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    images, issame = load_bin(path)
    assert issame == [True, False]
    assert images.shape == (4, 3, 112, 112) and images.dtype == torch.uint8
    # The JPEG bytes survive unchanged: the loaded pixels equal a direct decode of the originals.
    direct = load_bin(_write_bin(tmp_path / "py3.bin", jpegs, [True, False]))[0]
    assert torch.equal(images, direct)


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_and_bytearray_images_load(tmp_path: Path, protocol: int) -> None:
    jpegs = _jpegs(4)
    # insightface's build_eval_pack.py stores the (N, 1) uint8 arrays from cv2.imencode; protocol 2 bytes and
    # bytearrays go through _codecs.encode and bytearray.
    bins = [np.frombuffer(jpegs[0], np.uint8).reshape(-1, 1), bytearray(jpegs[1]), jpegs[2], jpegs[3]]
    path = _write_bin(tmp_path / "np.bin", bins, [np.bool_(True), False], protocol=protocol)
    images, issame = load_bin(path)
    assert issame == [True, False]
    assert torch.equal(images, load_bin(_write_bin(tmp_path / "ref.bin", jpegs, [True, False]))[0])


EVALPACK = REPO / "tests" / "fixtures" / "evalpack"


def _globals_of(data: bytes) -> set[str]:
    """The `module.name` globals a pickle references (STACK_GLOBAL takes the two strings pushed before it)."""
    found: set[str] = set()
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(str(arg))
        elif opcode.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif opcode.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
    return found


def test_insightface_build_eval_pack_protocol5_file_loads() -> None:
    """A `.bin` written as build_eval_pack.py does on Python 3 (cv2.imencode arrays, pickle.HIGHEST_PROTOCOL) by
    the real OpenCV and NumPy 1.26 (tests/fixtures/evalpack/make_fixture.py)."""
    expected = json.loads((EVALPACK / "expected.json").read_text())
    data = (EVALPACK / "evalpack_py3.bin").read_bytes()
    assert expected["protocol"] == 5 and data[:2] == b"\x80\x05"
    # What makes it protocol 5: NumPy 1's `_frombuffer` reconstructor and in-band buffers (BYTEARRAY8).
    assert "numpy.core.numeric._frombuffer" in _globals_of(data)
    assert any(op.name == "BYTEARRAY8" for op, _, _ in pickletools.genops(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy 2 warns when `numpy.core` is imported: the loader must not
        images, issame = load_bin(EVALPACK / "evalpack_py3.bin")
    assert issame == expected["issame"]
    assert images.shape == (len(expected["mean_rgb"]), 3, 112, 112) and images.dtype == torch.uint8
    # Our JPEG decoder against OpenCV's, per image and channel: the same pixels up to IDCT rounding.
    means = images.double().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(means, np.asarray(expected["mean_rgb"]), atol=0.5)


def test_numpy2_protocol5_writable_arrays_load(tmp_path: Path) -> None:
    """The same layout pickled here (NumPy 2: `numpy._core.numeric._frombuffer`), from writable arrays as
    cv2.imencode returns them."""
    jpegs = _jpegs(4)
    bins = [np.frombuffer(jpeg, np.uint8).copy().reshape(-1, 1) for jpeg in jpegs]
    data = pickle.dumps((bins, [True, False]), protocol=5)
    assert "numpy._core.numeric._frombuffer" in _globals_of(data)
    path = tmp_path / "p5.bin"
    path.write_bytes(data)
    images, issame = load_bin(path)
    assert issame == [True, False]
    assert torch.equal(images, load_bin(_write_bin(tmp_path / "ref.bin", jpegs, [True, False]))[0])


class _RunsCode:
    """Pickles to a call of `target(*args)`: what a malicious `.bin` does."""

    def __init__(self, target: object, *args: object) -> None:
        self.target, self.args = target, args

    def __reduce__(self) -> tuple:
        return (self.target, self.args)


@pytest.mark.parametrize("which", ["os.system", "numpy runstring (exec)"])
def test_protocol5_malicious_pickles_are_refused(tmp_path: Path, which: str) -> None:
    from numpy.testing._private.utils import runstring

    marker = tmp_path / "pwned"
    if which == "os.system":
        evil, name = _RunsCode(os.system, f"touch {marker}"), "'posix.system'"
    else:
        code = f"open({str(marker)!r}, 'w').close()"
        evil, name = _RunsCode(runstring, code, {}), "'numpy.testing._private.utils.runstring'"
    # Next to a genuine protocol-5 NumPy image, so the allowed reconstructor is in the same file.
    bins = [np.frombuffer(_jpegs(1)[0], np.uint8).copy(), evil]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((bins, [True]), protocol=5))
    with pytest.raises(BinFormatError, match=f"refusing to unpickle global {name}"):
        load_bin(path)
    assert not marker.exists()


def test_frombuffer_refuses_object_arrays(tmp_path: Path) -> None:
    """The allowed reconstructor cannot build Python objects: an object dtype is refused by NumPy itself."""
    data = pickle.dumps(([np.frombuffer(b"\0" * 16, np.uint8).copy()], [True]), protocol=5)
    path = tmp_path / "object.bin"
    # Swap the dtype string 'u1' for 'O8': `_frombuffer(buffer, dtype('O8'), ...)`.
    assert data.count(b"\x8c\x02u1") == 1
    path.write_bytes(data.replace(b"\x8c\x02u1", b"\x8c\x02O8"))
    with pytest.raises(BinFormatError, match="not a readable pickle"):
        load_bin(path)


def test_resizes_other_sizes(tmp_path: Path) -> None:
    big = np.zeros((128, 160, 3), np.uint8)
    big[:, 80:] = 255  # right half white
    path = _write_bin(tmp_path / "big.bin", [encode_jpeg(big, 95)] * 2, [True])
    images, _ = load_bin(path)
    assert images.shape == (2, 3, 112, 112)
    # Shorter side 128 -> 112, width 160 -> 140, centre crop keeps columns 14..125 of the resized image.
    assert images[0, :, :, :40].float().mean() < 20 and images[0, :, :, -40:].float().mean() > 235


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"this is not a pickle", "not a readable pickle"),
        (pickle.dumps({"bins": []}), "expected a pickled (bins, issame_list) pair"),
        (pickle.dumps(("abc", [True])), "expected (list of images, list of bools)"),
        (pickle.dumps(([b"x"] * 3, [True])), "3 images for 1 pairs"),
        (pickle.dumps(([b"x"] * 2, [2])), "issame_list[0] is 2"),
        (pickle.dumps(([b"x", 5], [True])), "image 0 cannot be decoded"),
        (pickle.dumps(([], [])), "no pairs"),
    ],
)
def test_format_errors_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "broken.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BinFormatError) as info:
        load_bin(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_fewer_pairs_than_folds_are_refused_for_verification_only(tmp_path: Path) -> None:
    """9 pairs cannot fill 10 folds: verification (the check at a run's start, the callback, the CLI) refuses the
    file by name, pair count and folds; embedding and calibration, which need no folds, still read it."""
    small = _write_bin(tmp_path / "small.bin", _jpegs(18), [bool(i % 2) for i in range(9)])
    enough = _write_bin(tmp_path / "enough.bin", _jpegs(20), [bool(i % 2) for i in range(10)])
    message = f"file {small}: 9 pairs, fewer than the 10 folds of the verification protocol (it needs at least 10"
    with pytest.raises(BinFormatError) as info:
        check_bin(small)
    assert str(info.value).startswith(message)
    with pytest.raises(BinFormatError, match="9 pairs, fewer than the 10 folds"):
        VerificationCallback([str(enough), str(small)], batch_size=8)
    assert check_bin(enough) == 10 == NUM_FOLDS
    assert len(load_bin(small)[1]) == 9  # no folds asked for
    with pytest.raises(BinFormatError, match="9 pairs"):
        load_bin(small, folds=NUM_FOLDS)


def test_build_bin_warns_at_the_folds_verification_needs() -> None:
    from data.tools import VERIFICATION_FOLDS

    assert VERIFICATION_FOLDS == NUM_FOLDS  # data may not import evaluation: the two constants must agree


def _pairs_at_distances(dists: list[float]) -> tuple[np.ndarray, np.ndarray]:
    e1 = np.zeros((len(dists), 2))
    e2 = np.zeros((len(dists), 2))
    e2[:, 0] = np.sqrt(dists)  # squared L2 distance between e1[i] and e2[i] is dists[i]
    return e1, e2


def test_compute_accuracy_hand_computed() -> None:
    # 10 folds of 2 pairs: same pairs at squared distance 0.5, different at 2.0, except pair 6 (fold 3), a "same"
    # pair at 3.0. Every fold's best training threshold is the first that splits 0.5 from 2.0: 0.51. Fold 3 then
    # scores 1/2, the others 2/2: mean 0.95, std sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15.
    issame = [True, False] * 10
    dists = [0.5 if same else 2.0 for same in issame]
    dists[6] = 3.0
    acc, std, thresholds = compute_accuracy(*_pairs_at_distances(dists), issame)
    assert acc == pytest.approx(0.95)
    assert std == pytest.approx(0.15)
    np.testing.assert_allclose(thresholds, 0.51)


def _brute_force(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray, folds: int) -> tuple[float, float, list]:
    """A loop-by-loop restatement of the protocol with its own fold split (contiguous, the first n % k folds longer)."""
    dist = [float(np.sum((a - b) ** 2)) for a, b in zip(e1, e2, strict=True)]
    n = len(dist)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    bounds = np.cumsum([0, *sizes])
    accs, best = [], []
    for f in range(folds):
        test = list(range(bounds[f], bounds[f + 1]))
        train = [i for i in range(n) if i not in test]
        scores = []
        for t in np.arange(0, 4, 0.01):
            scores.append(sum((dist[i] < t) == issame[i] for i in train) / len(train))
        t_best = float(np.arange(0, 4, 0.01)[scores.index(max(scores))])
        best.append(t_best)
        accs.append(sum((dist[i] < t_best) == issame[i] for i in test) / len(test))
    return float(np.mean(accs)), float(np.std(accs)), best


def test_compute_accuracy_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    n = 123  # not a multiple of 10: uneven folds
    issame = rng.random(n) < 0.5
    base = rng.normal(size=(n, 8))
    other = np.where(issame[:, None], base + rng.normal(scale=0.6, size=(n, 8)), rng.normal(size=(n, 8)))
    e1 = base / np.linalg.norm(base, axis=1, keepdims=True)
    e2 = other / np.linalg.norm(other, axis=1, keepdims=True)
    acc, std, thresholds = compute_accuracy(e1, e2, issame)
    ref_acc, ref_std, ref_thresholds = _brute_force(e1, e2, issame, 10)
    assert 0.6 < acc < 0.99  # overlapping classes: a non-trivial case
    assert acc == pytest.approx(ref_acc) and std == pytest.approx(ref_std)
    np.testing.assert_allclose(thresholds, ref_thresholds)


@pytest.mark.parametrize(("n", "folds"), [(10, 10), (123, 10), (6000, 10), (57, 7)])
def test_folds_are_scikit_learns_kfold(n: int, folds: int) -> None:
    from sklearn.model_selection import KFold  # insightface's split; scikit-learn is a dependency (IJB's ROC)

    ours = contiguous_folds(n, folds)
    theirs = list(KFold(n_splits=folds, shuffle=False).split(np.zeros(n)))
    assert len(ours) == len(theirs) == folds
    for (train, test), (want_train, want_test) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(train, want_train)
        np.testing.assert_array_equal(test, want_test)


def test_compute_accuracy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="cannot be split into 10 folds"):
        compute_accuracy(np.zeros((5, 2)), np.zeros((5, 2)), [True] * 5)
    with pytest.raises(ValueError, match="embedding arrays"):
        compute_accuracy(np.zeros((20, 2)), np.zeros((20, 3)), [True] * 20)


class _LinearEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 112 * 112, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_evaluate_backbone_matches_manual_flip_protocol() -> None:
    images = torch.randint(0, 256, (40, 3, 112, 112), dtype=torch.uint8)
    issame = [bool(i % 2) for i in range(20)]
    model = _LinearEmbedder().train()
    result = evaluate_backbone(model, images, issame, batch_size=7)
    assert model.training  # mode restored
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        plain, flipped = model(x).double(), model(x.flip(3)).double()
    xnorm = torch.cat([plain, flipped]).norm(dim=1).mean().item()
    emb = torch.nn.functional.normalize(plain + flipped).numpy()
    acc, std, _ = compute_accuracy(emb[0::2], emb[1::2], issame)
    assert result.acc == pytest.approx(acc) and result.std == pytest.approx(std)
    assert result.xnorm == pytest.approx(xnorm, rel=1e-5)
    assert result.num_pairs == 20
    model.eval()
    evaluate_backbone(model, images, issame)
    assert not model.training


class _Overflowing(_LinearEmbedder):
    """Finite weights, infinite embeddings (fp32 overflow): a model that diverged without a NaN weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1e38 * 1e38


def test_non_finite_embeddings_are_refused_not_scored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = torch.randint(0, 256, (20, 3, 112, 112), dtype=torch.uint8)
    issame = [bool(i % 2) for i in range(10)]
    with pytest.raises(NonFiniteEmbeddingsError, match="the embeddings of 20 of 20 images are not finite"):
        evaluate_backbone(_Overflowing(), images, issame)
    # During training: the target is reported as not evaluated (NaN, a warning), the best accuracy is kept.
    path = _write_bin(tmp_path / "tiny.bin", _jpegs(20), issame)
    callback = VerificationCallback([str(path)], batch_size=8)
    callback.highest["tiny"] = 0.75
    with caplog.at_level(logging.WARNING, logger="evaluation.verification"):
        result = callback(5, _Overflowing())["tiny"]
    assert np.isnan(result.acc) and result.num_pairs == 10 and callback.highest["tiny"] == 0.75
    assert any("[tiny][5] not evaluated: the embeddings" in r.getMessage() for r in caplog.records)


def test_callback_evaluates_when_called_and_tracks_highest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_bin(tmp_path / "tiny.bin", _jpegs(20), [bool(i % 2) for i in range(10)])
    callback = VerificationCallback([str(path)], batch_size=8)
    model = _LinearEmbedder()
    with caplog.at_level(logging.INFO, logger="evaluation.verification"):
        results = callback(10, model)
    assert set(results) == {"tiny"} and results["tiny"].num_pairs == 10
    assert callback.highest["tiny"] == results["tiny"].acc
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("[tiny][10]"))
    assert f"Accuracy-Flip: {results['tiny'].acc:.5f}+-" in line and "XNorm: " in line and "Highest: " in line
    assert callback.state_dict() == {"highest": {"tiny": results["tiny"].acc}}
    callback.load_state_dict({"highest": {"tiny": 0.99, "other": 0.5}})  # a target this run lacks is ignored
    assert callback(15, model)["tiny"].acc == results["tiny"].acc  # same model, same numbers
    assert callback.highest == {"tiny": 0.99}


def _save_lite(path: Path, num_features: int = 16, metadata: dict[str, str] | None = None) -> None:
    from models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("r_lite", num_features=num_features)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path), metadata=metadata)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "model.safetensors"
    _save_lite(weights, metadata={"network": "r_lite", "embedding_size": "16"})
    bin_path = _write_bin(tmp_path / "tiny_val.bin", _jpegs(20), [bool(i % 2) for i in range(10)])
    assert main(["--weights", str(weights), "--bin", str(bin_path), "--batch-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny_val" in out and "r_lite" in out and " 10 " in out and "XNorm" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "{tmp}/absent.safetensors"], "absent.safetensors: no such file"),
        (["--network", "r_nonexistent"], "unknown network 'r_nonexistent'"),
        (["--embedding-size", "8"], "does not fit network 'r_lite' (embedding size 8): key 'fc.weight' has shape"),
        (["--bin", "{tmp}/absent.bin"], "absent.bin: not found"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    weights = tmp_path / "model.safetensors"
    _save_lite(weights, metadata={"network": "r_lite", "embedding_size": "16"})
    bin_path = _write_bin(tmp_path / "v.bin", _jpegs(20), [bool(i % 2) for i in range(10)])
    argv = {"--weights": str(weights), "--bin": str(bin_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[flag] = value.format(tmp=tmp_path)
    assert main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.fast_launch
def test_cli_module_entry_point(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    _save_lite(weights)  # no metadata: the flags must say which network
    run = subprocess.run(
        [sys.executable, "-m", "evaluation.verification", "--weights", str(weights), "--network", "r_lite"]
        + ["--embedding-size", "12", "--bin", str(tmp_path / "v.bin")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "does not fit network 'r_lite' (embedding size 12)" in run.stderr


def test_thresholds_are_insightfaces() -> None:
    assert len(THRESHOLDS) == 400 and THRESHOLDS[0] == 0 and THRESHOLDS[-1] == pytest.approx(3.99)
