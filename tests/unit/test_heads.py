"""Every registered head in one process against its paper's formula in float64 (tests/heads_reference.py): loss,
embedding gradient, center gradient and running state, over two steps, with all centers and with sampled ones;
plus what each head adds (sub-center dropping, ElasticFace's reproducible draws, MagFace's magnitude gradient) and
the `head:` section's validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heads import HeadConfig, build_head, list_heads
from heads.base import Head
from heads.elasticface import ElasticFacePartialFC
from heads.subcenter import SubCenterPartialFC
from tests.heads_reference import SEED, head_cases, reference_step, state_of

DTYPE = torch.float64
EMBEDDING, CLASSES, BATCH = 8, 12, 12
CASES = head_cases()


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings with norms around 28 (inside MagFace's [10, 110]) and labels; every class twice at most."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, EMBEDDING, dtype=DTYPE, generator=generator) * 10
    labels = torch.randperm(2 * CLASSES, generator=generator)[:BATCH] % CLASSES
    return x, labels


def centers(head: Head) -> torch.Tensor:
    """A fixed class table shaped like the head's (sub-centers included)."""
    shape = (CLASSES, *head.row_tensors()["weight"].shape[1:])
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(7))


def build(name: str, sample_rate: float = 1.0) -> Any:
    cfg, _ = CASES[name]
    cfg = dataclasses.replace(cfg, sample_rate=sample_rate)
    head: Any = build_head(cfg, embedding_size=EMBEDDING, num_classes=CLASSES, rank=0, world_size=1)
    head.reset_parameters(seed=SEED)
    return head.to(DTYPE)


def test_every_registered_head_has_a_reference() -> None:
    assert set(CASES) == set(list_heads())


