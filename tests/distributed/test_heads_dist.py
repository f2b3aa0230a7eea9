"""Every registered head over 1, 2 and 3 gloo ranks on CPU: the same loss, gradients and running state as its
float64 paper formula on one process (tests/heads_reference.py), with all centers and with sampled negatives; and a
checkpoint saved by 2 ranks (`trainer.checkpoint.save_checkpoint`) that 3 ranks and 1 rank load to take the next step
exactly as the 2 ranks did, running state included.

2 and 3 ranks are spawned once each for all heads (start-up dominates); ranks write their results to a folder that
the parent compares. One process runs in the test process itself. The 2-rank spawn writes the checkpoints that the
3-rank spawn and the one process load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.heads_reference import SEED, head_cases, reference_step, state_of
from tests.launching import spawn_ranks

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

DTYPE = torch.float64
EMBEDDING, CLASSES, BATCH, INPUT = 8, 12, 12, 6  # 12 classes as 12, 6+6, 4+4+4; global batch 12 as 12, 6x2, 4x3
NAMES = sorted(head_cases())


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, EMBEDDING, dtype=DTYPE, generator=generator) * 10
    labels = torch.randperm(2 * CLASSES, generator=generator)[:BATCH] % CLASSES
    return x, labels


def _table(head: Any) -> torch.Tensor:
    shape = (CLASSES, *head.row_tensors()["weight"].shape[1:])
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(7))


def _build(name: str, rank: int, world_size: int, sample_rate: float = 1.0) -> Any:
    from heads import build_head

    cfg = dataclasses.replace(head_cases()[name][0], sample_rate=sample_rate)
    head: Any = build_head(cfg, embedding_size=EMBEDDING, num_classes=CLASSES, rank=rank, world_size=world_size)
    head.reset_parameters(seed=SEED)
    return head.to(DTYPE)


def _rows(rank: int, world_size: int) -> slice:
    per_rank = BATCH // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _formula_case(name: str, rank: int, world_size: int, sample_rate: float) -> list[dict[str, Any]]:
    """Two steps of the head on this rank's slice of the global batch (no optimizer): per-step results."""
    head = _build(name, rank, world_size, sample_rate)
    head.dp_average = False  # the exact gradient of this rank's rows, comparable with the reference's
    with torch.no_grad():
        head.weight.copy_(_table(head)[head.class_start : head.class_start + head.num_local])
    torch.manual_seed(1000 + rank)  # ranks draw different negatives on purpose
    steps = []
    for step in range(2):
        x, labels = _global_batch(step)
        x = x[_rows(rank, world_size)].clone().requires_grad_()
        head.weight.grad = None
        loss = head(x, labels[_rows(rank, world_size)])
        loss.backward()
        steps.append(
            {
                "loss": loss.detach(),
                "x_grad": x.grad,
                "weight_grad": head.weight.grad.to_dense().clone(),  # lazy (the default): sparse rows
                "state": state_of(head),
                "index": None if head.last_sampled_index is None else head.last_sampled_index + head.class_start,
                "class_start": head.class_start,
            }
        )
    return steps


