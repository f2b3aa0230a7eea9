"""PartialFC in one process (torch.distributed not initialized) against an independent softmax cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads import (
    Head,
    HeadConfig,
    MarginSettings,
    MarginSoftmax,
    PartialFC,
    PartialFCOptions,
    build_head,
    list_heads,
    register_head,
)
from heads.distributed import all_gather_no_grad, all_gather_with_grad, distributed_softmax_cross_entropy, world_info

DTYPE = torch.float64

MARGINS = {
    "arcface": MarginSettings(s=64.0, m2=0.5),
    "cosface": MarginSettings(s=64.0, m2=0.0, m3=0.4),
    "combined": MarginSettings(s=32.0, m1=0.9, m2=0.4, m3=0.15),
}


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding: the computations differ only in the order of operations."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def reference(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: MarginSoftmax
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, d loss/d x and d loss/d weight from plain autograd + F.cross_entropy."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    cos = (F.normalize(x) @ F.normalize(weight).T).clamp(-1, 1)
    loss = F.cross_entropy(margin(cos, labels), labels)
    loss.backward()
    assert x.grad is not None and weight.grad is not None
    return loss.detach(), x.grad, weight.grad


def make_head(
    num_classes: int, embedding_size: int = 16, seed: int = 0, margin: MarginSettings | None = None, **options: object
) -> PartialFC:
    torch.manual_seed(seed)
    return PartialFC(PartialFCOptions(embedding_size, num_classes, **options), margin).to(DTYPE)  # type: ignore[arg-type]


def run_head(head: PartialFC, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    assert head.weight.grad is not None and x.grad is not None
    return loss.detach(), x.grad, head.weight.grad.clone()


def test_single_process_defaults() -> None:
    assert world_info() == (0, 1)
    head = PartialFC(PartialFCOptions(8, 10))
    assert (head.rank, head.world_size, head.class_start, head.num_local) == (0, 1, 0, 10)
    assert head.margin.extra_repr() == MarginSoftmax.arcface(64.0, 0.5).extra_repr()
    assert head.weight.shape == (10, 8) and head.weight.dtype == torch.float32
    assert 0.005 < head.weight.std().item() < 0.02  # normal(0, 0.01)
    assert head.last_sampled_index is None
    assert "num_classes=10" in repr(head) and "sample_rate=1.0" in repr(head)
    assert (head.update, head.lazy_sync_every, head.dp_average) == ("dense", 100, True)


@pytest.mark.parametrize("margin_name", list(MARGINS))
@pytest.mark.parametrize("dp_average", [True, False])
def test_full_softmax_equals_cross_entropy(margin_name: str, dp_average: bool) -> None:
    margin = MARGINS[margin_name]
    head = make_head(40, margin=margin, dp_average=dp_average)
    torch.manual_seed(1)
    x = torch.randn(24, 16, dtype=DTYPE) * 3
    labels = torch.randint(0, 40, (24,))
    loss, x_grad, w_grad = run_head(head, x, labels)
    ref_loss, ref_x_grad, ref_w_grad = reference(x, head.weight, labels, head.margin)
    assert_tight(loss, ref_loss)
    assert_tight(x_grad, ref_x_grad)
    assert_tight(w_grad, ref_w_grad)


@pytest.mark.parametrize("fallback", [False, True], ids=["insightface-head", "legacy-fallback"])
def test_fallback_region_targets_match_too(fallback: bool) -> None:
    # Embeddings opposite to their own centers: targets sit where theta + m > pi (ArcFace's old fallback region).
    head = make_head(6, embedding_size=4, margin=MarginSettings(s=64.0, m2=0.5, arcface_fallback=fallback))
    labels = torch.tensor([0, 1, 2, 3])
    x = -head.weight.detach()[labels] + 1e-3 * torch.randn(4, 4, dtype=DTYPE)
    cos = F.cosine_similarity(x, head.weight.detach()[labels])
    assert (cos < math.cos(math.pi - 0.5)).all()
    loss, x_grad, w_grad = run_head(head, x, labels)
    ref_loss, ref_x_grad, ref_w_grad = reference(x, head.weight, labels, head.margin)
    assert_tight(loss, ref_loss)
    assert_tight(x_grad, ref_x_grad)
    assert_tight(w_grad, ref_w_grad)


def test_fp32_compute_without_autocast() -> None:
    head = make_head(12).float()
    torch.manual_seed(2)
    x = torch.randn(8, 16).bfloat16().requires_grad_()
    labels = torch.randint(0, 12, (8,))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = head(x, labels)
    loss.backward()
    # Autocast would have run the matmul in bf16; the head ignores it and computes from x cast to fp32.
    expected, _, _ = reference(x.detach().float(), head.weight, labels, head.margin)
    assert loss.dtype == torch.float32 and x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def sampled_case(
    num_classes: int = 50, batch: int = 12, distinct: int = 4, sample_rate: float = 0.2, seed: int = 3
) -> tuple[PartialFC, torch.Tensor, torch.Tensor]:
    head = make_head(num_classes, sample_rate=sample_rate)
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=generator)[:distinct]
    labels = classes[torch.randint(0, distinct, (batch,), generator=generator)]
    labels[:distinct] = classes  # every chosen class occurs
    x = torch.randn(batch, 16, dtype=DTYPE, generator=generator)
    return head, x, labels


@pytest.mark.parametrize(("distinct", "expected_num_sample"), [(4, 10), (16, 16)])
def test_sampling_keeps_positives_and_sizes(distinct: int, expected_num_sample: int) -> None:
    # 50 local classes at rate 0.2: int(0.2 * 50) = 10 centers, unless the batch has more positives.
    head, x, labels = sampled_case(distinct=distinct, batch=24)
    run_head(head, x, labels)
    index = head.last_sampled_index
    assert index is not None and index.numel() == expected_num_sample
    assert torch.equal(index, torch.unique(index))  # sorted, no duplicates
    assert set(labels.tolist()) <= set(index.tolist())


def test_sampled_loss_and_grads_equal_cross_entropy_over_the_sub_matrix() -> None:
    head, x, labels = sampled_case()
    torch.manual_seed(5)  # sampling draws from the global RNG
    loss, x_grad, w_grad = run_head(head, x, labels)
    index = head.last_sampled_index
    assert index is not None
    position = {cls: i for i, cls in enumerate(index.tolist())}  # independent remap of the labels
    sub_labels = torch.tensor([position[c] for c in labels.tolist()])
    ref_loss, ref_x_grad, ref_sub_grad = reference(x, head.weight.detach()[index], sub_labels, head.margin)
    assert_tight(loss, ref_loss)
    assert_tight(x_grad, ref_x_grad)
    assert_tight(w_grad[index], ref_sub_grad)
    unsampled = torch.ones(head.num_local, dtype=torch.bool)
    unsampled[index] = False
    assert unsampled.any()
    assert torch.equal(w_grad[unsampled], torch.zeros_like(w_grad[unsampled]))  # exactly zero, not None

    # Same global RNG state -> same sample; the sample is not just the positives.
    torch.manual_seed(5)
    run_head(head, x, labels)
    assert head.last_sampled_index is not None and torch.equal(head.last_sampled_index, index)
    assert index.numel() > labels.unique().numel()


def test_sgd_weight_decay_and_momentum_still_move_unsampled_centers() -> None:
    lr, weight_decay, momentum = 0.1, 5e-4, 0.9
    head, x, labels = sampled_case()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    torch.manual_seed(7)
    optimizer.zero_grad()
    head(x, labels).backward()
    first = head.last_sampled_index
    optimizer.step()
    w1 = head.weight.detach().clone()
    buffer1 = optimizer.state[head.weight]["momentum_buffer"].clone()

    torch.manual_seed(8)
    optimizer.zero_grad()
    head(x, labels).backward()
    second = head.last_sampled_index
    assert first is not None and second is not None
    assert head.weight.grad is not None
    optimizer.step()

    unsampled = torch.ones(head.num_local, dtype=torch.bool)
    unsampled[second] = False
    was_sampled_first = torch.zeros(head.num_local, dtype=torch.bool)
    was_sampled_first[first] = True
    assert torch.equal(head.weight.grad[unsampled], torch.zeros_like(head.weight.grad[unsampled]))
    # grad is 0, so SGD's d_p = wd * w, buf = momentum * buf + d_p, w -= lr * buf: the rows still move.
    expected = w1 - lr * (momentum * buffer1 + weight_decay * w1)
    torch.testing.assert_close(head.weight.detach()[unsampled], expected[unsampled], rtol=1e-12, atol=1e-15)
    moved = (head.weight.detach() != w1).all(dim=1)
    assert moved[unsampled].all()
    # Rows sampled in step 1 but not step 2 carry momentum from their real gradient.
    assert (unsampled & was_sampled_first).any()


def test_unsampled_rows_do_not_move_without_weight_decay_and_momentum() -> None:
    head, x, labels = sampled_case()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    before = head.weight.detach().clone()
    head(x, labels).backward()
    optimizer.step()
    unsampled = torch.ones(head.num_local, dtype=torch.bool)
    unsampled[head.last_sampled_index] = False
    assert torch.equal(head.weight.detach()[unsampled], before[unsampled])
    assert not torch.equal(head.weight.detach()[~unsampled], before[~unsampled])


@pytest.mark.parametrize(("num_classes", "world_size"), [(10, 3), (12, 4), (7, 7), (1000, 16)])
def test_class_split_is_contiguous_and_balanced(num_classes: int, world_size: int) -> None:
    shards = [
        PartialFC(PartialFCOptions(4, num_classes, rank=r, world_size=world_size, sample_rate=0.5)).shard_info()
        for r in range(world_size)
    ]
    start = 0
    for rank, shard in enumerate(shards):
        assert shard == {
            "class_start": start,
            "num_local": shard["num_local"],
            "num_classes": num_classes,
            "rank": rank,
            "world_size": world_size,
        }
        start += shard["num_local"]
    assert start == num_classes
    sizes = [s["num_local"] for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_distributed_cross_entropy_is_plain_cross_entropy_in_one_process() -> None:
    torch.manual_seed(4)
    logits = torch.randn(9, 30, dtype=DTYPE) * 50  # probabilities far below fp64's range for some classes
    logits[0, 3] = -5000.0  # a target whose probability underflows to 0: the loss must stay exact
    labels = torch.randint(0, 30, (9,))
    labels[0] = 3
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = distributed_softmax_cross_entropy(ours, labels)
    (2.5 * loss).backward()
    ref_loss = F.cross_entropy(ref, labels)
    (2.5 * ref_loss).backward()
    assert_tight(loss, ref_loss)
    assert ours.grad is not None and ref.grad is not None
    assert_tight(ours.grad, ref.grad)
    assert torch.equal(ours.detach(), logits)  # input untouched


def test_distributed_cross_entropy_flags_unowned_labels_and_double_backward() -> None:
    logits = torch.randn(3, 5, dtype=DTYPE, requires_grad=True)
    assert torch.isnan(distributed_softmax_cross_entropy(logits, torch.tensor([0, -1, 2])))
    loss = distributed_softmax_cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_collectives_are_identities_in_one_process() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x and all_gather_no_grad(x) is x


def test_registry() -> None:
    assert "partial_fc" in list_heads()
    cfg = HeadConfig(name="partial_fc", sample_rate=0.5, update="sparse", lazy_sync_every=7)
    head = build_head(cfg, embedding_size=8, num_classes=5, rank=0, world_size=1)
    # The head owns its update mode and its settings: the optimizer reads them from it.
    assert isinstance(head, PartialFC) and (head.sample_rate, head.update, head.lazy_sync_every) == (0.5, "sparse", 7)
    assert isinstance(head, Head)  # the contract (heads.base) holds for the reference head
    assert set(head.row_tensors()) == {"weight"} and head.global_tensors() == {}
    with pytest.raises(ValueError, match=r"unknown head 'nope'.*partial_fc"):
        build_head(HeadConfig(name="nope"), embedding_size=8, num_classes=5, rank=0, world_size=1)
    with pytest.raises(ValueError, match="already registered"):
        register_head("partial_fc", settings=MarginSettings)(PartialFC)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 3, "rank": 0, "world_size": 4}, r"num_classes \(3\) must be >= world size \(4\)"),
        ({"sample_rate": 0.0}, r"sample_rate .* got 0\.0"),
        ({"sample_rate": 1.5}, r"sample_rate .* got 1\.5"),
        ({"rank": 2, "world_size": 2}, "rank=2"),
        ({"embedding_size": 0}, "embedding_size"),
        ({"update": "eager"}, "update must be one of dense, lazy, sparse, got 'eager'"),
        ({"lazy_sync_every": 0}, "lazy_sync_every must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    params: dict[str, object] = {"embedding_size": 8, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        PartialFC(PartialFCOptions(**params))  # type: ignore[arg-type]


def test_bad_forward_inputs() -> None:
    head = PartialFC(PartialFCOptions(8, 10))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        head(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per embedding"):
        head(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    # A shard built for 2 ranks, used without a process group.
    shard = PartialFC(PartialFCOptions(8, 10, rank=0, world_size=2))
    with pytest.raises(RuntimeError, match="world_size=2"):
        shard(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))


def test_seeded_init_does_not_depend_on_the_number_of_ranks() -> None:
    """reset_parameters(seed): the concatenated shards of 2 and 3 ranks equal the 1-rank matrix."""
    num_classes = (1 << 14) + 37  # spans two init chunks
    whole = PartialFC(PartialFCOptions(8, num_classes, rank=0, world_size=1))
    whole.reset_parameters(seed=5)
    for world in (2, 3):
        shards = []
        for rank in range(world):
            head = PartialFC(PartialFCOptions(8, num_classes, rank=rank, world_size=world))
            head.reset_parameters(seed=5)
            shards.append(head.weight.detach())
        assert torch.equal(torch.cat(shards), whole.weight.detach())
    other = PartialFC(PartialFCOptions(8, num_classes, rank=0, world_size=1))
    other.reset_parameters(seed=6)
    assert not torch.equal(other.weight, whole.weight)
    assert abs(float(whole.weight.detach().std()) - 0.01) < 1e-3