@pytest.mark.parametrize("sample_rate", [1.0, 0.5], ids=["all-centers", "sampled"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_head_matches_its_paper_formula(name: str, sample_rate: float) -> None:
    head = build(name, sample_rate)
    assert isinstance(build(name), Head)  # the contract (heads.base) holds
    table = centers(head)
    with torch.no_grad():
        head.weight.copy_(table)
    ref_cfg, state = CASES[name][1], dict[str, torch.Tensor]()
    torch.manual_seed(0)  # the negatives Partial FC samples
    for step in range(2):  # the second step uses the running state the first one left
        x, labels = batch(step)
        x = x.requires_grad_()
        head.weight.grad = None
        loss = head(x, labels)
        loss.backward()
        if sample_rate < 1.0:
            index = head.last_sampled_index
            assert index is not None and index.numel() < CLASSES
            position = {int(c): i for i, c in enumerate(index)}
            ref = reference_step(
                name, x, table[index], torch.tensor([position[int(c)] for c in labels]), ref_cfg, state
            )
            unsampled = torch.ones(CLASSES, dtype=torch.bool)
            unsampled[index] = False
            grad = head.weight.grad
            assert grad.is_sparse == (head.update != "dense")  # lazy (the default): the sampled rows only
            grad = grad.to_dense()
            assert not grad[unsampled].any()
            weight_grad = grad[index]
        else:
            ref = reference_step(name, x, table, labels, ref_cfg, state)
            weight_grad = head.weight.grad
        ref_loss, ref_x_grad, ref_w_grad = ref
        assert_tight(loss.detach(), ref_loss)
        assert x.grad is not None
        assert_tight(x.grad, ref_x_grad)
        assert_tight(weight_grad, ref_w_grad)
        mine = state_of(head)
        if "hits" in mine and sample_rate < 1.0:
            mine["hits"] = mine["hits"][index]
            state.pop("hits")  # the reference's counts are per step on the sampled table; compare this step's
            state.pop("active")
        for key, value in mine.items():
            if key in state:
                assert_tight(value.to(DTYPE), state[key].to(DTYPE))
        assert set(state) - {"active"} <= set(mine) | ({"hits"} if sample_rate < 1.0 else set())


def test_subcenter_drop_keeps_each_class_dominant_center_and_is_idempotent() -> None:
    head = build("subcenter_arcface")
    assert isinstance(head, SubCenterPartialFC) and head.weight.shape == (CLASSES, 3, EMBEDDING)
    table = centers(head)
    with torch.no_grad():
        head.weight.copy_(table)
    state: dict[str, torch.Tensor] = {}
    head.start_epoch(0)  # the epoch the counts belong to: nothing happens
    for step in range(2):
        x, labels = batch(step)
        head(x, labels)
        reference_step("subcenter_arcface", x, table, labels, CASES["subcenter_arcface"][1], state)
    hits = head.subcenter_hits.clone()
    assert torch.equal(hits, state["hits"]) and hits.sum() == 2 * BATCH
    head.start_epoch(1)  # drop_epoch = 1: each class keeps its dominant sub-center
    dominant = hits.argmax(dim=1)
    assert torch.equal(head.subcenter_active, torch.nn.functional.one_hot(dominant, 3).bool())
    assert int(head.hits_epoch) == 1 and not head.subcenter_hits.any()
    head.start_epoch(1)  # again (a resume inside the epoch): nothing changes
    head.start_epoch(2)
    assert torch.equal(head.subcenter_active, torch.nn.functional.one_hot(dominant, 3).bool())
    # After the drop: the reference with the same mask; dropped sub-centers get no gradient.
    state = {"active": head.subcenter_active.clone()}
    x, labels = batch(5)
    x = x.requires_grad_()
    head.weight.grad = None
    loss = head(x, labels)
    loss.backward()
    ref_loss, ref_x_grad, ref_w_grad = reference_step(
        "subcenter_arcface", x, table, labels, CASES["subcenter_arcface"][1], state
    )
    assert x.grad is not None and head.weight.grad is not None
    assert_tight(loss.detach(), ref_loss)
    assert_tight(x.grad, ref_x_grad)
    assert_tight(head.weight.grad, ref_w_grad)
    assert not head.weight.grad[~head.subcenter_active].any()


def test_elasticface_draws_depend_on_seed_and_step_only() -> None:
    a, b = build("elasticface_arc"), build("elasticface_arc")
    first = [a.draw_margins(6) for _ in range(3)]
    b.load_global_tensors({"margin_draws": torch.tensor(1)})  # a resumed run after one step
    assert torch.equal(b.draw_margins(6), first[1]) and torch.equal(b.draw_margins(6), first[2])
    assert not torch.equal(first[0], first[1])
    c = build("elasticface_arc")
    c.reset_parameters(seed=SEED + 1)
    assert not torch.equal(c.draw_margins(6), first[0])
    # The paper's defaults per variant when the recipe leaves them out.
    defaults = {
        name: build_head(HeadConfig(name=name), embedding_size=4, num_classes=3, rank=0, world_size=1)
        for name in ("elasticface_arc", "elasticface_cos", "elasticface_arc_plus", "elasticface_cos_plus")
    }
    got = {name: (h.m, h.std) for name, h in defaults.items() if isinstance(h, ElasticFacePartialFC)}
    assert got == {
        "elasticface_arc": (0.5, 0.05),
        "elasticface_cos": (0.35, 0.05),
        "elasticface_arc_plus": (0.5, 0.0175),
        "elasticface_cos_plus": (0.35, 0.02),
    }


def test_elasticface_plus_sorted_pairing_is_monotone() -> None:
    head = build("elasticface_cos_plus")
    head.plus_pairing = "sorted"
    x, labels = batch(0)
    with torch.no_grad():
        head.weight.copy_(centers(head))
        cos = head.cosine(torch.nn.functional.normalize(x), None, labels)
        logits = head.logits(cos, labels, x)
    rows = torch.arange(BATCH)
    margins = cos[rows, labels] - logits[rows, labels] / head.s
    order = torch.argsort(cos[rows, labels], descending=True)
    assert torch.all(margins[order][1:] >= margins[order][:-1])  # closer to the center: smaller margin


def test_magface_magnitude_is_trained() -> None:
    """The regularizer pulls the magnitude toward its minimum sqrt(u_a^2) = u_a... within [l_a, u_a]: at a = 20 the
    gradient of g(a) = a/u_a^2 + 1/a along x is (1/u_a^2 - 1/a^2) < 0 (grow); outside the range it vanishes."""
    head = build("magface")
    head.lambda_g = 1.0
    x = torch.zeros(2, EMBEDDING, dtype=DTYPE)
    x[0, 0], x[1, 0] = 20.0, 200.0  # inside, and above u_a = 110
    x.requires_grad_()
    head.extra_loss(x).backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad[0, 0], torch.tensor((1 / 110**2 - 1 / 20**2) / 2, dtype=DTYPE))
    assert x.grad[1].abs().sum() == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_subcenters": 0}, "num_subcenters must be >= 1, got 0"),
        ({"subcenter_drop_epoch": -1}, "subcenter_drop_epoch must be >= 0"),
        ({"interclass_filtering_threshold": 1.0}, "interclass_filtering_threshold must be in [0, 1)"),
        ({"adaface_t_alpha": 0.0}, "adaface_t_alpha must be in (0, 1]"),
        ({"adaface_m": 2.0}, "adaface_m must be in [0, pi/2)"),
        ({"adaface_h": -0.1}, "adaface_h must be >= 0"),
        ({"magface_l_a": 120.0}, "magface_l_a must be in (0, magface_u_a=110.0)"),
        ({"magface_u_m": 0.3}, "magface_l_m must be in [0, magface_u_m]"),
        ({"magface_lambda_g": -1.0}, "magface_lambda_g must be >= 0"),
        ({"curricular_t_alpha": 1.5}, "curricular_t_alpha must be in (0, 1]"),
        ({"elastic_std": -0.01}, "elastic_std must be >= 0"),
        ({"elastic_m": math.nan}, "elastic_m must be a finite number"),
        ({"m2": 4.0}, "m2 must be in [0, pi)"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        HeadConfig.resolve_section()(**overrides)
    assert str(error.value).startswith(message)


def test_head_section_from_a_recipe(tmp_path: Any) -> None:
    from trainer.config import ConfigError, load_config

    cfg = load_config(None, ["--head.name", "adaface", "--head.adaface_h", "0.5", "--head.elastic_std", "0.03"])
    assert (cfg.head.name, cfg.head.adaface_h, cfg.head.elastic_std, cfg.head.elastic_m) == ("adaface", 0.5, 0.03, None)
    with pytest.raises(ConfigError, match=r"head\.num_subcenters must be >= 1, got 0"):
        load_config(None, ["--head.num_subcenters", "0"])
    with pytest.raises(ConfigError, match=r"head\.margin_grad must be one of"):
        load_config(None, ["--head.margin_grad", "none"])


class _BatchByClassTensors(TorchDispatchMode):
    """Counts, per phase, the new float tensors of at least `size` elements that aten ops return (views aside)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.phase, self.made = size, "forward", {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func._schema.returns and all(r.alias_info is not None for r in func._schema.returns):
            return out  # views, and in-place ops returning their input
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() >= self.size:
                self.made[self.phase] += 1
        return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_head_steps_at_a_plain_fcs_cost(name: str) -> None:
    """At sample rate 1, with more classes than a chunk of centers: every head makes the N x C tensors ArcFace makes
    and no more: in forward the cosines and the logits (the cross-entropy's softmax lives in the logits' buffer),
    in backward none besides the table's gradient (the margin scales the cross-entropy's buffer in place; sub-center
    ArcFace reduces its K sub-centers chunk by chunk). What the float64 tests above check is the same arithmetic."""
    from heads.rows import CHUNK

    cfg, _ = CASES[name]
    classes, batch_size, embedding = CHUNK + 1000, 8, 4
    head: Any = build_head(cfg, embedding_size=embedding, num_classes=classes, rank=0, world_size=1)
    head.reset_parameters(seed=SEED)
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(batch_size, embedding, generator=generator) * 20).requires_grad_()
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    counter = _BatchByClassTensors(batch_size * classes)
    with counter:
        loss = head(x, labels)
        counter.phase = "backward"
        loss.backward()
    table_gradient = 1 if head.weight.numel() >= batch_size * classes else 0  # sub-center's (C, K, E) table
    assert counter.made == {"forward": 2, "backward": table_gradient}


def test_adaface_clamps_non_target_cosines_as_its_formula() -> None:
    """Embeddings at a cosine of +-0.9995 with another class's center (past AdaFace's clamp at +-(1 - 1e-3), where
    the clamped logit's gradient is zero, and a cosine of +-1 would have none anyway): value and gradients as the
    reference's clamp, through the block-wise non-target map (`heads.adaface.ClampCosine`)."""
    head = build("adaface")
    table = centers(head)
    with torch.no_grad():
        head.weight.copy_(table)
    x, labels = batch(0)
    labels[0], labels[1] = 0, 1
    for row, (center, cos) in enumerate(((5, 0.9995), (7, -0.9995))):
        unit = torch.nn.functional.normalize(table[center], dim=0)
        other = torch.randn(EMBEDDING, dtype=DTYPE, generator=torch.Generator().manual_seed(row))
        other = torch.nn.functional.normalize(other - (other @ unit) * unit, dim=0)
        x[row] = (cos * unit + math.sqrt(1 - cos * cos) * other) * 30.0
    x = x.requires_grad_()
    head.weight.grad = None
    loss = head(x, labels)
    loss.backward()
    ref_loss, ref_x_grad, ref_w_grad = reference_step("adaface", x, table, labels, CASES["adaface"][1], {})
    assert_tight(loss.detach(), ref_loss)
    assert x.grad is not None and head.weight.grad is not None
    assert_tight(x.grad, ref_x_grad)
    assert_tight(head.weight.grad, ref_w_grad)
