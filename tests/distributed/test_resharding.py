"""Resharding resume through the real CLI: a checkpoint saved with W ranks resumes with W' ranks (2->1, 1->2, 2->3).

What must survive the move: every class center and its SGD momentum buffer (re-split by class range), the backbone
weights and the backbone optimizer state. To see the state *as resumed*, before any step moves it, the resumed runs
go through this module's `__main__`: `trainer/main.py`'s `main()` with one addition, a checkpoint written right
after `Trainer.resume()` into a side folder (`--resave-to`). Those files, written by W' ranks, must equal the
W-rank checkpoint exactly. The run then trains on as usual, and its next checkpoint must match the uninterrupted
W-rank run within float noise (same global batch, BatchNorm frozen: the trajectory does not depend on the rank count).
Under DeepSpeed ZeRO (bf16) the same holds for the engine's partitioned fp32 master weights and optimizer state.

Synthetic data (no dataset to generate, no verification pass) keeps the launches short.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

# 96 samples of 12 classes; global batch 12 splits over 1, 2 and 3 ranks; 12 classes as 12, 6+6 and 4+4+4.
ARGS = [
    "--data.source",
    "synthetic",
    "--data.num_images",
    "96",
    "--data.num_classes",
    "12",
    "--train.global_batch_size",
    "12",
    "--network.freeze_batchnorm",
    "true",
    "--train.save_every",
    "2",
    "--eval.every",
    "0",
    "--train.keep_checkpoints",
    "5",
]
ENTRY = "tests.distributed.test_resharding"  # run with `accelerate launch --module`: the repository root is on sys.path
CONFIG = {1: "cpu", 2: "cpu_ddp_2proc", 3: "cpu_ddp_3proc"}


def _run(
    out: Path,
    world_size: int,
    max_steps: int,
    cache: Path,
    resave_to: Path | None = None,
    config: str = "",
    extra: tuple[str, ...] = (),
) -> str:
    """Launch the CLI (with `config`, else the DDP config for `world_size`); return its `train.log` (the console
    wraps long lines, the log file does not)."""
    from tests.launching import TINY, free_port, launch

    config = config or CONFIG[world_size]
    args = ["--config", str(TINY), *ARGS, *extra, "--output", str(out), "--schedule.max_steps", str(max_steps)]
    # A port of its own whenever torch.distributed starts (DeepSpeed starts it for one process too).
    launcher = ["--main_process_port", str(free_port())] if world_size > 1 or config else []
    if resave_to is not None:
        args += ["--resume", "--resave-to", str(resave_to)]
        proc = launch(args, cache, config=config, script=Path(ENTRY), launcher=["--module", *launcher])
    else:
        proc = launch(args, cache, config=config, launcher=launcher or None)
    assert proc.returncode == 0, proc.stdout[-2500:] + proc.stderr[-2500:]
    return (out / "train.log").read_text()


def _resume(
    source: Path, out: Path, world_size: int, max_steps: int, cache: Path, config: str = "", extra: tuple[str, ...] = ()
) -> tuple[Path, str]:
    """Copy one checkpoint into a fresh output folder, resume it on `world_size` ranks; return the re-saved copy."""
    shutil.copytree(source, out / "checkpoints" / source.name)
    log = _run(out, world_size, max_steps, cache, resave_to=out / "resaved", config=config, extra=extra)
    return out / "resaved" / "checkpoints" / source.name, log


def _head(checkpoint: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """The full class table: every shard's rows concatenated in class order, and the shards' metadata."""
    shards = []
    for path in checkpoint.glob("head-rank*-of-*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            shards.append((fh.metadata(), load_file(str(path))))
    shards.sort(key=lambda s: int(s[0]["class_start"]))
    first = shards[0][1]
    table = {k: torch.cat([tensors[k] for _, tensors in shards]) for k, v in first.items() if v.dim() > 0}
    table.update({k: v for k, v in first.items() if v.dim() == 0})  # AdamW's step: the same in every shard
    return table, [meta for meta, _ in shards]


def _assert_same_state(resaved: Path, original: Path, world_size: int) -> None:
    """The state right after resuming on `world_size` ranks is the checkpoint's, bit for bit."""
    head, metas = _head(resaved)
    original_head, original_metas = _head(original)
    assert len(metas) == world_size != len(original_metas)
    per_rank = 12 // world_size
    assert [(int(m["class_start"]), int(m["num_local"]), int(m["world_size"])) for m in metas] == [
        (r * per_rank, per_rank, world_size) for r in range(world_size)
    ]
    assert set(head) == set(original_head) == {"weight", "weight::momentum_buffer"}
    assert head["weight::momentum_buffer"].abs().sum() > 0  # the momentum really was saved, not a fresh zero
    for key in original_head:
        assert torch.equal(head[key], original_head[key]), key
    for name in ("model.safetensors", "optimizer.safetensors"):
        mine, theirs = load_file(str(resaved / name)), load_file(str(original / name))
        assert mine.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{name}: {key}"
    assert any(k.endswith("::momentum_buffer") for k in load_file(str(original / "optimizer.safetensors")))
    state = json.loads((resaved / "trainer_state.json").read_text())
    original_state = json.loads((original / "trainer_state.json").read_text())
    assert state["world_size"] == world_size
    assert (state["step"], state["epoch"], state["loss_history"]) == (
        original_state["step"],
        original_state["epoch"],
        original_state["loss_history"],
    )
    # The hyperparameters (momentum, weight decay) come from the checkpoint; lr is the schedule's.
    for part, group in original_state["optimizer_param_groups"].items():
        assert {k: v for k, v in state["optimizer_param_groups"][part].items() if k != "lr"} == {
            k: v for k, v in group.items() if k != "lr"
        }


