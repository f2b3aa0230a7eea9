"""What a user can do wrong at the start of a run is refused there, in one line naming the file, key or value,
with exit code 2 and nothing written through a link or half-written (#25). Checked in this process through
`trainer.main.main`, the training command itself, and through the functions behind it."""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
import torch

from data.recordio import write_insightface_layout
from tests.launching import TINY
from trainer.config import ConfigError, load_config

TRACKERS = {  # the module each tracker imports -> what the one line must tell the user to install
    "tensorboard": ("tensorboard", "pip install -e '.[tensorboard]'"),
    "wandb": ("wandb", "pip install -e '.[wandb]'"),
    "trackio": ("trackio", "pip install trackio"),
    "comet_ml": ("comet_ml", "pip install comet-ml"),
    "aim": ("aim", "pip install aim"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
}


@pytest.fixture
def train(face_cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`trainer.main.main(["--config", tiny, *args])` in this process: (exit code, stderr lines). Accelerate's
    process-wide state, the signal handlers and the logging handlers a run installs are put back afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    from trainer.distributed import StopSignal
    from trainer.main import main

    monkeypatch.setenv("ARCFACE_CACHE", str(face_cache))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def run(*args: str) -> tuple[int, list[str]]:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        try:
            code = main(["--config", str(TINY), *args])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            root = logging.getLogger()
            for handler in [h for h in root.handlers if getattr(h, "_arcface_setup", False)]:
                root.removeHandler(handler)
                handler.close()
        return code, capsys.readouterr().err.splitlines()

    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    StopSignal.received.clear()


def one_error(lines: list[str], *names: str) -> str:
    """The one `error:` line among `lines` (stderr), which names each of `names`; no traceback."""
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, lines
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def write_bin(path: Path, pairs: int) -> Path:
    """A verification `.bin` of `pairs` pairs of noise images (insightface's pickle: image bytes, issame list)."""
    rng = np.random.default_rng(0)
    images = [
        simplejpeg.encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), colorspace="RGB")
        for _ in range(2 * pairs)
    ]
    path.write_bytes(pickle.dumps((images, [i % 2 == 0 for i in range(pairs)])))
    return path


# --------------------------------------------------------------------------------------------------------------
# Evaluation: a verification file too small for its folds is refused at start, not at the first evaluation


def test_a_verification_file_with_fewer_pairs_than_folds_is_refused_at_start(tmp_path: Path, train: Any) -> None:
    small = write_bin(tmp_path / "small.bin", 6)
    out = tmp_path / "out"
    code, err = train("--output", str(out), "--schedule.max_steps", "2", "--eval.bins", f"[{small}]")
    assert code == 2
    line = one_error(err, str(small), "6 pairs", "10 folds")
    log = (out / "train.log").read_text()
    assert f"refused: {line.removeprefix('error: ')}" in log
    assert "step 1/" not in log and not list(out.glob("checkpoints/step-*"))


def test_generated_verification_pairs_must_fill_the_folds() -> None:
    with pytest.raises(ConfigError, match=r"--data\.generated\.num_val_pairs must be an even number >= 10 .*got 8"):
        load_config(TINY, ["--data.generated.num_val_pairs", "8"], check_files=False)
    load_config(TINY, ["--data.generated.num_val_pairs", "10"], check_files=False)


