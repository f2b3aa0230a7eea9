"""PartialFC over 2 and 3 gloo ranks on CPU equals one process's softmax cross-entropy on the global batch.

Each world size is spawned once (module fixture); each rank writes its results into a temporary folder and the
parent compares them with an independent single-process
computation (autograd + F.cross_entropy on the full class matrix).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from heads import MarginSettings, MarginSoftmax, PartialFC, PartialFCOptions
from heads.distributed import all_gather_no_grad
from tests.launching import spawn_ranks

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

DTYPE = torch.float64
EMBEDDING_SIZE = 8
MARGIN = {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding: the computations differ only in the order of operations."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def _run_case(rank: int, world_size: int, case: dict[str, Any]) -> dict[str, Any]:
    """Run PartialFC on this rank's slice of the case's global batch, with dp_average off and on."""
    x_global, labels_global, weight_global = case["x"], case["labels"], case["weight"]
    per_rank = x_global.shape[0] // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results: dict[str, Any] = {}
    for dp_average in (False, True):
        options = PartialFCOptions(
            EMBEDDING_SIZE, case["num_classes"], sample_rate=case["sample_rate"], dp_average=dp_average
        )
        head = PartialFC(options, MarginSettings(**MARGIN)).to(DTYPE)
        with torch.no_grad():
            head.weight.copy_(weight_global[head.class_start : head.class_start + head.num_local])
        x = x_global[rows].clone().requires_grad_()
        torch.manual_seed(1000 + rank)  # ranks draw different negatives on purpose
        loss = head(x, labels_global[rows])
        loss.backward()
        results[f"dp_average={dp_average}"] = {
            "loss": loss.detach(),
            "x_grad": x.grad,
            "weight_grad": head.weight.grad,
            "shard": head.shard_info(),
            "sampled_index": head.last_sampled_index,
        }
    return results


def _worker(rank: int, world_size: int, cases_file: str, out_dir: str) -> None:
    """One rank (inside spawn_ranks' gloo process group): run every case, check the unequal-batch error, save the
    results for the parent."""
    cases: dict[str, dict[str, Any]] = torch.load(cases_file)
    results = {name: _run_case(rank, world_size, case) for name, case in cases.items()}
    try:
        all_gather_no_grad(torch.zeros(4 + rank, 3))
    except ValueError as error:
        results["mismatch_error"] = {"message": str(error)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn(world_size: int, cases: dict[str, dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``cases`` on ``world_size`` fresh processes (one spawn per world size: start-up dominates)."""
    cases_file = tmp_path / "cases.pt"
    torch.save(cases, cases_file)
    spawn_ranks(_worker, (world_size, str(cases_file), str(tmp_path)), world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def _make_case(num_classes: int, batch: int, sample_rate: float, labels: torch.Tensor | None = None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(num_classes * 100 + batch)
    if labels is None:
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return {
        "num_classes": num_classes,
        "sample_rate": sample_rate,
        "x": torch.randn(batch, EMBEDDING_SIZE, dtype=DTYPE, generator=generator),
        "labels": labels,
        "weight": torch.randn(num_classes, EMBEDDING_SIZE, dtype=DTYPE, generator=generator) * 0.01,
    }


FULL_CASE = _make_case(num_classes=10, batch=12, sample_rate=1.0)  # 3 ranks: uneven split 4 / 3 / 3
# 40 classes -> 20 per rank, rate 0.25 -> int(0.25 * 20) = 5 centers unless a rank has more positives.
# Rank 0 (classes 0-19) gets 2 positives, rank 1 (classes 20-39) gets 7.
SAMPLED_LABELS = torch.tensor([3, 17, 3, 21, 22, 25, 29, 30, 33, 38, 21, 38])
SAMPLED_CASE = _make_case(num_classes=40, batch=12, sample_rate=0.25, labels=SAMPLED_LABELS)
CASES_BY_WORLD_SIZE = {2: {"full": FULL_CASE, "sampled": SAMPLED_CASE}, 3: {"full": FULL_CASE}}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    """world_size -> per-rank results of every case for that world size, spawned once per module."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            tmp_path = tmp_path_factory.mktemp(f"ranks{world_size}")
            cache[world_size] = _spawn(world_size, CASES_BY_WORLD_SIZE[world_size], tmp_path)
        return cache[world_size]

    return get


def _single_process(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, d loss/d x and d loss/d weight of one process on the global batch."""
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    cos = (F.normalize(x) @ F.normalize(weight).T).clamp(-1, 1)
    loss = F.cross_entropy(MarginSoftmax(**MARGIN)(cos, labels), labels)
    loss.backward()
    assert x.grad is not None and weight.grad is not None
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("world_size", [2, 3])
def test_full_softmax_matches_single_process(
    world_size: int, rank_results: Callable[[int], list[dict[str, Any]]]
) -> None:
    case = FULL_CASE
    num_classes, batch = case["num_classes"], case["x"].shape[0]
    results = [r["full"] for r in rank_results(world_size)]
    ref_loss, ref_x_grad, ref_weight_grad = _single_process(case["x"], case["weight"], case["labels"])

    per_rank = batch // world_size
    next_start = 0
    for rank, result in enumerate(results):
        exact, averaged = result["dp_average=False"], result["dp_average=True"]
        shard = exact["shard"]
        assert (shard["rank"], shard["world_size"], shard["class_start"]) == (rank, world_size, next_start)
        next_start += shard["num_local"]
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        centers = slice(shard["class_start"], shard["class_start"] + shard["num_local"])
        for result_dp in (exact, averaged):
            assert_tight(result_dp["loss"], ref_loss)
            assert_tight(result_dp["weight_grad"], ref_weight_grad[centers])
            assert result_dp["sampled_index"] is None
        assert_tight(exact["x_grad"], ref_x_grad[rows])
        # DDP / ZeRO will divide by world_size; dp_average pre-multiplies so the average is the exact gradient.
        assert_tight(averaged["x_grad"], world_size * ref_x_grad[rows])
    assert next_start == num_classes
    if world_size == 3:
        assert [r["dp_average=False"]["shard"]["num_local"] for r in results] == [4, 3, 3]


def test_sampled_two_ranks(rank_results: Callable[[int], list[dict[str, Any]]]) -> None:
    case, labels = SAMPLED_CASE, SAMPLED_LABELS
    results = [r["sampled"] for r in rank_results(2)]

    sampled_classes: list[int] = []
    for result in results:
        exact = result["dp_average=False"]
        shard, index, weight_grad = exact["shard"], exact["sampled_index"], exact["weight_grad"]
        local_positives = {c - shard["class_start"] for c in labels.tolist()} & set(range(shard["num_local"]))
        assert local_positives <= set(index.tolist())
        assert index.numel() == max(5, len(local_positives))
        assert torch.equal(index, torch.unique(index))
        unsampled = torch.ones(shard["num_local"], dtype=torch.bool)
        unsampled[index] = False
        assert torch.equal(weight_grad[unsampled], torch.zeros_like(weight_grad[unsampled]))
        assert weight_grad[index].abs().sum(dim=1).gt(0).all()
        sampled_classes += (index + shard["class_start"]).tolist()
        # Same seed in both passes: dp_average changes only the embedding gradient's scale.
        assert torch.equal(result["dp_average=True"]["sampled_index"], index)
    assert [r["dp_average=False"]["sampled_index"].numel() for r in results] == [5, 7]

    # Independently: one process's cross-entropy over the union of both ranks' sampled centers.
    position = {cls: i for i, cls in enumerate(sampled_classes)}
    sub_labels = torch.tensor([position[c] for c in labels.tolist()])
    ref_loss, ref_x_grad, ref_sub_grad = _single_process(case["x"], case["weight"][sampled_classes], sub_labels)
    offset = 0
    for rank, result in enumerate(results):
        exact, averaged = result["dp_average=False"], result["dp_average=True"]
        index = exact["sampled_index"]
        assert_tight(exact["loss"], ref_loss)
        assert_tight(averaged["loss"], ref_loss)
        assert_tight(exact["x_grad"], ref_x_grad[rank * 6 : (rank + 1) * 6])
        assert_tight(averaged["x_grad"], 2 * ref_x_grad[rank * 6 : (rank + 1) * 6])
        assert_tight(exact["weight_grad"][index], ref_sub_grad[offset : offset + index.numel()])
        offset += index.numel()


@pytest.mark.parametrize("world_size", [2, 3])
def test_unequal_batch_sizes_raise_on_every_rank(
    world_size: int, rank_results: Callable[[int], list[dict[str, Any]]]
) -> None:
    expected = str([(4 + rank, 3) for rank in range(world_size)])
    for result in rank_results(world_size):
        assert "equal batch size" in result["mismatch_error"]["message"]
        assert expected in result["mismatch_error"]["message"]
