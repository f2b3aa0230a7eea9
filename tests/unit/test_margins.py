"""MarginSoftmax against closed forms (float64), its true gradient, the fallback, and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from heads import MarginSoftmax, margins

DTYPE = torch.float64


def _apply_to_targets(margin: MarginSoftmax, cos: list[float]) -> torch.Tensor:
    """Margin applied to a (K, 2) matrix whose column 0 holds ``cos`` as the targets; returns column 0."""
    logits = torch.tensor([[c, 0.25] for c in cos], dtype=DTYPE)
    out = margin(logits, torch.zeros(len(cos), dtype=torch.long))
    # The non-target column is only scaled.
    torch.testing.assert_close(out[:, 1], torch.full((len(cos),), 0.25 * margin.s, dtype=DTYPE), rtol=0, atol=0)
    return out[:, 0]


def test_arcface_closed_form() -> None:
    s, m = 64.0, 0.5
    cos = [0.99, 0.7, 0.3, 0.0, -0.4, -0.85]  # all with theta + m < pi (threshold cos(pi - 0.5) = -0.8776)
    # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m): independent of arccos.
    expected = [s * (c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)) for c in cos]
    got = _apply_to_targets(MarginSoftmax.arcface(s=s, m=m), cos)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-12)


def test_arcface_default_has_no_fallback_as_insightface_head() -> None:
    s, m = 64.0, 0.5
    cos = [-0.88, -0.95, -0.999]  # theta + m > pi: cos(theta + m) all the same
    expected = [s * (c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)) for c in cos]
    got = _apply_to_targets(MarginSoftmax.arcface(s=s, m=m), cos)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    assert got[2].item() / s == pytest.approx(-0.8981, abs=1e-4)  # the figure for insightface HEAD


def test_arcface_fallback_option_is_the_legacy_insightface_rule() -> None:
    s, m = 64.0, 0.5
    cos = [-0.88, -0.95, -0.999]  # theta + m > pi
    expected = [s * (c - math.sin(math.pi - m) * m) for c in cos]
    got = _apply_to_targets(MarginSoftmax(s=s, m2=m, arcface_fallback=True), cos)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    assert got[2].item() / s == pytest.approx(-1.2387, abs=1e-4)
    # Above the threshold cos(pi - m) the option changes nothing.
    above = [0.5, -0.3, -0.87]
    torch.testing.assert_close(
        _apply_to_targets(MarginSoftmax(s=s, m2=m, arcface_fallback=True), above),
        _apply_to_targets(MarginSoftmax(s=s, m2=m), above),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("margin", [MarginSoftmax.arcface(16.0, 0.5), MarginSoftmax(16.0, 1.0, 0.3, 0.2)])
def test_constant_margin_grad_is_insightface_backward(margin: MarginSoftmax) -> None:
    """`margin_grad: constant`: the same logits, and d logit / d cos = s on every column (insightface edits the
    logits under no_grad), where `exact` differentiates the margin."""
    constant = MarginSoftmax(margin.s, margin.m1, margin.m2, margin.m3, margin_grad="constant")
    torch.manual_seed(3)
    cos = (torch.rand(5, 4, dtype=DTYPE) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([0, 3, -1, 1, 2])
    out = constant(cos, labels)
    torch.testing.assert_close(out, margin(cos, labels), rtol=0, atol=0)
    out.sum().backward()
    assert cos.grad is not None
    torch.testing.assert_close(cos.grad, torch.full_like(cos, margin.s), rtol=0, atol=0)
    exact = cos.detach().clone().requires_grad_()
    margin(exact, labels).sum().backward()
    assert exact.grad is not None and not torch.allclose(exact.grad[0, 0], cos.grad[0, 0])


def test_interclass_filtering_matches_insightface_formula() -> None:
    """insightface's CombinedMarginLoss: dirty = cos > threshold off the target column (every column of a row whose
    target is elsewhere); logits = (1 - dirty) * cos, then the margin; dirty columns get no gradient."""
    s, m, threshold = 8.0, 0.5, 0.4
    margin = MarginSoftmax(s=s, m2=m, interclass_filtering_threshold=threshold)
    cos = torch.tensor(
        [[0.9, 0.5, 0.2, -0.3], [0.45, 0.1, 0.8, 0.41], [0.6, 0.39, -0.9, 0.5]], dtype=DTYPE, requires_grad=True
    )
    labels = torch.tensor([0, 2, -1])
    out = margin(cos, labels)
    c = cos.detach()
    dirty = (c > threshold).to(DTYPE)
    dirty[0, 0] = dirty[1, 2] = 0.0  # the targets themselves are never filtered
    kept = (1 - dirty) * c
    expected = s * kept.clone()
    for row, label in ((0, 0), (1, 2)):
        t = kept[row, label].item()
        expected[row, label] = s * (t * math.cos(m) - math.sqrt(1 - t * t) * math.sin(m))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert cos.grad is not None
    assert torch.equal(cos.grad[dirty.bool()], torch.zeros(int(dirty.sum()), dtype=DTYPE))
    assert (cos.grad[~dirty.bool()] != 0).all()


def test_cosface_closed_form() -> None:
    s, m = 30.0, 0.35
    cos = [1.0, 0.6, 0.0, -0.7, -1.0]
    got = _apply_to_targets(MarginSoftmax.cosface(s=s, m=m), cos)
    torch.testing.assert_close(got, torch.tensor([s * (c - m) for c in cos], dtype=DTYPE), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("m1", "m2", "m3"), [(0.9, 0.4, 0.15), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (1.2, 0.2, 0.1)])
def test_combined_closed_form_and_general_fallback(m1: float, m2: float, m3: float) -> None:
    s = 32.0
    margin = MarginSoftmax(s=s, m1=m1, m2=m2, m3=m3)
    theta_max = (math.pi - m2) / m1
    cos = [0.95, 0.5, 0.1, -0.3, -0.6, -0.9, -0.99]

    def closed_form(c: float) -> float:
        theta = math.acos(c)
        if theta <= theta_max:
            return s * (math.cos(m1 * theta + m2) - m3)
        # Documented rule: the plain cosine shifted to meet the margined curve (-1 - m3) at theta_max.
        return s * (c - math.cos(theta_max) - 1.0 - m3)

    got = _apply_to_targets(margin, cos)
    torch.testing.assert_close(got, torch.tensor([closed_form(c) for c in cos], dtype=DTYPE), rtol=1e-12, atol=1e-12)
    assert margin.has_fallback == (theta_max < math.pi)


@pytest.mark.parametrize(
    "margin",
    [
        MarginSoftmax(1.0, 1.0, 0.5, arcface_fallback=True),
        MarginSoftmax(1.0, 1.2, 0.2, 0.1),
        MarginSoftmax(1.0, 0.9, 0.4, 0.15),
    ],
    ids=["arcface-legacy-fallback", "m1>1", "m1<1"],
)
def test_target_is_monotonic_in_theta(margin: MarginSoftmax) -> None:
    # A larger angle to the center must never give a larger target logit, fallback region included.
    cos = torch.linspace(-1.0, 1.0, 20001, dtype=DTYPE)
    target = margin.target_logit(cos)
    assert torch.all(target[1:] >= target[:-1])
    if not margin.is_arcface:  # the general fallback is also continuous at theta_max
        c = math.cos(margin.theta_max)
        below, above = margin.target_logit(torch.tensor([c - 1e-9, c + 1e-9], dtype=DTYPE)).tolist()
        assert above - below == pytest.approx(0.0, abs=1e-6)
        assert above == pytest.approx(-1.0 - margin.m3, abs=1e-6)


def test_rows_without_label_and_other_columns_are_only_scaled() -> None:
    torch.manual_seed(0)
    cos = torch.rand(5, 7, dtype=DTYPE) * 2 - 1
    labels = torch.tensor([3, -1, 0, -1, 6])
    margin = MarginSoftmax.arcface(s=10.0, m=0.5)
    out = margin(cos, labels)
    expected = cos * 10.0
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            expected[row, label] = 10.0 * margin.target_logit(cos[row, label]).item()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(out[labels == -1], cos[labels == -1] * 10.0, rtol=0, atol=0)


@pytest.mark.parametrize(
    "margin",
    [MarginSoftmax.arcface(8.0, 0.5), MarginSoftmax.cosface(8.0, 0.4), MarginSoftmax(8.0, 1.2, 0.2, 0.1)],
    ids=["arcface", "cosface", "combined"],
)
def test_gradcheck_away_from_clamp_edges(margin: MarginSoftmax) -> None:
    torch.manual_seed(1)
    # Targets in (-0.7, 0.9): away from +-1 (clamp) and from the fallback thresholds; rows 1 and 4 have no label.
    cos = (torch.rand(6, 5, dtype=DTYPE) * 1.6 - 0.7).requires_grad_()
    labels = torch.tensor([0, -1, 4, 2, -1, 2])
    assert torch.autograd.gradcheck(lambda c: margin(c, labels), (cos,), eps=1e-6, atol=1e-8)
    # Also in the general fallback region (a different, linear branch).
    if margin.has_fallback and not margin.is_arcface:
        low = torch.full((2, 3), -0.98, dtype=DTYPE, requires_grad=True)
        assert torch.autograd.gradcheck(lambda c: margin(c, torch.tensor([1, 2])), (low,), eps=1e-6, atol=1e-8)


def test_arcface_gradient_is_the_true_derivative_not_a_constant_offset() -> None:
    s, m = 64.0, 0.5
    cos = torch.tensor([[0.8, 0.1], [-0.2, 0.3]], dtype=DTYPE, requires_grad=True)
    MarginSoftmax.arcface(s, m)(cos, torch.tensor([0, 0])).sum().backward()
    assert cos.grad is not None
    c = cos.detach()[:, 0]
    # d/dc [c cos m - sqrt(1 - c^2) sin m] = cos m + c sin m / sqrt(1 - c^2); insightface's shortcut would give 1.
    expected = s * (math.cos(m) + c * math.sin(m) / torch.sqrt(1 - c * c))
    torch.testing.assert_close(cos.grad[:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cos.grad[:, 1], torch.full((2,), s, dtype=DTYPE), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_the_clamp_edges(dtype: torch.dtype) -> None:
    margin = MarginSoftmax(s=64.0, m1=1.2, m2=0.3, m3=0.1)
    for arc in (MarginSoftmax.arcface(), margin):
        cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0 - 1e-12, 0.0]], dtype=dtype, requires_grad=True)
        out = arc(cos, torch.tensor([0, 0, 0]))
        out.sum().backward()
        assert cos.grad is not None
        assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"s": 0.0}, "s"),
        ({"s": -1.0}, "s"),
        ({"s": math.nan}, "s"),
        ({"m1": 0.0}, "m1"),
        ({"m2": -0.1}, "m2"),
        ({"m2": math.pi}, "m2"),
        ({"m3": -0.2}, "m3"),
        ({"m3": math.inf}, "m3"),
        ({"margin_grad": "none"}, "margin_grad"),
        ({"interclass_filtering_threshold": 1.0}, "interclass_filtering_threshold"),
        ({"interclass_filtering_threshold": -0.1}, "interclass_filtering_threshold"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        MarginSoftmax(**kwargs)  # type: ignore[arg-type]


def test_bad_shapes() -> None:
    margin = MarginSoftmax.arcface()
    with pytest.raises(ValueError, match="2-D"):
        margin(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        margin(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


class _Squash:
    """A non-target map with a row dependence, for the test below: f(c) = c * (1 + r c) on row r's block (a stand-in
    for CurricularFace's hard negatives), its gradient 1 + 2 r c."""

    def apply_(self, out: torch.Tensor, cos: torch.Tensor, rows: slice, scratch: torch.Tensor) -> None:
        assert scratch.shape == (2, *cos.shape)
        r = torch.arange(rows.start, rows.stop, dtype=cos.dtype).unsqueeze(1) / 10
        torch.mul(cos, 1 + r * cos, out=out)

    def scale_grad_(self, grad: torch.Tensor, cos: torch.Tensor, rows: slice, scratch: torch.Tensor) -> None:
        assert scratch.shape == (2, *cos.shape)
        r = torch.arange(rows.start, rows.stop, dtype=cos.dtype).unsqueeze(1) / 10
        grad.mul_(1 + 2 * r * cos)


