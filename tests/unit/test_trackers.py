"""`train.trackers` through Accelerate: what TensorBoard and wandb (offline) actually store, read back from their
own files; the config key and its errors; the run plot."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from trainer.config import ConfigError, ExperimentConfig, load_config
from trainer.curves import plot_run
from trainer.trackers import check_trackers, hyperparameters


def wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a wandb `.wandb` file (a LevelDB-style log: 7-byte file header, 32 KiB blocks of
    chunks with a 7-byte header `crc32, length, type`; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _log_a_run(output: Path, trackers: list[str]) -> None:
    from accelerate.state import AcceleratorState

    from trainer.distributed import build_accelerator
    from trainer.trackers import start_trackers

    cfg = ExperimentConfig()
    cfg.output, cfg.train.trackers = str(output), trackers
    accelerator = build_accelerator(cfg.output, 1, cfg.train.trackers)
    try:
        start_trackers(accelerator, cfg)
        for step in (1, 2, 3):
            accelerator.log({"loss": 10.0 / step, "lr": 0.1 * step, "bad_samples": step - 1}, step=step)
        accelerator.log({"val/val": 0.75}, step=3)
        accelerator.end_training()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_stores_scalars_and_hyperparameters(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_a_run(tmp_path, ["tensorboard"])
    run_dir = tmp_path / "tensorboard" / "arcface-accelerate"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 10.0), (2, 5.0), (3, pytest.approx(10 / 3))]
    assert [e.value for e in events.Scalars("bad_samples")] == [0, 1, 2]
    assert [(e.step, e.value) for e in events.Scalars("val/val")] == [(3, 0.75)]
    hparams = next(run_dir.rglob("hparams.yml")).read_text()
    assert "network.name: r50" in hparams and "optim.betas: '[0.9, 0.999]'" in hparams


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_stores_history_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_a_run(tmp_path / "my-run", ["wandb"])
    (run_file,) = (tmp_path / "my-run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("arcface-accelerate", "my-run")
    config = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["network.name"] == "r50" and config["train.trackers"] == "['wandb']"
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h["loss"], h["bad_samples"]) for h in history] == [(1, 10, 0), (2, 5, 1), (3, 10 / 3, 2)]
    assert history[-1]["val/val"] == 0.75


def test_tracker_config_and_errors(tmp_path: Path) -> None:
    assert check_trackers([]) == []
    missing = next((n for n in ("aim", "clearml", "swanlab") if importlib.util.find_spec(n) is None), None)
    if missing:
        with pytest.raises(ConfigError, match=f"train.trackers: '{missing}' needs the {missing} package"):
            check_trackers([missing])
    values = hyperparameters(ExperimentConfig())
    assert values["optim.lr"] == 0.1 and values["eval.bins"] == "[]"
    assert all(isinstance(v, bool | int | float | str) for v in values.values())
    recipe = tmp_path / "old.yaml"
    recipe.write_text("train:\n  tensorboard: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.tensorboard'.*trackers"):
        load_config(recipe, check_files=False)
    recipe.write_text("train:\n  trackers: [tensorboard, neptune]\n")
    with pytest.raises(ConfigError, match=r"train.trackers\[1\] must be one of"):
        load_config(recipe, check_files=False)


def test_curves_png(tmp_path: Path) -> None:
    history: list[dict[str, Any]] = [
        {"step": s, "loss": 10.0 / s, "lr": 0.1, "samples_per_second": 50.0} for s in range(1, 21)
    ]
    history += [{"step": 10, "val/val": 0.8}, {"step": 20, "val/val": 0.9}]
    path = plot_run(tmp_path / "run", history)
    assert path == tmp_path / "run" / "curves.png" and sorted(p.name for p in path.parent.iterdir()) == ["curves.png"]
    pixels = imread(str(path))
    assert pixels.shape[:2] == (700, 1100)  # 11 x 7 inches at 100 dpi
    # Drawn lines: the blue loss curve (tab:blue, #1f77b4) is on the image.
    blue = np.all(np.abs(pixels[..., :3] - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.02, axis=-1)
    assert blue.sum() > 200
    assert plot_run(tmp_path / "empty", []).is_file()  # an interrupted run before its first log still gets a plot
