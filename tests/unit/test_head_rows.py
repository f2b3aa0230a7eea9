"""heads.rows.center_cosine: the cosines and gradients of normalize-then-multiply, without the normalized table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.rows import CHUNK, best_center_cosine, center_cosine


def _reference(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    rows = weight if index is None else weight[index]
    return torch.einsum("ne,r...e->nr...", x, F.normalize(rows, dim=-1)).clamp(-1.0, 1.0)


@pytest.mark.parametrize("shape", [(50, 8), (20, 3, 8)], ids=["centers", "subcenters"])
@pytest.mark.parametrize("sampled", [False, True], ids=["all", "sampled"])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_equals_normalize_then_multiply_in_float64(shape: tuple[int, ...], sampled: bool, gradient: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    weight[3] *= 1e-3  # a short center: the norm's gradient matters
    index = torch.tensor([0, 3, 7, shape[0] - 1]) if sampled else None
    x = torch.randn(6, shape[-1], dtype=torch.float64)
    x[0] = weight[3].reshape(-1, shape[-1])[0] * 7  # a cosine of 1 (up to rounding): the clamp's edge
    grad_out = torch.randn(_reference(F.normalize(x), weight, index).shape, dtype=torch.float64)

    # The embeddings are normalized in the graph, as the head does (PartialFC.forward).
    w1, x1 = weight.clone().requires_grad_(), x.clone().requires_grad_()
    cos = center_cosine(F.normalize(x1), w1, index, gradient)  # type: ignore[arg-type]
    (cos * grad_out).sum().backward()
    w2, x2 = weight.clone().requires_grad_(), x.clone().requires_grad_()
    expected = _reference(F.normalize(x2), w2, index)
    (expected * grad_out).sum().backward()

    torch.testing.assert_close(cos, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert w1.grad is not None and w2.grad is not None
    assert w1.grad.is_sparse == (sampled and gradient == "sparse")
    if w1.grad.is_sparse:
        assert w1.grad._nnz() == len(index)  # type: ignore[arg-type]  # the sampled rows only
    torch.testing.assert_close(w1.grad.to_dense(), w2.grad, rtol=1e-10, atol=1e-12)


def test_cosines_are_clamped_to_one() -> None:
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[1.0 + 1e-9, 0.0]], dtype=torch.float64)  # not quite unit: cos 1 + 1e-9
    assert center_cosine(x, weight, None).tolist() == [[1.0, 0.0]]


def test_no_table_sized_tensor_at_sample_rate_one() -> None:
    """The only table-sized tensor backward makes is the gradient (a plain FC's cost): count allocations."""
    weight = torch.randn(4096, 64, requires_grad=True)
    x = F.normalize(torch.randn(16, 64)).requires_grad_()
    table = weight.numel() * 4
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        center_cosine(x, weight, None).sum().backward()
    large = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage >= table]
    # The ops that allocate themselves (not through a large child): the normalized formulation has 8 here.
    own = [
        e for e in large if not any(c.name.startswith("aten::") and c.cpu_memory_usage >= table for c in e.cpu_children)
    ]
    assert [e.name for e in own] == ["aten::empty"]  # the gradient (filled by chunks), nothing else


@pytest.mark.parametrize("sampled", [False, True], ids=["all", "sampled"])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_best_subcenter_equals_the_masked_max_in_float64(sampled: bool, gradient: str) -> None:
    """best_center_cosine: the cosines and winners of center_cosine's (N, C, K) masked with -2 where a sub-center is
    dropped and maxed over K, with autograd's gradient (the winner's only), for embeddings and centers."""
    torch.manual_seed(1)
    weight = torch.randn(20, 3, 8, dtype=torch.float64)
    weight[3, 1] *= 1e-3  # a short sub-center: the norm's gradient matters
    active = torch.rand(20, 3) < 0.7
    active[torch.arange(20), torch.randint(0, 3, (20,))] = True  # at least one per class
    active[5] = torch.tensor([False, True, False])  # a class reduced to one sub-center (after a drop)
    index = torch.tensor([0, 3, 5, 7, 19]) if sampled else None
    scored = active if index is None else active[index]
    x = torch.randn(6, 8, dtype=torch.float64)
    grad_out = torch.randn(6, 20 if index is None else 5, dtype=torch.float64)

    w1, x1 = weight.clone().requires_grad_(), x.clone().requires_grad_()
    cos, winner = best_center_cosine(F.normalize(x1), w1, index, gradient, scored)  # type: ignore[arg-type]
    (cos * grad_out).sum().backward()
    w2, x2 = weight.clone().requires_grad_(), x.clone().requires_grad_()
    expected, expected_winner = _reference(F.normalize(x2), w2, index).masked_fill(~scored, -2.0).max(dim=2)
    (expected * grad_out).sum().backward()

    assert winner.dtype == torch.uint8 and torch.equal(winner.long(), expected_winner)
    torch.testing.assert_close(cos, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert w1.grad is not None and w2.grad is not None
    assert w1.grad.is_sparse == (sampled and gradient == "sparse")
    torch.testing.assert_close(w1.grad.to_dense(), w2.grad, rtol=1e-10, atol=1e-12)
    assert not w1.grad.to_dense()[~active].any()  # a dropped sub-center gets no gradient


def test_best_subcenter_never_makes_the_batch_by_subcenter_tensor() -> None:
    """Neither direction makes an (N, C, K) tensor, nor anything as large beyond the table's gradient: the
    sub-center cosines exist chunk by chunk only (heads.rows.CHUNK rows at a time)."""
    classes, k = CHUNK, 3  # 3 * CHUNK rows: three chunks or more
    weight = torch.randn(classes, k, 16, requires_grad=True)
    x = F.normalize(torch.randn(8, 16)).requires_grad_()
    active = torch.ones(classes, k, dtype=torch.bool)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cos, _ = best_center_cosine(x, weight, None, "dense", active)
        cos.sum().backward()
    large = 8 * classes * k * 4  # (N, C, K) in float32
    made = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage >= large]
    assert made and set(made) <= {"aten::empty", "aten::new_empty"}  # the table's gradient (filled by chunks) only
    assert weight.grad is not None and weight.grad.shape == weight.shape
