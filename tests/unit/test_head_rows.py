"""heads.rows.center_cosine: the cosines and gradients of normalize-then-multiply, without the normalized table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.rows import center_cosine


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