def test_an_evaluation_that_fails_stops_the_run_with_its_checkpoint(
    tmp_path: Path, train: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit code 4, one line, the traceback in train.log, the evaluated step saved (no model: the run did not
    finish)."""
    from evaluation.verification import VerificationCallback

    def broken(self: VerificationCallback, step: int, backbone: torch.nn.Module) -> Any:
        raise RuntimeError("cannot evaluate\nsecond line")

    monkeypatch.setattr(VerificationCallback, "__call__", broken)
    out = tmp_path / "out"
    code, err = train("--output", str(out), "--schedule.max_steps", "4", "--eval.every", "2")
    assert code == 4
    one_error(err, "evaluation failed at step 2 (RuntimeError: cannot evaluate)", str(out / "train.log"),
              str(out / "checkpoints" / "step-00000002"), "--resume")  # fmt: skip
    log = (out / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: cannot evaluate" in log
    assert "step 3/" not in log and log.rstrip().endswith("exit: evaluation failed (exit code 4)")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------
# Config and resume


def test_init_weights_takes_a_run_or_checkpoint_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    for folder in (run, checkpoint):
        (folder / "model.safetensors").write_bytes(b"weights")
        cfg = load_config(TINY, ["--network.init_weights", str(folder)], check_files=True)
        assert cfg.network.init_weights == str(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"--network\.init_weights: {empty}: a folder without model\.safetensors"):
        load_config(TINY, ["--network.init_weights", str(empty)])
    with pytest.raises(ConfigError, match=r"--network\.init_weights: .*nowhere: no such file"):
        load_config(TINY, ["--network.init_weights", str(tmp_path / "nowhere")])


def test_a_resume_with_another_subcenter_count_names_the_key(tmp_path: Path, train: Any) -> None:
    out = tmp_path / "out"
    head = ["--head.name", "subcenter_arcface", "--schedule.max_steps", "1"]
    assert train("--output", str(out), *head)[0] == 0
    code, err = train("--output", str(out), "--resume", *head, "--head.num_subcenters", "2")
    assert code == 2
    one_error(err, "head.num_subcenters=3", "head.num_subcenters=2", str(out / "checkpoints" / "step-00000001"))


def test_head_keys_a_checkpoint_does_not_record_are_not_compared() -> None:
    """A checkpoint written before `head.num_subcenters` was marked structural has no such entry: it still loads
    (the head shards' shapes are checked when the tensors load)."""
    from models.run_folder import CheckpointError
    from trainer.state import RunIdentity

    cfg = load_config(TINY, ["--head.name", "subcenter_arcface"], check_files=False)
    identity = RunIdentity(cfg, num_classes=12)
    assert identity.config["head.num_subcenters"] == 3
    old = {k: v for k, v in identity.config.items() if k != "head.num_subcenters"}
    identity.load_state_dict({"num_classes": 12, "config": old})
    with pytest.raises(CheckpointError, match=r"head\.num_subcenters=5, this run has head\.num_subcenters=3"):
        identity.load_state_dict({"num_classes": 12, "config": {**old, "head.num_subcenters": 5}})
    plain = RunIdentity(load_config(TINY, [], check_files=False), num_classes=12)  # partial_fc: nothing added
    assert sorted(plain.config) == ["head.name", "network.embedding_size", "network.name", "optim.name"]


def test_an_unusable_checkpoints_folder_is_found_at_start(tmp_path: Path, train: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    code, err = train("--output", str(out), "--schedule.max_steps", "1")
    assert code == 2
    one_error(err, str(out / "checkpoints"), "is a file")
    log = (out / "train.log").read_text()
    assert "refused:" in log and "step 1/" not in log and "speed:" not in log  # before anything was built
    assert (out / "checkpoints").read_text() == "in the way"


def test_the_idx_error_names_a_scan_that_works(tmp_path: Path) -> None:
    """An `.idx` that does not fit its `.rec` (an offset moved off its record, not even 4-byte aligned) is refused
    at start with the `data.tools scan` command that lists the broken records; that command runs on it."""
    from data.dataset import RecordFaceDataset
    from data.recordio import RecordIOError
    from data.tools import main as tools_main

    root = tmp_path / "rec"
    root.mkdir()
    rng = np.random.default_rng(1)
    samples = [
        (i // 4, simplejpeg.encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), colorspace="RGB"))
        for i in range(24)
    ]
    write_insightface_layout(root / "train.rec", root / "train.idx", samples, root / "property")
    lines = (root / "train.idx").read_text().splitlines()
    key, offset = lines[10].split("\t")
    lines[10] = f"{key}\t{int(offset) + 2}"
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError) as refused:
        RecordFaceDataset(root, output="uint8")
    command = re.search(r"`python -m data\.tools (scan [^`]+)`", str(refused.value))
    assert command is not None, refused.value
    assert command.group(1) == f"scan {root}"
    assert tools_main([*command.group(1).split(), "--workers", "1"]) == 1  # 1: it found and listed broken records


# --------------------------------------------------------------------------------------------------------------
# Trackers without their package


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_a_tracker_without_its_package(name: str, tmp_path: Path, train: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    module, install = TRACKERS[name]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else find_spec(n, *a))
    out = tmp_path / "out"
    code, err = train("--output", str(out), "--train.trackers", f"[{name}]")
    assert code == 2
    one_error(err, "train.trackers", repr(name), install)
    assert not out.exists()  # refused before the output folder was made


# --------------------------------------------------------------------------------------------------------------
# Links in the output folder


@pytest.mark.parametrize("name", [".lock", "config.yaml", "train.log", "metrics.jsonl", "checkpoint file"])
def test_a_planted_link_is_refused_and_never_written_through(name: str, tmp_path: Path, train: Any) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    if name == "checkpoint file":
        checkpoint = out / "checkpoints" / "step-00000001"
        checkpoint.mkdir(parents=True)
        link = checkpoint / "trainer_state.json"
        resume = ["--resume"]
    else:
        link, resume = out / name, []
    link.symlink_to(target)
    code, err = train("--output", str(out), "--schedule.max_steps", "1", *resume)
    assert code == 2
    one_error(err, str(link), "symbolic link", str(target))
    assert target.read_text() == "keep me\n"
    assert link.is_symlink() and os.readlink(link) == str(target)


def test_a_dangling_link_as_output_says_what_it_is(tmp_path: Path, train: Any) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    code, err = train("--output", str(out), "--schedule.max_steps", "1")
    assert code == 2
    one_error(err, f"output folder {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist")
    assert not (tmp_path / "gone").exists()


# --------------------------------------------------------------------------------------------------------------
# The divergence guard's rollbacks


def test_a_rollback_never_returns_to_a_checkpoint_it_diverged_from() -> None:
    """Checkpoints at steps 2, 4 and 6; the run diverges at step 8 and goes back to 6; diverging again after it
    goes back to 4, then 2, then stops; the stop message does not call a checkpoint it diverged from good."""
    from trainer.config import TrainConfig
    from trainer.guard import DivergenceGuard

    guard = DivergenceGuard.from_config(TrainConfig(max_bad_steps=2, on_divergence="rollback", max_rollbacks=5))
    saved = {2: Path("ck/step-2"), 4: Path("ck/step-4"), 6: Path("ck/step-6")}
    went_back = []
    step = 8
    while True:
        guard.consecutive = 2  # steps step-1 and step were bad
        target = guard.rollback_target(step, sorted(saved))
        if target is None:
            break
        guard.roll_back(target)
        went_back.append(target)
        step = target + 2  # diverged again two steps after the checkpoint it went back to
    assert went_back == [6, 4, 2]
    assert guard.lr_scale == pytest.approx(0.5**3)
    message = guard.where_to_go_back(saved)
    assert "diverged again after rolling back to ck/step-6" in message and "last good" not in message
    # A checkpoint saved during the streak itself never qualifies.
    fresh = DivergenceGuard.from_config(TrainConfig(max_bad_steps=3, on_divergence="rollback"))
    fresh.consecutive = 3
    assert fresh.rollback_target(6, [2, 4, 5]) == 2  # steps 4, 5, 6 were bad: 4 and 5 hold no good weights


# --------------------------------------------------------------------------------------------------------------
# Several ranks: a refusal or a failure on one rank reaches every rank


def _refuse() -> None:
    from models.errors import InputError

    raise InputError("val.bin holds 4 pairs")


def _two_ranks(rank: int, out: str) -> None:
    """One rank, inside the gloo process group that spawn_ranks sets up and tears down."""
    from models.errors import InputError
    from trainer.distributed import RefusedByMainProcess, StopSignal, main_process_builds
    from trainer.faults import DataWorkerDied, EvaluationFailed

    results: dict[str, Any] = {}
    try:
        main_process_builds(_refuse)
    except RefusedByMainProcess as exc:
        results["refused"] = str(exc)
    except InputError as exc:
        results["refused"] = f"main: {exc}"
    results["built"] = main_process_builds(lambda: "callback")
    stop = StopSignal(torch.device("cpu"))
    results["quiet"] = stop.poll(1)
    fault = DataWorkerDied("rank 1: data worker face-loader-0 died") if rank == 1 else None
    results["worker"] = stop.poll(2, fault=fault)
    fault = EvaluationFailed("evaluation failed at step 3") if rank == 0 else None
    results["evaluation"] = stop.poll(3, fault=fault)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.dist
@pytest.mark.fast_launch  # two small spawned ranks: the one multi-process check of the fast tier
def test_a_refusal_or_a_failure_on_one_rank_reaches_every_rank(tmp_path: Path) -> None:
    from tests.launching import spawn_ranks

    spawn_ranks(_two_ranks, (str(tmp_path),), world_size=2)
    main, other = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert main["refused"] == "main: val.bin holds 4 pairs"
    assert other["refused"] == "the main process refused to start: val.bin holds 4 pairs"
    assert (main["built"], other["built"]) == ("callback", None)
    assert main["quiet"] == other["quiet"] == (False, False, None)
    for results in (main, other):
        stop, save, fault = results["worker"]
        assert (stop, save, type(fault).__name__, str(fault)) == (
            True, False, "DataWorkerDied", "rank 1: data worker face-loader-0 died"
        )  # fmt: skip
        stop, save, fault = results["evaluation"]
        assert (stop, type(fault).__name__, fault.exit_code) == (True, "EvaluationFailed", 4)
