"""trainer.convert: insightface files (made here with torch.save in insightface's layout) to this project's formats."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import build_backbone
from trainer import checkpoint as ckpt
from trainer.convert import class_split, main

EMBEDDING = 32
NUM_CLASSES = 12  # as the tiny recipe


def _backbone_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_backbone("r_lite", num_features=EMBEDDING)
    with torch.no_grad():  # non-trivial BatchNorm statistics, which a converter could drop
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return model.state_dict()


def _insightface_run(
    folder: Path, world_size: int = 5, embedding: int = EMBEDDING, global_step: int = 6, epoch: int = 1
) -> tuple[list[Path], dict[str, torch.Tensor], torch.Tensor]:
    """`checkpoint_gpu_{rank}.pt` as arcface_torch's train_v2.py writes them; returns (files, backbone, centers)."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = _backbone_state()
    centers = torch.randn(NUM_CLASSES, embedding, generator=torch.Generator().manual_seed(1))
    files = []
    for rank, (start, num_local) in enumerate(class_split(NUM_CLASSES, world_size)):
        path = folder / f"checkpoint_gpu_{rank}.pt"
        torch.save(
            {
                "epoch": epoch,
                "global_step": global_step,
                "state_dict_backbone": backbone,
                "state_dict_softmax_fc": {"weight": centers[start : start + num_local].clone()},
                "state_optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
                "state_lr_scheduler": {"last_epoch": global_step, "base_lrs": [0.1, 0.1]},
            },
            path,
        )
        files.append(path)
    return files, backbone, centers


def test_insightface_split_is_partial_fc_split() -> None:
    assert class_split(12, 5) == [(0, 3), (3, 3), (6, 2), (8, 2), (10, 2)]
    from heads import PartialFC, PartialFCOptions

    for rank, (start, num_local) in enumerate(class_split(101, 7)):
        head = PartialFC(PartialFCOptions(4, 101, rank=rank, world_size=7))
        assert (head.class_start, head.num_local) == (start, num_local)


