"""SGD for the class-center table whose step follows the sampled rows (`head.update: lazy | sparse`).

`RowSGD` is `torch.optim.SGD` (momentum, weight decay; no dampening, no Nesterov) in which a parameter group marked
``rows="lazy"`` or ``rows="sparse"`` holds one class-center table (class as dim 0) whose gradient is a sparse
tensor of the rows scored this step (`heads.rows`). Other groups (the backbone) take torch's own step, fused or
not. The momentum buffer is torch's ``momentum_buffer`` (same key, same meaning), so checkpoints and their
resharding do not change.

**sparse** (insightface Partial FC v1): the sampled rows take torch's SGD update; the others do not move.

**lazy**: the result of torch's SGD with the dense gradient (zeros on unsampled rows, insightface Partial FC v2).
With gradient zero, SGD's step on one element (w, b) of an unsampled row is linear and the same for every such
element::

    b' = mu b + wd w,   w' = w - lr b'   <=>   (w', b') = A(lr) (w, b),   A = [[1 - lr wd, -lr mu], [wd, mu]]

so a row left out of steps a..t-1 is brought to step t by one 2x2 matrix, the product A_{t-1} ... A_a. The
optimizer keeps, for every step since the last full sync, the product of the steps from there to now (a (K, 2, 2)
float64 table, each step multiplies it by the new A: no inverse is ever taken, which would overflow as det A =
mu^n shrinks) and, per row, the step it is current at. A row is caught up when the head is about to read it
(`catch_up`, registered as the head's row sync: forward calls it with the sampled rows) and every row is caught up
every `sync_every` steps (bounding the table and the staleness), before a checkpoint and at the end
(`sync_rows`). A sampled row then takes torch's update with its gradient. Exact up to fp32 rounding (the catch-up
multiplies by float64 products rounded to fp32 once, where dense rounds each step): tests/unit/test_row_sgd.py
checks it in float64 against torch's SGD to 1e-12 and in float32 over 200+ steps.

Per step the head's optimizer reads and writes the sampled rows (gradient, weight, momentum) plus, amortized, one
pass over the table every `sync_every` steps; dense reads and writes all of it every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

ROW_MODES = ("lazy", "sparse")
CHUNK = 1 << 12  # rows per pass of the row updates: bounds their temporaries (a few x 4096 x E floats)


class _LazyRows:
    """The catch-up state of one lazily updated table: per row, the step (since the last full sync) at which it is
    current; and `products[k]`, the 2x2 map from step k to now (float64, on the CPU)."""

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.row_step = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.products = torch.eye(2, dtype=torch.float64).unsqueeze(0)  # (pending + 1, 2, 2); [pending] = identity
        self.device = device

    @property
    def pending(self) -> int:
        """Steps since the last full sync."""
        return self.products.shape[0] - 1

    def advance(self, lr: float, momentum: float, weight_decay: float) -> None:
        a = torch.tensor([[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]], dtype=torch.float64)
        self.products = torch.cat([a @ self.products, torch.eye(2, dtype=torch.float64).unsqueeze(0)])

    def reset(self) -> None:
        self.row_step.zero_()
        self.products = torch.eye(2, dtype=torch.float64).unsqueeze(0)


class RowSGD(torch.optim.SGD):
    """torch.optim.SGD plus row-wise groups (``rows="lazy" | "sparse"``) for class-center tables (module doc)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fused: bool | None = None,
        sync_every: int = 100,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self._lazy: dict[Tensor, _LazyRows] = {}
        for group in self.param_groups:
            mode = group.setdefault("rows", None)
            if mode is None:
                continue
            if mode not in ROW_MODES:
                raise ValueError(f"rows must be one of {', '.join(ROW_MODES)} or None, got {mode!r}")
            if len(group["params"]) != 1 or group["dampening"] != 0 or group["nesterov"] or group["maximize"]:
                raise ValueError("a rows group holds one table and plain SGD (no dampening, Nesterov or maximize)")
            param = group["params"][0]
            self._buffer(param, group["momentum"])  # now, before any step's temporaries: one clean allocation
            if mode == "lazy":
                self._lazy[param] = _LazyRows(param.shape[0], param.device)

    # ----------------------------------------------------------------------------------------------------------
    # Lazy catch-up

    def _buffer(self, param: Tensor, momentum: float) -> Tensor | None:
        if momentum == 0:
            return None
        state = self.state[param]
        if state.get("momentum_buffer") is None:
            # torch's first step sets buf = d_p, i.e. mu * 0 + d_p: a zero buffer gives the same, and every row has one.
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    @torch.no_grad()
    def catch_up(self, param: Tensor, index: Tensor | None) -> None:
        """Bring the rows `index` (None: all) of a lazy table to the current step (no-op for other tables)."""
        lazy = self._lazy.get(param)
        if lazy is None or lazy.pending == 0:
            return
        group = next(g for g in self.param_groups if g["params"][0] is param and g["rows"] == "lazy")
        buf = self._buffer(param, group["momentum"])
        products = lazy.products.to(lazy.device, param.dtype)
        shape = (-1,) + (1,) * (param.dim() - 1)
        total = param.shape[0] if index is None else index.numel()
        for lo in range(0, total, CHUNK):
            hi = min(total, lo + CHUNK)
            # All rows: slices of the table, updated in place; some rows: gathered, updated, written back.
            rows = None if index is None else index[lo:hi]
            part: slice | Tensor = slice(lo, hi) if rows is None else rows
            coef = products[lazy.row_step[part]]  # (n, 2, 2)
            w = param[part] if rows is None else param.index_select(0, rows)
            b = None if buf is None else buf[part] if rows is None else buf.index_select(0, rows)
            new_w = w * coef[:, 0, 0].view(shape)
            if b is not None:
                new_w += b * coef[:, 0, 1].view(shape)
                b.mul_(coef[:, 1, 1].view(shape)).add_(w * coef[:, 1, 0].view(shape))
            if rows is None:
                w.copy_(new_w)  # b, a slice of the buffer, is already in place
            else:
                param.index_copy_(0, rows, new_w)
                if buf is not None and b is not None:
                    buf.index_copy_(0, rows, b)
            lazy.row_step[part] = lazy.pending
        if index is None:
            lazy.reset()

    def row_sync(self, param: Tensor) -> Any:
        """The hook a head calls before reading rows (`heads.PartialFC.set_row_sync`)."""
        return lambda index: self.catch_up(param, index)

    @torch.no_grad()
    def sync_rows(self) -> None:
        """Catch every row of every lazy table up to now (before a checkpoint, at the end)."""
        for param in self._lazy:
            self.catch_up(param, None)

    def forget_pending(self) -> None:
        """The tables' state was just replaced (a resume, a rollback): every row is current as loaded."""
        for lazy in self._lazy.values():
            lazy.reset()

    # ----------------------------------------------------------------------------------------------------------
    # Step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["rows"] is None:
                continue
            param = group["params"][0]
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                self._row_step(param, group)
                param.grad = None  # consumed: torch's step below must not see a sparse gradient
            elif param in self._lazy:
                self.catch_up(param, None)  # a dense gradient (sample rate 1): torch's step, every row current
        super().step()
        return loss

    def _row_step(self, param: Tensor, group: dict[str, Any]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grad = param.grad
        assert grad is not None
        index = grad._indices()[0]
        if grad.is_coalesced() or bool((index[1:] > index[:-1]).all()):
            values = grad._values()  # one forward's rows: sorted and unique already (autograd drops the flag)
        else:  # gradient accumulation: sum the micro-batches' rows (a sorted copy)
            grad = grad.coalesce()
            index, values = grad.indices()[0], grad.values()
        buf = self._buffer(param, momentum)
        # torch's SGD on the scored rows, in its order of operations (the same rounding as its unfused step).
        for lo in range(0, index.numel(), CHUNK):
            idx, g = index[lo : lo + CHUNK], values[lo : lo + CHUNK]
            w = param.index_select(0, idx)
            if weight_decay != 0:
                g = g.add(w, alpha=weight_decay)
            if buf is not None:
                b = buf.index_select(0, idx).mul_(momentum).add_(g)
                buf.index_copy_(0, idx, b)
                g = b
            param.index_copy_(0, idx, w.add_(g, alpha=-lr))
        lazy = self._lazy.get(param)
        if lazy is not None:
            lazy.advance(lr, momentum, weight_decay)  # what step t did to every row not scored
            lazy.row_step[index] = lazy.pending
            if lazy.pending >= self.sync_every:
                self.catch_up(param, None)
