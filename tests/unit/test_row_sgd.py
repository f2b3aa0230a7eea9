"""head.update: lazy gives dense's centers and momentum; sparse is Partial FC v1; each touches the sampled rows only.

Driven by tests/head_steps.py: 240 steps of a 240-step schedule (20 warm-up steps, polynomial decay), lr 0.5,
momentum 0.9, weight decay 5e-4, 20 % of 97 classes sampled per step.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from heads import list_heads
from tests.head_steps import make_head, make_optimizer, run_steps, synced_state
from trainer.row_sgd import RowSGD, row_kernels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _train(update: str, steps: int = 240, dtype: torch.dtype = torch.float64, **kwargs) -> dict[str, torch.Tensor]:
    sync_every = kwargs.pop("lazy_sync_every", 100)
    skip = kwargs.pop("skip", ())
    micro_batches = kwargs.pop("micro_batches", 1)
    fused = kwargs.pop("fused", False)
    head = make_head(update=update, dtype=dtype, **kwargs)
    optimizer = make_optimizer(head, lazy_sync_every=sync_every, fused=fused)
    run_steps(head, optimizer, 0, steps, skip=skip, micro_batches=micro_batches)
    return synced_state(head, optimizer)


@pytest.mark.parametrize("sync_every", [1, 7, 1000], ids=["sync-every-step", "sync-every-7", "never-synced"])
def test_lazy_equals_dense_in_float64(sync_every: int) -> None:
    dense, lazy = _train("dense"), _train("lazy", lazy_sync_every=sync_every)
    for key in ("weight", "momentum"):
        assert _relative(lazy[key], dense[key]) < 1e-12, key
    assert _relative(dense["weight"], make_head(update="dense").weight.detach()) > 0.1  # the centers did move


def test_lazy_equals_dense_with_skipped_steps_and_gradient_accumulation() -> None:
    options = {"skip": (3, 50, 51), "micro_batches": 2}
    dense, lazy = _train("dense", **options), _train("lazy", lazy_sync_every=9, **options)
    for key in ("weight", "momentum"):
        assert _relative(lazy[key], dense[key]) < 1e-12, key


def test_lazy_is_within_float32_rounding_of_dense() -> None:
    """In float32 lazy rounds differently (one product per catch-up where dense rounds each step): it must be no
    farther from the float64 result than dense float32 itself is (torch's fused kernel, the trainer's default)."""
    exact = _train("dense")
    dense32 = _train("dense", dtype=torch.float32, fused=True)
    lazy32 = _train("lazy", dtype=torch.float32)
    for key in ("weight", "momentum"):
        dense_error, lazy_error = _relative(dense32[key], exact[key]), _relative(lazy32[key], exact[key])
        assert 0 < dense_error < 1e-4
        assert lazy_error <= 2 * dense_error, (key, lazy_error, dense_error)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_lazy_equals_dense(name: str) -> None:
    dense, lazy = _train("dense", steps=40, name=name), _train("lazy", steps=40, name=name, lazy_sync_every=6)
    for key in ("weight", "momentum"):
        assert _relative(lazy[key], dense[key]) < 1e-11, (name, key)


def test_sparse_is_partial_fc_v1() -> None:
    """Only the sampled centers and their momentum move, each by torch's SGD step on the sampled rows alone."""
    head = make_head(update="sparse")
    optimizer = make_optimizer(head)
    reference = make_head(update="dense")
    momentum = torch.zeros_like(reference.weight)
    for step in range(30):
        before = head.weight.detach().clone()
        run_steps(head, optimizer, step, step + 1, total=30)
        # Partial FC v1 by hand: the sampled rows as a parameter of their own, torch's SGD with their momentum.
        index = head.last_sampled_index
        torch.manual_seed(step * 31)
        from tests.head_steps import batch

        x, labels = batch(step, head.num_classes, torch.float64)
        with torch.no_grad():
            reference.weight.copy_(before)
        reference(x, labels).backward()
        rows = torch.nn.Parameter(before[index].clone())
        rows.grad = reference.weight.grad[index]
        sgd = torch.optim.SGD([rows], lr=optimizer.param_groups[0]["lr"], momentum=0.9, weight_decay=5e-4)
        if step > 0:
            sgd.state[rows]["momentum_buffer"] = momentum[index].clone()
        sgd.step()
        reference.weight.grad = None
        expected = before.clone()
        expected[index] = rows.detach()
        momentum[index] = sgd.state[rows]["momentum_buffer"]
        torch.testing.assert_close(head.weight.detach(), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(optimizer.state[head.weight]["momentum_buffer"], momentum, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("update", ["lazy", "sparse"])
def test_a_step_touches_only_the_sampled_rows(update: str) -> None:
    """The gradient is a sparse tensor of the sampled rows; between syncs, unsampled rows keep their bytes."""
    head = make_head(update=update, num_classes=200, sample_rate=0.1)
    optimizer = make_optimizer(head, lazy_sync_every=1000)
    run_steps(head, optimizer, 0, 3)
    before = head.weight.detach().clone()
    momentum = optimizer.state[head.weight]["momentum_buffer"].clone()
    torch.manual_seed(5)
    from tests.head_steps import batch

    x, labels = batch(3, head.num_classes, torch.float64)
    head(x, labels).backward()
    assert head.weight.grad is not None and head.weight.grad.is_sparse
    index = head.last_sampled_index
    assert head.weight.grad._nnz() == index.numel() == 20
    optimizer.step()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(head.weight.detach()[untouched], before[untouched])
    assert torch.equal(optimizer.state[head.weight]["momentum_buffer"][untouched], momentum[untouched])
    assert not torch.equal(head.weight.detach()[index], before[index])


def test_sample_rate_one_is_the_same_in_every_mode() -> None:
    dense = _train("dense", steps=20, sample_rate=1.0)
    for update in ("lazy", "sparse"):
        other = _train(update, steps=20, sample_rate=1.0)
        for key in ("weight", "momentum"):
            assert _relative(other[key], dense[key]) < 1e-14, (update, key)


def test_the_optimizer_refuses_what_it_cannot_do() -> None:
    head = make_head()
    with pytest.raises(ValueError, match="rows must be one of"):
        RowSGD([{"params": [head.weight], "rows": "eager"}], lr=0.1)
    with pytest.raises(ValueError, match="one table and plain SGD"):
        RowSGD([{"params": [head.weight], "rows": "lazy", "nesterov": True}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        RowSGD([head.weight], lr=0.1, sync_every=0)


def test_an_fp16_overflow_moves_no_center() -> None:
    """GradScaler unscales the sparse row gradient, finds the inf and skips the step: no center, no momentum moves,
    and the lazy bookkeeping does not advance (the next steps still equal dense's)."""
    head = make_head(update="lazy", dtype=torch.float32)
    optimizer = make_optimizer(head, lazy_sync_every=1000)
    run_steps(head, optimizer, 0, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = synced_state(head, optimizer)
    pending = optimizer._lazy[head.weight].pending  # type: ignore[attr-defined]
    from tests.head_steps import batch

    x, labels = batch(3, head.num_classes, torch.float32)
    scaler.scale(head(x, labels)).backward()
    assert head.weight.grad is not None and head.weight.grad.is_sparse
    head.weight.grad._values()[0, 0] = float("inf")  # an fp16 overflow in the head's rows
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**16  # the overflow was seen
    optimizer.zero_grad(set_to_none=True)
    after = synced_state(head, optimizer)
    assert optimizer._lazy[head.weight].pending == pending  # type: ignore[attr-defined]
    for key in ("weight", "momentum"):
        assert torch.equal(after[key], before[key]), key


def test_a_resumed_lazy_run_continues_exactly() -> None:
    """The trainer syncs every row before it saves; a run resumed from that state takes bit-identical steps."""
    head = make_head(update="lazy", dtype=torch.float32)
    optimizer = make_optimizer(head, lazy_sync_every=50)
    run_steps(head, optimizer, 0, 120)
    optimizer.sync_rows()  # Trainer.save
    saved = {
        "weight": head.weight.detach().clone(),
        "momentum": optimizer.state[head.weight]["momentum_buffer"].clone(),
    }
    run_steps(head, optimizer, 120, 240)
    uninterrupted = synced_state(head, optimizer)

    resumed_head = make_head(update="lazy", dtype=torch.float32)
    resumed = make_optimizer(resumed_head, lazy_sync_every=50)
    with torch.no_grad():
        resumed_head.weight.copy_(saved["weight"])
    resumed.state[resumed_head.weight]["momentum_buffer"] = saved["momentum"]  # as checkpoint._restore_group
    resumed.forget_pending()  # type: ignore[attr-defined]  # Trainer.resume -> stepper.head_rows_loaded
    run_steps(resumed_head, resumed, 120, 240)
    after = synced_state(resumed_head, resumed)
    for key in ("weight", "momentum"):
        assert torch.equal(after[key], uninterrupted[key]), key


def test_the_row_kernels_are_built_where_there_is_a_compiler() -> None:
    """Every test above runs the row kernels (trainer.row_sgd.row_kernels) on a machine with a C++ compiler; without
    one they fall back to the tensor-op path, which the test below also runs."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the tensor-op path only")
    kernels = row_kernels()
    assert kernels is not None and hasattr(kernels, "sgd_rows_") and hasattr(kernels, "catch_up_rows_")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("update", ["lazy", "sparse"])
def test_the_row_kernels_take_the_tensor_op_paths_steps(update: str, dtype: torch.dtype) -> None:
    """The one-pass row kernels and the gather / update / write-back path are the same arithmetic: 60 steps, a
    catch-up every 7, agree to rounding (float32: a few ulps accumulated)."""
    if row_kernels() is None:
        pytest.skip("no row kernels on this machine")
    runs = []
    for kernels in (True, False):
        head = make_head(update=update, dtype=dtype)
        optimizer = make_optimizer(head, lazy_sync_every=7)
        optimizer.use_row_kernels = kernels  # type: ignore[attr-defined]
        run_steps(head, optimizer, 0, 60)
        runs.append(synced_state(head, optimizer))
    tolerance = 1e-13 if dtype == torch.float64 else 2e-6
    for key in ("weight", "momentum"):
        assert _relative(runs[0][key], runs[1][key]) < tolerance, key


def test_the_row_kernels_refuse_a_row_outside_the_table() -> None:
    kernels = row_kernels()
    if kernels is None:
        pytest.skip("no row kernels on this machine")
    table, momentum = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="row index 4 out of range"):
        kernels.sgd_rows_(table, momentum, torch.tensor([1, 4]), torch.ones(2, 3), 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match="row index -1 out of range"):
        steps = torch.zeros(4, dtype=torch.int64)
        kernels.catch_up_rows_(table, momentum, steps, torch.tensor([-1]), torch.eye(2).expand(2, 2, 2).clone(), 1)
    assert not table.any() and not momentum.any()  # refused before any row moved
