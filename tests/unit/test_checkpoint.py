"""trainer.checkpoint on tiny modules: round trip, re-split by class range, crash safety, pruning, checksums."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from heads import PartialFC, PartialFCOptions
from models.cli import atomic_output
from trainer import checkpoint as ckpt

EMBEDDING = 4


class Parts:
    """A backbone, a Partial FC shard and one SGD optimizer with a group each, as the trainer builds them."""

    def __init__(self, num_classes: int = 6, rank: int = 0, world_size: int = 1) -> None:
        self.backbone = nn.Sequential(nn.Linear(8, EMBEDDING), nn.BatchNorm1d(EMBEDDING))
        self.head = PartialFC(PartialFCOptions(EMBEDDING, num_classes, rank=rank, world_size=world_size))
        self.optimizer = torch.optim.SGD(
            [{"params": list(self.backbone.parameters())}, {"params": list(self.head.parameters())}],
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
        )

    def step(self) -> None:
        """One optimizer step on random gradients: momentum buffers that differ from the weights."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.randn_like(param)
        self.optimizer.step()

    def save(
        self, output: Path, step: int, keep: int = 3, rank: int = 0, world_size: int = 1, barrier: Any = lambda: None
    ) -> Path:
        return ckpt.save_checkpoint(
            output,
            step=step,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            backbone=self.backbone,
            head=self.head,
            backbone_group=(self.optimizer, 0),
            head_group=(self.optimizer, 1),
            trainer_state={"step": step, "epoch": 0},
            metadata=ckpt.model_metadata("tiny", EMBEDDING),
            keep=keep,
        )

    def load(self, path: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        return ckpt.load_checkpoint(
            path,
            rank=rank,
            world_size=world_size,
            backbone=self.backbone,
            head=self.head,
            backbone_group=(self.optimizer, 0),
            head_group=(self.optimizer, 1),
        )

    def momentum(self, param: nn.Parameter) -> torch.Tensor:
        return self.optimizer.state[param]["momentum_buffer"]


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_restores_weights_optimizer_state_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = Parts()
    saved.step()
    saved.step()
    path = saved.save(tmp_path, step=7)
    after_save = torch.rand(3)  # the RNG state was captured before this draw

    torch.manual_seed(1)
    loaded = Parts()
    state = loaded.load(path)
    assert state["step"] == 7 and state["world_size"] == 1
    assert torch.equal(torch.rand(3), after_save)
    for (name, a), b in zip(saved.backbone.state_dict().items(), loaded.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.head.weight, saved.head.weight)
    for mine, theirs in zip(loaded.optimizer.param_groups, saved.optimizer.param_groups, strict=True):
        for p, q in zip(mine["params"], theirs["params"], strict=True):
            assert torch.equal(loaded.momentum(p), saved.momentum(q))
    assert ckpt.list_checkpoints(tmp_path) == [path]
    assert path.name == "step-00000007"


@pytest.mark.parametrize("new_world", [1, 3])
def test_shards_of_two_ranks_load_on_any_number_of_ranks(tmp_path: Path, new_world: int) -> None:
    """Two ranks (threads sharing a barrier) save 7 classes as 4 + 3; 1 or 3 ranks get their rows and momentum."""
    num_classes = 7
    table = torch.randn(num_classes, EMBEDDING)
    momentum = torch.randn(num_classes, EMBEDDING)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def save_rank(rank: int) -> None:
        try:
            parts = Parts(num_classes, rank=rank, world_size=2)
            start, stop = parts.head.class_start, parts.head.class_start + parts.head.num_local
            with torch.no_grad():
                parts.head.weight.copy_(table[start:stop])
            parts.optimizer.state[parts.head.weight] = {"momentum_buffer": momentum[start:stop].clone()}
            parts.save(tmp_path, step=3, rank=rank, world_size=2, barrier=lambda: barrier.wait(timeout=30))
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=save_rank, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    path = ckpt.list_checkpoints(tmp_path)[-1]
    assert sorted(p.name for p in path.glob("head-*")) == [
        "head-rank00000-of-00002.safetensors",
        "head-rank00001-of-00002.safetensors",
    ]

    starts = []
    for rank in range(new_world):
        parts = Parts(num_classes, rank=rank, world_size=new_world)
        parts.load(path, rank=rank, world_size=new_world)
        start, stop = parts.head.class_start, parts.head.class_start + parts.head.num_local
        starts.append((start, stop))
        assert torch.equal(parts.head.weight.detach(), table[start:stop])
        assert torch.equal(parts.momentum(parts.head.weight), momentum[start:stop])
    assert starts == ([(0, 7)] if new_world == 1 else [(0, 3), (3, 5), (5, 7)])  # 3 ranks straddle both shards


def test_wrong_class_count_is_refused(tmp_path: Path) -> None:
    path = Parts(6).save(tmp_path, step=1)
    with pytest.raises(ckpt.CheckpointError, match=r"head-rank00000-of-00001.safetensors has num_classes=6"):
        Parts(7).load(path)


@pytest.mark.parametrize("fail_on", ["head-rank", "rng-rank", "model", "optimizer", "rename"])
def test_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    torch.manual_seed(0)
    parts = Parts()
    parts.step()
    first = parts.save(tmp_path, step=1)
    before = _files(first)
    parts.step()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError(f"simulated crash writing {fail_on}")

    if fail_on == "rename":
        monkeypatch.setattr(ckpt.os, "rename", crash)  # everything written, manifest too: only the rename fails
    else:
        real_save_file = ckpt.save_file

        def save_file(tensors: dict[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any) -> None:
            if Path(filename).name.lstrip(".").startswith(fail_on):
                crash()
            real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(ckpt, "save_file", save_file)
    # A write that fails is the user's environment (a full disk): one error naming the checkpoint, no partial folder.
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*step-00000002: simulated crash"):
        parts.save(tmp_path, step=2)
    monkeypatch.undo()

    root = tmp_path / ckpt.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert _files(first) == before
    ckpt.verify_manifest(first)
    assert Parts().load(first)["step"] == 1

    # The next save, at another step (e.g. an interruption's), removes the leftover.
    third = parts.save(tmp_path, step=3)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000003"]
    assert ckpt.list_checkpoints(tmp_path) == [first, third]


def test_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    parts = Parts()
    for step in (2, 4, 6, 8, 10):
        parts.save(tmp_path, step=step, keep=2)
    root = tmp_path / ckpt.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000010"]
    # Steps sort as numbers, not strings, past eight digits too.
    parts.save(tmp_path, step=100_000_000, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010", "step-100000000"]


def test_folder_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    parts = Parts()
    first = parts.save(tmp_path, step=1)
    second = parts.save(tmp_path, step=2)
    (second / "manifest.json").unlink()
    assert ckpt.list_checkpoints(tmp_path) == [first]


@pytest.mark.parametrize("name", ["model.safetensors", "head-rank00000-of-00001.safetensors", "trainer_state.json"])
def test_corrupted_file_is_named(tmp_path: Path, name: str) -> None:
    path = Parts().save(tmp_path, step=1)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the file still parses, only the checksum can tell
    (path / name).write_bytes(bytes(data))
    message = rf"step-00000001: {name} does not match its checksum in manifest.json"
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.verify_manifest(path)
    with pytest.raises(ckpt.CheckpointError, match=message):
        Parts().load(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = Parts().save(tmp_path, step=1)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.safetensors is listed in manifest.json but missing"):
        Parts().load(path)


def test_manifest_lists_every_file_and_unreadable_manifest_is_an_error(tmp_path: Path) -> None:
    path = Parts().save(tmp_path, step=1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(f for f in os.listdir(path) if f != "manifest.json")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="unreadable manifest.json"):
        ckpt.verify_manifest(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_checkpoint_file_gets_the_mode_of_a_plainly_written_file(tmp_path: Path, umask: int) -> None:
    """safetensors' writer creates 0600 files; JSON written with open() gets 0666 & ~umask. All must match that."""
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        expected = plain.stat().st_mode & 0o777
        path = Parts().save(tmp_path / "run", step=1)
        with atomic_output(tmp_path / "model.safetensors") as tmp:  # how a model file outside a checkpoint is written
            ckpt.save_model(tmp, Parts().backbone, ckpt.model_metadata("tiny", EMBEDDING))
    finally:
        os.umask(previous)
    assert expected == 0o666 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*path.iterdir(), tmp_path / "model.safetensors"]}
    assert {"model.safetensors", "head-rank00000-of-00001.safetensors", "manifest.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, expected)


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning renames the folder out of the step-* names first; a kill during the deletion leaves a .trash-*
    folder that nothing reads, removed by the next save or by remove_leftovers at start."""
    parts = Parts()
    first = parts.save(tmp_path, step=1, keep=2)
    second = parts.save(tmp_path, step=2, keep=2)
    real_rmtree = ckpt.shutil.rmtree

    def killed_halfway(path: Path, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(".trash-"):
            (Path(path) / "manifest.json").unlink()  # part of the folder is gone when the process dies
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        parts.save(tmp_path, step=3, keep=2)
    monkeypatch.undo()
    root = tmp_path / ckpt.CHECKPOINTS
    names = sorted(p.name for p in root.iterdir())
    assert names[1:] == ["step-00000002", "step-00000003"] and names[0].startswith(".trash-step-00000001-")
    assert not first.exists()
    assert ckpt.list_checkpoints(tmp_path) == [second, root / "step-00000003"]
    assert ckpt.find_resumable(tmp_path) == root / "step-00000003"
    assert ckpt.remove_leftovers(tmp_path) == [root / names[0]]
    assert sorted(p.name for p in root.iterdir()) == names[1:]

    # The next save cleans up too; and a same-step save replaces the old folder the same way.
    (root / ".trash-step-00000002-1").mkdir()
    parts.step()
    again = parts.save(tmp_path, step=3, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    ckpt.verify_manifest(again)


def _checkpoints(tmp_path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> list[Path]:
    parts = Parts()
    return [parts.save(tmp_path, step=step, keep=len(steps)) for step in steps]


def test_find_resumable_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match=rf"^no checkpoint to resume from in {tmp_path / 'checkpoints'}$"):
        ckpt.find_resumable(tmp_path)
    first, second, third = _checkpoints(tmp_path)
    (tmp_path / ckpt.CHECKPOINTS / ".tmp-step-00000004").mkdir()  # an interrupted save is not a checkpoint
    assert ckpt.find_resumable(tmp_path) == third
    assert ckpt.check_resumable(second)["step"] == 2


@pytest.mark.parametrize("damage", ["no_manifest", "corrupt_file", "missing_file"])
def test_an_unusable_newest_checkpoint_names_the_newest_valid_one(tmp_path: Path, damage: str) -> None:
    first, second, third = _checkpoints(tmp_path)
    if damage == "no_manifest":
        (third / "manifest.json").unlink()
        problem = f"checkpoint {third} is incomplete (no manifest.json)"
    elif damage == "corrupt_file":
        data = bytearray((third / "model.safetensors").read_bytes())
        data[-3] ^= 0x10
        (third / "model.safetensors").write_bytes(bytes(data))
        problem = f"checkpoint {third}: model.safetensors does not match its checksum in manifest.json"
    else:
        (third / "trainer_state.json").unlink()
        problem = f"checkpoint {third}: trainer_state.json is listed in manifest.json but missing"
    # The one before is broken too: the hint skips it and names the newest that verifies.
    (second / "rng-rank00000.safetensors").write_bytes(b"garbage")
    expected = f"{problem}: the newest valid one is {first}; resume from it with --resume {first}"
    for call in (lambda: ckpt.find_resumable(tmp_path), lambda: ckpt.check_resumable(third)):
        with pytest.raises(ckpt.CheckpointError) as info:
            call()
        assert str(info.value) == expected
    (first / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"no other checkpoint in {tmp_path / 'checkpoints'} is valid$"):
        ckpt.find_resumable(tmp_path)


def test_check_resumable_names_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    _checkpoints(tmp_path, steps=(1,))
    # Not "--resume auto": with another --output that would start fresh instead of continuing this run.
    newest = tmp_path / ckpt.CHECKPOINTS / "step-00000001"
    with pytest.raises(ckpt.CheckpointError, match=rf"is a run's output folder, not a checkpoint folder: .*{newest}$"):
        ckpt.check_resumable(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000009 does not exist"):
        ckpt.check_resumable(tmp_path / ckpt.CHECKPOINTS / "step-00000009")
    with pytest.raises(ckpt.CheckpointError, match=r"is not a checkpoint folder \(step-XXXXXXXX\)"):
        ckpt.check_resumable(tmp_path / ckpt.CHECKPOINTS)