@pytest.mark.parametrize("layout", ["plain", "ddp_prefix", "training_checkpoint", "fp16", "legacy_format"])
def test_backbone(tmp_path: Path, layout: str) -> None:
    state = _backbone_state()
    saved: object = {
        "plain": state,
        "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
        "training_checkpoint": {"epoch": 3, "global_step": 9, "state_dict_backbone": state},
        "fp16": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        "legacy_format": state,  # torch < 1.6's file format: cannot be memory-mapped
    }[layout]
    torch.save(saved, tmp_path / "backbone.pth", _use_new_zipfile_serialization=layout != "legacy_format")
    out = tmp_path / "model.safetensors"
    assert main(["insightface-backbone", str(tmp_path / "backbone.pth"), "--network", "r_lite", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta == ckpt.model_metadata("r_lite", EMBEDDING)  # embedding size read from fc.weight
    converted = load_file(str(out))
    assert converted.keys() == state.keys()
    for key, value in state.items():
        expected = value.half().float() if layout == "fp16" and value.is_floating_point() else value
        assert torch.equal(converted[key], expected), key
    # It is a working backbone, loadable without this project's converter.
    model = build_backbone("r_lite", num_features=EMBEDDING).eval()
    model.load_state_dict(converted, strict=True)
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, EMBEDDING)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--network", "r18"], "does not fit network 'r18' (embedding size 32): missing key 'layer1.1.bn1.weight'"),
        (
            ["--network", "r_lite", "--embedding-size", "64"],
            "key 'fc.weight' has shape [32, 6272], the network needs [64, 6272]",
        ),
        (["--network", "r_nonexistent"], "unknown network 'r_nonexistent'; registered: "),
    ],
)
def test_backbone_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    torch.save(_backbone_state(), tmp_path / "backbone.pth")
    out = tmp_path / "model.safetensors"
    assert main(["insightface-backbone", str(tmp_path / "backbone.pth"), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


class Unsafe:
    """Not a tensor: weights_only refuses to unpickle it."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ([1, 2, 3], "not a backbone state dict (found list)"),
        ({"x": Unsafe()}, "refused: it would import tests.unit.test_convert.Unsafe, which a weights file never needs"),
        (b"not a torch file", "cannot be read with torch.load(weights_only=True)"),
    ],
)
def test_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object, message: str) -> None:
    source = tmp_path / "backbone.pth"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        torch.save(content, source)
    assert main(["insightface-backbone", str(source), "--network", "r_lite", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}: {message}"), err
    assert err.count("\n") == 1


class _Payload:
    """What an attacker pickles: a call made while unpickling (harmless callables here)."""

    def __init__(self, call: object, args: tuple) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return (self.call, self.args)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    ("call", "args", "shown"),
    [(os.getcwd, (), "os.getcwd"), (builtins.print, ("PAYLOAD RAN",), "builtins.print")],
    ids=["os.getcwd", "builtins.print"],
)
def test_a_malicious_pickle_is_refused_naming_the_global(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], legacy: bool, call: object, args: tuple, shown: str
) -> None:
    """torch 2.13 words the refusal of a blocked module (os is pickled as posix) and of a global outside its
    allow-list differently; both become one line naming the global as a user knows it."""
    source = tmp_path / "backbone.pth"
    torch.save(
        {"fc.weight": torch.zeros(2), "x": _Payload(call, args)}, source, _use_new_zipfile_serialization=not legacy
    )
    out = tmp_path / "model.safetensors"
    assert main(["insightface-backbone", str(source), "--network", "r_lite", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: {source}: refused: it would import {shown}, which a weights file never needs "
        "(torch.load weights_only=True)\n"
    )
    assert "PAYLOAD RAN" not in captured.out and not out.exists()


def test_head_checkpoint_folder(tmp_path: Path) -> None:
    files, backbone, centers = _insightface_run(tmp_path / "insightface")
    out = tmp_path / "run"
    # Given in any order: the rank comes from the file name.
    assert (
        main(
            [
                "insightface-head",
                *map(str, reversed(files)),
                "--network",
                "r_lite",
                "--num-classes",
                "12",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    path = out / "checkpoints" / "step-00000006"
    assert ckpt.list_checkpoints(out) == [path]
    manifest = ckpt.verify_manifest(path)
    assert sorted(manifest["files"]) == sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    rows = []
    for rank, (start, num_local) in enumerate(class_split(NUM_CLASSES, 5)):
        shard = path / f"head-rank{rank:05d}-of-00005.safetensors"
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata()
        assert meta == {
            "class_start": str(start),
            "num_local": str(num_local),
            "num_classes": "12",
            "rank": str(rank),
            "world_size": "5",
        }
        rows.append(load_file(str(shard))["weight"])
    assert torch.equal(torch.cat(rows), centers)
    model = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(model[k], v) for k, v in backbone.items())
    state = ckpt.read_trainer_state(path)
    assert (state["step"], state["epoch"], state["world_size"], state["num_classes"]) == (6, 1, 5, 12)
    assert state["config"] == {
        "network.name": "r_lite",
        "network.embedding_size": 32,
        "head.name": "partial_fc",
        "optim.name": "sgd",
    }
    assert state["optimizer_param_groups"] == {}  # insightface's optimizer state is not imported
    assert not (path / "optimizer.safetensors").exists()


def test_head_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files, _, _ = _insightface_run(tmp_path / "a")

    def fails(args: list[object], message: str) -> None:
        # `--network r_lite` first: a later `--network` in `args` wins.
        assert main(["insightface-head", "--network", "r_lite", "--out", str(tmp_path / "out"), *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fails(
        [*files, "--num-classes", "13"],
        "the 5 head shards hold 12 class centers (3 + 3 + 2 + 2 + 2), --num-classes is 13",
    )
    fails([*files[:4], "--num-classes", "12"], "the 4 head shards hold 10 class centers")
    fails([files[0], files[1], files[3], "--num-classes", "12"], "3 files but no checkpoint_gpu_2.pt")
    # Names without a rank: the order given is the rank order, and rank 0 must hold 3 of 12 classes, not 2.
    renamed = []
    for name, source in zip("abcde", [files[2], files[0], files[1], files[3], files[4]], strict=True):
        renamed.append(tmp_path / f"{name}.pt")
        renamed[-1].write_bytes(source.read_bytes())
    fails([*renamed, "--num-classes", "12"], "a.pt: 2 class centers, but rank 0 of 5 holds 3 of 12 classes")
    narrow, _, _ = _insightface_run(tmp_path / "narrow", embedding=16)
    fails([*narrow, "--num-classes", "12"], "key 'state_dict_softmax_fc.weight' has 16-d centers")
    fails([*files, "--num-classes", "12", "--network", "r18"], "does not fit network 'r18'")
    torch.save(_backbone_state(), tmp_path / "backbone.pth")
    fails([tmp_path / "backbone.pth", "--num-classes", "12"], "not an insightface training checkpoint")
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


@pytest.mark.e2e
@pytest.mark.tier2
def test_converted_insightface_run_resumes_with_the_real_cli(tmp_path: Path, face_cache: Path) -> None:
    """5 insightface ranks at global_step 6 -> `python -m trainer.convert` -> one more step on 1 rank here.

    With a fresh SGD optimizer, step 7's momentum buffer is the whole update: w6 = w7 + lr * buf7 for every class
    center and backbone parameter. So the weights the resumed run started from can be recovered from what it saved,
    and they must be the insightface ones, row for row (a shard in the wrong class range would break it).
    """
    from tests.launching import REPO, TINY, env_for, launch

    files, backbone, centers = _insightface_run(tmp_path / "insightface")
    out = tmp_path / "run"
    convert = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.convert",
            "insightface-head",
            *map(str, files),
            "--network",
            "r_lite",
            "--num-classes",
            "12",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env_for(face_cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert convert.returncode == 0, convert.stderr
    # 96 samples in batches of 16: 6 steps per epoch, so global_step 6 is the end of epoch 0, as insightface saves.
    proc = launch(
        [
            "--config",
            str(TINY),
            "--output",
            str(out),
            "--resume",
            "--data.source",
            "synthetic",
            "--data.num_images",
            "96",
            "--data.num_classes",
            "12",
            "--schedule.max_steps",
            "7",
        ],
        face_cache,
    )
    assert proc.returncode == 0, proc.stdout[-2500:] + proc.stderr[-2500:]
    log = (out / "train.log").read_text()
    assert "made with 5 ranks, this run has 1" in log and "at step 6 (epoch 1)" in log
    assert "approximate" not in log  # the sampler position agreed with the step count

    step7 = out / "checkpoints" / "step-00000007"
    state = json.loads((step7 / "trainer_state.json").read_text())
    assert state["step"] == 7 and [s for s, _ in state["loss_history"]] == [7]
    lr = {part: group["lr"] for part, group in state["optimizer_param_groups"].items()}
    head = load_file(str(step7 / "head-rank00000-of-00001.safetensors"))
    assert not torch.equal(head["weight"], centers)  # it trained
    torch.testing.assert_close(
        head["weight"] + lr["head"] * head["weight::momentum_buffer"], centers, rtol=1e-5, atol=1e-6
    )
    weights = load_file(str(step7 / "model.safetensors"))
    momentum = load_file(str(step7 / "optimizer.safetensors"))
    assert len(momentum) > 10
    for key, buffer in momentum.items():
        name = key.removesuffix("::momentum_buffer")
        torch.testing.assert_close(
            weights[name] + lr["backbone"] * buffer, backbone[name], rtol=1e-5, atol=1e-6, msg=name
        )


# --------------------------------------------------------------------------------------------------------------
# The model zoo: insightface's MobileFaceNet and ViT files (keys and shapes from its own code's manifests)


@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_zoo_backbone_in_insightface_layout(tmp_path: Path, network: str) -> None:
    """A `torch.save`d state dict with insightface's keys and shapes (models/manifests, written by its get_model),
    DDP-prefixed as its train_v2.py saves `backbone.module`'s: converted, its embedding size read from the shapes."""
    import json

    from tests.fixtures.make_zoo_manifests import seeded_images, seeded_state

    manifest = json.loads((Path(__file__).parents[2] / "models" / "manifests" / f"{network}.json").read_text())
    state = seeded_state([(key, shape) for key, shape in manifest])
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "backbone.pth")
    out = tmp_path / "model.safetensors"
    assert main(["insightface-backbone", str(tmp_path / "backbone.pth"), "--network", network, "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata() == ckpt.model_metadata(network, 512)
    converted = load_file(str(out))
    assert converted.keys() == state.keys()  # safetensors stores keys sorted
    assert all(torch.equal(converted[key], value) for key, value in state.items())
    model = build_backbone(network).eval()
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert model(seeded_images()).shape == (2, 512)