class _Run:
    """A tiny backbone (linear) and a head with one SGD optimizer (two groups, as the trainer), DDP emulated by
    averaging the backbone's gradients over ranks."""

    def __init__(self, name: str, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(5)  # the same backbone on every rank
        self.backbone = nn.Linear(INPUT, EMBEDDING).to(DTYPE)
        self.head = _build(name, rank, world_size)
        self.optimizer = torch.optim.SGD(
            [{"params": self.backbone.parameters()}, {"params": self.head.parameters()}],
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
        )

    def step(self, step: int) -> float:
        generator = torch.Generator().manual_seed(500 + step)
        inputs = torch.randn(BATCH, INPUT, dtype=DTYPE, generator=generator) * 4
        labels = torch.randperm(2 * CLASSES, generator=generator)[:BATCH] % CLASSES
        rows = _rows(self.rank, self.world_size)
        loss = self.head(self.backbone(inputs[rows]), labels[rows])
        loss.backward()
        if self.world_size > 1:
            for param in self.backbone.parameters():
                assert param.grad is not None
                dist.all_reduce(param.grad)
                param.grad /= self.world_size
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def snapshot(self, loss: float) -> dict[str, Any]:
        momentum = self.optimizer.state[self.head.weight]["momentum_buffer"]
        return {
            "loss": loss,
            "backbone": {k: v.clone() for k, v in self.backbone.state_dict().items()},
            "rows": {k: v.detach().clone() for k, v in self.head.row_tensors().items()},
            "momentum": momentum.clone(),
            "global": {k: v.detach().clone() for k, v in self.head.global_tensors().items()},
            "class_start": self.head.class_start,
        }

    def save(self, folder: Path, step: int) -> Path:
        from trainer.checkpoint import model_metadata, save_checkpoint

        return save_checkpoint(
            folder,
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            barrier=dist.barrier,
            backbone=self.backbone,
            head=self.head,
            backbone_group=(self.optimizer, 0),
            head_group=(self.optimizer, 1),
            trainer_state={"step": step},
            metadata=model_metadata("linear", EMBEDDING),
            keep=2,
        )

    def load(self, path: Path) -> None:
        from trainer.checkpoint import load_checkpoint

        load_checkpoint(
            path,
            rank=self.rank,
            world_size=self.world_size,
            backbone=self.backbone,
            head=self.head,
            backbone_group=(self.optimizer, 0),
            head_group=(self.optimizer, 1),
        )


def _checkpoint_case(name: str, rank: int, world_size: int, folder: Path) -> dict[str, Any]:
    """2 ranks: steps 1-2, save, then epoch 1 starts (sub-center ArcFace drops there) and step 3. Other world sizes:
    load the 2-rank checkpoint, start epoch 1, step 3."""
    run = _Run(name, rank, world_size)
    run.head.start_epoch(0)
    if world_size == 2:
        run.step(1)
        run.step(2)
        run.save(folder / name, 2)
    else:
        run.load(folder / name / "checkpoints" / f"step-{2:08d}")
    run.head.start_epoch(1)
    return run.snapshot(run.step(3))


def _run_cases(rank: int, world_size: int, checkpoints: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"formula": {}, "checkpoint": {}}
    for name in NAMES:
        for rate in (1.0, 0.5):
            results["formula"][(name, rate)] = _formula_case(name, rank, world_size, rate)
        results["checkpoint"][name] = _checkpoint_case(name, rank, world_size, checkpoints)
    return results


def _worker(rank: int, world_size: int, out_dir: str, checkpoints: str) -> None:
    """One rank, inside the gloo process group that spawn_ranks sets up and tears down."""
    torch.save(_run_cases(rank, world_size, Path(checkpoints)), Path(out_dir) / f"rank{rank}.pt")


def _spawn(world_size: int, folder: Path, checkpoints: Path) -> list[dict[str, Any]]:
    spawn_ranks(_worker, (world_size, str(folder), str(checkpoints)), world_size)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    """world_size -> per-rank results; the 2-rank spawn runs first (it writes the checkpoints)."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        for size in sorted({2, world_size}, key=lambda s: s != 2):
            if size in cache:
                continue
            if size == 1:  # in this process, without a process group: one process is the plain code path
                cache[1] = [_run_cases(0, 1, checkpoints)]
            else:
                cache[size] = _spawn(size, tmp_path_factory.mktemp(f"ranks{size}"), checkpoints)
        return cache[world_size]

    return get


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5], ids=["all-centers", "sampled"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_head_matches_its_formula_on_any_number_of_ranks(
    world_size: int, sample_rate: float, results: Callable[[int], list[dict[str, Any]]]
) -> None:
    ranks = results(world_size)
    for name in NAMES:
        ref_cfg = head_cases()[name][1]
        state: dict[str, torch.Tensor] = {}
        for step in range(2):
            x, labels = _global_batch(step)
            per_rank = [r["formula"][(name, sample_rate)][step] for r in ranks]
            table = _table(_build(name, 0, 1))
            if sample_rate < 1.0:
                index = torch.cat([r["index"] for r in per_rank])  # every rank's sampled classes, in class order
                position = {int(c): i for i, c in enumerate(index)}
                ref_labels = torch.tensor([position[int(c)] for c in labels])
                state.pop("hits", None)  # the reference's sub-center state is per sampled table
                state.pop("active", None)
                ref_loss, ref_x_grad, ref_w_grad = reference_step(name, x, table[index], ref_labels, ref_cfg, state)
            else:
                ref_loss, ref_x_grad, ref_w_grad = reference_step(name, x, table, labels, ref_cfg, state)
            offset = 0
            for rank, result in enumerate(per_rank):
                msg = f"{name}, rank {rank} of {world_size}, step {step}"
                assert_tight(result["loss"], ref_loss)
                assert_tight(result["x_grad"], ref_x_grad[_rows(rank, world_size)])
                if sample_rate < 1.0:
                    local = result["index"] - result["class_start"]
                    assert_tight(result["weight_grad"][local], ref_w_grad[offset : offset + local.numel()])
                    offset += local.numel()
                else:
                    start = result["class_start"]
                    assert_tight(result["weight_grad"], ref_w_grad[start : start + result["weight_grad"].shape[0]])
                for key, value in result["state"].items():
                    if key == "hits":
                        if sample_rate == 1.0:  # per-class counts: this rank's classes
                            start = result["class_start"]
                            assert torch.equal(value, state["hits"][start : start + value.shape[0]]), msg
                    else:  # global state: the same on every rank, equal to the one-process formula
                        assert_tight(value.to(DTYPE), state[key].to(DTYPE))


def _whole(snapshots: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    ordered = sorted(snapshots, key=lambda s: s["class_start"])
    if key == "momentum":
        return {"momentum": torch.cat([s["momentum"] for s in ordered])}
    return {k: torch.cat([s["rows"][k] for s in ordered]) for k in ordered[0]["rows"]}


@pytest.mark.parametrize("world_size", [3, 1])
def test_checkpoint_from_two_ranks_resumes_exactly(
    world_size: int, results: Callable[[int], list[dict[str, Any]]]
) -> None:
    two, other = results(2), results(world_size)
    for name in NAMES:
        mine = [r["checkpoint"][name] for r in other]
        theirs = [r["checkpoint"][name] for r in two]
        for snapshot in mine:
            assert snapshot["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-12, abs=1e-12), name
            for key, value in theirs[0]["backbone"].items():
                assert_tight(snapshot["backbone"][key], value)
            for key, value in theirs[0]["global"].items():  # running statistics, the same on every rank
                assert_tight(snapshot["global"][key].to(DTYPE), value.to(DTYPE))
        for key in ("rows", "momentum"):
            a, b = _whole(mine, key), _whole(theirs, key)
            assert a.keys() == b.keys()
            for row_key in b:
                if b[row_key].is_floating_point():
                    assert_tight(a[row_key], b[row_key])
                else:  # sub-center counts and masks
                    assert torch.equal(a[row_key], b[row_key]), (name, row_key)
        if name == "subcenter_arcface":  # the drop at epoch 1 happened, from the resharded counts
            active = _whole(mine, "rows")["subcenter_active"]
            assert active.sum(dim=1).eq(1).all()