def _assert_close_state(mine: Path, theirs: Path) -> None:
    """Two checkpoints of the same step made by different rank counts: equal within float noise."""
    head, other = _head(mine)[0], _head(theirs)[0]
    for key in other:
        torch.testing.assert_close(head[key], other[key], rtol=1e-4, atol=1e-6, msg=key)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(mine / name)), load_file(str(theirs / name))
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> Path:
    """The uninterrupted 2-rank run: checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("w2")
    _run(out, 2, 3, face_cache)
    return out


@pytest.fixture(scope="module")
def two_to_one(two_ranks: Path, tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("w2to1")
    resaved, log = _resume(_step(two_ranks, 2), out, 1, 3, face_cache)
    return out, resaved, log


def test_two_ranks_to_one(two_ranks: Path, two_to_one: tuple[Path, Path, str]) -> None:
    out, resaved, log = two_to_one
    assert "made with 2 ranks, this run has 1" in log and "resumed from" in log
    _assert_same_state(resaved, _step(two_ranks, 2), world_size=1)
    # One more step on 1 rank lands where the uninterrupted 2-rank run's step 3 is.
    _assert_close_state(_step(out, 3), _step(two_ranks, 3))


def test_one_rank_to_two_and_two_to_three(
    two_ranks: Path, two_to_one: tuple[Path, Path, str], tmp_path: Path, face_cache: Path
) -> None:
    """1->2 from the 1-rank run's step 3, 2->3 from the 2-rank run's step 3; both then take step 4."""
    one_rank_step3 = _step(two_to_one[0], 3)
    resaved_12, log_12 = _resume(one_rank_step3, tmp_path / "w1to2", 2, 4, face_cache)
    assert "made with 1 ranks, this run has 2" in log_12
    _assert_same_state(resaved_12, one_rank_step3, world_size=2)

    resaved_23, log_23 = _resume(_step(two_ranks, 3), tmp_path / "w2to3", 3, 4, face_cache)
    assert "made with 2 ranks, this run has 3" in log_23
    _assert_same_state(resaved_23, _step(two_ranks, 3), world_size=3)
    # From (nearly) the same state at step 3, the 2-rank and the 3-rank run take the same step 4.
    _assert_close_state(_step(tmp_path / "w2to3", 4), _step(tmp_path / "w1to2", 4))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "optimizer", "new_world"),
    [("zero2", "sgd", 3), ("zero1", "adamw", 1)],
    ids=["zero2-sgd-2to3", "zero1-adamw-2to1"],
)
def test_deepspeed_moves_to_another_rank_count_losing_nothing(
    tmp_path: Path, face_cache: Path, stage: str, optimizer: str, new_world: int
) -> None:
    """ZeRO partitions the backbone's fp32 master weights and optimizer state by rank. A checkpoint keeps both
    rank-independently (model.safetensors: the fp32 weights; optimizer.safetensors: every parameter's full
    momentum, or AdamW's two moments and step, gathered from the partitions), and a run on another rank count
    re-partitions them: right after the move they equal the checkpoint's bit for bit, and the next step lands
    where the uninterrupted 2-rank run's did (bf16 compute: the gradients of a different split of the global
    batch over the ranks differ by bf16 rounding, hence the tolerance below)."""
    from tests.launching import CONFIGS

    config = CONFIGS / f"cpu_ds_{stage}_bf16.yaml"
    moved = tmp_path / f"{stage}_{new_world}proc.yaml"
    moved.write_text(config.read_text().replace("num_processes: 2", f"num_processes: {new_world}"))
    extra = ("--optim.name", optimizer, "--optim.lr", "1e-3" if optimizer == "adamw" else "0.1")
    extra += ("--head.update", "dense") if optimizer == "adamw" else ()
    two_ranks = tmp_path / "w2"
    _run(two_ranks, 2, 3, face_cache, config=str(config), extra=extra)
    resaved, log = _resume(
        _step(two_ranks, 2), tmp_path / "moved", new_world, 3, face_cache, config=str(moved), extra=extra
    )
    assert f"DeepSpeed backbone state moved from 2 to {new_world} ranks" in log
    assert f"made with 2 ranks, this run has {new_world}" in log
    original = _step(two_ranks, 2)
    keys = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq", "step"}}[optimizer]
    saved_state = load_file(str(original / "optimizer.safetensors"))
    assert {k.split("::")[1] for k in saved_state} == keys
    assert all(v.abs().sum() > 0 for v in saved_state.values())  # real state, not a fresh zero
    # Right after the move: the engine's fp32 master weights and optimizer state are the checkpoint's, exactly.
    for name in ("model.safetensors", "optimizer.safetensors"):
        mine, theirs = load_file(str(resaved / name)), load_file(str(original / name))
        assert mine.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{name}: {key}"
    head, metas = _head(resaved)
    original_head, _ = _head(original)
    assert len(metas) == new_world and all(torch.equal(head[k], original_head[k]) for k in original_head)
    # One step later, on new_world ranks, the same place as the uninterrupted run's step 3: the weight update and
    # each kind of optimizer state within 1% (relative norm over the whole backbone; measured 0.2% for ZeRO-2 SGD
    # 2->3, 0.13-0.2% for ZeRO-1 AdamW 2->1). An SGD momentum restarted from zero would be ~66% off.
    after, uninterrupted = _step(tmp_path / "moved", 3), _step(two_ranks, 3)
    weights = load_file(str(original / "model.safetensors"))
    update = {k: v - weights[k] for k, v in load_file(str(after / "model.safetensors")).items()}
    expected = {k: v - weights[k] for k, v in load_file(str(uninterrupted / "model.safetensors")).items()}
    assert _relative_error(update, expected) < 1e-2
    state = load_file(str(after / "optimizer.safetensors"))
    expected_state = load_file(str(uninterrupted / "optimizer.safetensors"))
    for key in keys:
        mine, theirs = ({k: v for k, v in d.items() if k.endswith(f"::{key}")} for d in (state, expected_state))
        assert _relative_error(mine, theirs) < 1e-2, key
    if optimizer == "sgd":  # the tolerance tells a kept momentum from a lost one
        assert _relative_error(state, {k: v - 0.9 * saved_state[k] for k, v in expected_state.items()}) > 0.3


def _relative_error(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """|mine - theirs| / |theirs| over all tensors together (float32 vectors)."""
    assert mine.keys() == theirs.keys()
    a = torch.cat([mine[k].float().flatten() for k in sorted(theirs)])
    b = torch.cat([theirs[k].float().flatten() for k in sorted(theirs)])
    return float((a - b).norm() / b.norm())


def _resave_after_resume() -> int:
    """`trainer/main.py` whose `Trainer.resume()` also writes the resumed state to `--resave-to` (tests only): the
    run's own checkpointer, pointed at another run folder, saves what it just loaded."""
    argv = sys.argv[1:]
    index = argv.index("--resave-to")
    from models.run_folder import RunFolder
    from trainer.loop import Trainer

    resave_to = RunFolder(argv[index + 1])
    del argv[index : index + 2]

    from trainer.main import main

    resume = Trainer.resume

    def resume_then_save(self: Trainer, path: Path) -> None:
        resume(self, path)
        folder, self.checkpointer.folder = self.checkpointer.folder, resave_to
        try:
            self.checkpointer.save(self.state.step)  # collective: every rank writes its shard of the state just loaded
        finally:
            self.checkpointer.folder = folder

    Trainer.resume = resume_then_save  # type: ignore[method-assign]
    return main(argv)


if __name__ == "__main__":
    sys.exit(_resave_after_resume())