@pytest.mark.parametrize("others", [None, _Squash()], ids=["scaled", "mapped"])
@pytest.mark.parametrize("reuse_grad", [False, True], ids=["copy", "reuse"])
def test_margin_logits_equals_autograds_formulation(others: _Squash | None, reuse_grad: bool, monkeypatch) -> None:
    """margin_logits (every head's margin step) against gather / scatter / where through autograd in float64:
    values, the cosines' gradient and an extra input's (a per-row margin, as MagFace's), rows without a target
    keeping their mapped value; in blocks of rows (a small block size: several blocks)."""
    monkeypatch.setattr(margins, "BLOCK_ELEMENTS", 14)  # two rows of 7 per block
    torch.manual_seed(4)
    cos = (torch.rand(5, 7, dtype=DTYPE) * 1.6 - 0.8).requires_grad_()
    margin = (torch.rand(5, 1, dtype=DTYPE) * 0.5).requires_grad_()
    labels = torch.tensor([3, -1, 0, 6, -1])
    column = labels.clamp_min(0).unsqueeze(1)
    grad = torch.randn(5, 7, dtype=DTYPE)

    def targets(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.cos(torch.arccos(c) + m) - 0.1

    s = 8.0
    # The logits go through an op whose backward hands over a fresh buffer (as the cross-entropy's does).
    out = margins.margin_logits(cos, column, s, targets, labels >= 0, others, (margin,), reuse_grad)
    (out * 1.0).backward(grad)
    c2, m2 = cos.detach().clone().requires_grad_(), margin.detach().clone().requires_grad_()
    mapped = c2.clone() if others is None else c2 * (1 + torch.arange(5, dtype=DTYPE).unsqueeze(1) / 10 * c2)
    new = torch.where((labels >= 0).unsqueeze(1), targets(c2.gather(1, column), m2), mapped.gather(1, column))
    expected = (mapped * s).scatter(1, column, new * s)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    assert cos.grad is not None and margin.grad is not None
    torch.testing.assert_close(cos.grad, c2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(margin.grad, m2.grad, rtol=1e-12, atol=1e-12)
    assert margin.grad[labels < 0].abs().sum() == 0 and margin.grad[labels >= 0].abs().min() > 0
