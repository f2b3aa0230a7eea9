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

**The row kernels.** On a CPU, for float32 and float64 tables with momentum, both row updates are one pass over
each row they touch, in place in the table (`row_kernels()`: two C++ loops, compiled once per machine with
torch's extension builder and registered as the operators ``arcface_rows::sgd_rows_`` and
``arcface_rows::catch_up_rows_``): the step reads a sampled row's gradient, weight and momentum once and writes
weight and momentum once (5 row-sized touches); the catch-up reads and writes weight and momentum (4), and skips
a row already current. The same arithmetic as the tensor-op path below, in the same order (rounding may differ in
the last bit where torch's kernels fuse a multiply-add). Elsewhere (CUDA, other dtypes, no C++ compiler: then a
warning, once), and with ``row_kernels=False``, the rows are gathered, updated by tensor ops and written back:
about 20 row-sized reads and writes per sampled row (`bench/head_scaling.py --count-bytes`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROW_MODES = ("lazy", "sparse")
CHUNK = 1 << 12  # rows per pass of the row updates: bounds their temporaries (a few x 4096 x E floats)

logger = logging.getLogger(__name__)

# One pass per row and tensor; rows are independent (the index is unique: one forward's sampled rows, or a coalesced
# sparse gradient), so they are split among threads.
KERNEL_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

constexpr int64_t GRAIN = 32;  // rows per task

int64_t row_width(const at::Tensor& table) {
  return table.size(0) == 0 ? 0 : table.numel() / table.size(0);
}

void check_rows(const at::Tensor& table, const int64_t* index, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(index[i] >= 0 && index[i] < table.size(0), "row index ", index[i], " out of range");
  }
}

// torch.optim.SGD (momentum, weight decay) on the rows `index` of param / buf, with their gradient rows `grad`:
// g = grad + wd * w;  b = b * mu + g;  w = w + (-lr) * b.
void sgd_rows(at::Tensor param, at::Tensor buf, const at::Tensor& index, const at::Tensor& grad, double lr,
              double momentum, double weight_decay) {
  TORCH_CHECK(param.device().is_cpu() && param.is_contiguous() && buf.is_contiguous() && grad.is_contiguous());
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1);
  TORCH_CHECK(buf.sizes() == param.sizes() && buf.scalar_type() == param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.numel() == index.numel() * row_width(param));
  const int64_t width = row_width(param), count = index.numel();
  const int64_t* rows = index.data_ptr<int64_t>();
  check_rows(param, rows, count);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_rows_", [&] {
    scalar_t* w = param.data_ptr<scalar_t>();
    scalar_t* b = buf.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t step = static_cast<scalar_t>(-lr), mu = static_cast<scalar_t>(momentum);
    const scalar_t wd = static_cast<scalar_t>(weight_decay);
    at::parallel_for(0, count, GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* wr = w + rows[i] * width;
        scalar_t* br = b + rows[i] * width;
        const scalar_t* gr = g + i * width;
        if (wd != 0) {
          for (int64_t e = 0; e < width; ++e) {
            const scalar_t nb = br[e] * mu + (gr[e] + wd * wr[e]);
            br[e] = nb;
            wr[e] = wr[e] + step * nb;
          }
        } else {
          for (int64_t e = 0; e < width; ++e) {
            const scalar_t nb = br[e] * mu + gr[e];
            br[e] = nb;
            wr[e] = wr[e] + step * nb;
          }
        }
      }
    });
  });
}

// The lazy catch-up of the rows `index` (all rows when absent): a row current at step k (row_step) is mapped by
// products[k] (2 x 2) to step `now`, w' = w * c00 + b * c01, b' = b * c11 + w * c10; a row already at `now` is
// skipped; row_step becomes `now`.
void catch_up_rows(at::Tensor param, at::Tensor buf, at::Tensor row_step, const std::optional<at::Tensor>& index,
                   const at::Tensor& products, int64_t now) {
  TORCH_CHECK(param.device().is_cpu() && param.is_contiguous() && buf.is_contiguous() && products.is_contiguous());
  TORCH_CHECK(buf.sizes() == param.sizes() && buf.scalar_type() == param.scalar_type());
  TORCH_CHECK(products.scalar_type() == param.scalar_type() && products.dim() == 3 && products.size(0) > now);
  TORCH_CHECK(row_step.scalar_type() == at::kLong && row_step.is_contiguous() && row_step.numel() == param.size(0));
  const int64_t width = row_width(param);
  const bool all = !index.has_value();
  if (!all) TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous() && index->dim() == 1);
  const int64_t count = all ? param.size(0) : index->numel();
  const int64_t* rows = all ? nullptr : index->data_ptr<int64_t>();
  if (!all) check_rows(param, rows, count);
  int64_t* at_step = row_step.data_ptr<int64_t>();
  const int64_t steps = products.size(0);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "catch_up_rows_", [&] {
    scalar_t* w = param.data_ptr<scalar_t>();
    scalar_t* b = buf.data_ptr<scalar_t>();
    const scalar_t* c = products.data_ptr<scalar_t>();
    at::parallel_for(0, count, GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = all ? i : rows[i];
        const int64_t k = at_step[row];
        if (k == now) continue;
        TORCH_CHECK(k >= 0 && k < steps, "row ", row, " at step ", k, " of ", steps);
        const scalar_t c00 = c[k * 4], c01 = c[k * 4 + 1], c10 = c[k * 4 + 2], c11 = c[k * 4 + 3];
        scalar_t* wr = w + row * width;
        scalar_t* br = b + row * width;
        for (int64_t e = 0; e < width; ++e) {
          const scalar_t wv = wr[e], bv = br[e];
          wr[e] = wv * c00 + bv * c01;
          br[e] = bv * c11 + wv * c10;
        }
        at_step[row] = now;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(arcface_rows, m) {
  m.def("sgd_rows_(Tensor(a!) param, Tensor(b!) buf, Tensor index, Tensor grad, float lr, float momentum, "
        "float weight_decay) -> ()");
  m.def("catch_up_rows_(Tensor(a!) param, Tensor(b!) buf, Tensor(c!) row_step, Tensor? index, Tensor products, "
        "int now) -> ()");
}

TORCH_LIBRARY_IMPL(arcface_rows, CPU, m) {
  m.impl("sgd_rows_", &sgd_rows);
  m.impl("catch_up_rows_", &catch_up_rows);
}
"""

_kernels_lock = threading.Lock()
_kernels: list[Any] = []  # [the operators' namespace, or None when they could not be built]


def row_kernels() -> Any | None:
    """``torch.ops.arcface_rows`` (the row kernels of the module doc), built on first use: compiled once per
    machine and source (torch's extension cache, ~/.cache/torch_extensions, shared by every process and locked
    while one builds), loaded once per process. None, with a warning, where they cannot be built."""
    with _kernels_lock:
        if not _kernels:
            _kernels.append(_build_row_kernels())
        return _kernels[0]


def _build_row_kernels() -> Any | None:
    if hasattr(torch.ops, "arcface_rows") and hasattr(torch.ops.arcface_rows, "sgd_rows_"):
        return torch.ops.arcface_rows  # loaded already (another copy of this module)
    name = "arcface_rows_" + hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        # Built before (the name carries the source's hash) and no build under way: load it without asking ninja.
        folder = Path(_get_build_directory(name, verbose=False))
        if (folder / f"{name}.so").is_file() and not (folder / "lock").exists():
            torch.ops.load_library(str(folder / f"{name}.so"))
        else:
            logger.info("building the row kernels (%s, once per machine: about a minute)", folder)
            load_inline(name, [KERNEL_SOURCE], extra_cflags=["-O3"], is_python_module=False, no_implicit_headers=True)
        return torch.ops.arcface_rows
    except Exception as error:  # no compiler, no ninja, a read-only cache: the tensor-op path does the same math
        logger.warning("row kernels unavailable (%s): lazy and sparse head updates use tensor ops", error)
        return None


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
        row_kernels: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self.use_row_kernels = row_kernels  # False: the tensor-op path everywhere (tests, measurements)
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

    def _kernels_for(self, param: Tensor, buf: Tensor | None) -> Any | None:
        """The row kernels, where they apply to this table: CPU, float32/float64, contiguous, with momentum."""
        if not self.use_row_kernels or buf is None or param.device.type != "cpu":
            return None
        if param.dtype not in (torch.float32, torch.float64) or not param.is_contiguous():
            return None
        return row_kernels()

    @torch.no_grad()
    def catch_up(self, param: Tensor, index: Tensor | None) -> None:
        """Bring the rows `index` (None: all) of a lazy table to the current step (no-op for other tables)."""
        lazy = self._lazy.get(param)
        if lazy is None or lazy.pending == 0:
            return
        group = next(g for g in self.param_groups if g["params"][0] is param and g["rows"] == "lazy")
        buf = self._buffer(param, group["momentum"])
        products = lazy.products.to(lazy.device, param.dtype)
        kernels = self._kernels_for(param, buf)
        if kernels is not None:
            rows = None if index is None else index.contiguous()
            kernels.catch_up_rows_(param, buf, lazy.row_step, rows, products.contiguous(), lazy.pending)
            if index is None:
                lazy.reset()
            return
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
        kernels = self._kernels_for(param, buf)
        if kernels is not None and values.is_contiguous():
            kernels.sgd_rows_(param, buf, index.contiguous(), values, lr, momentum, weight_decay)
        else:
            _sgd_rows(param, buf, index, values, lr, momentum, weight_decay)
        lazy = self._lazy.get(param)
        if lazy is not None:
            lazy.advance(lr, momentum, weight_decay)  # what step t did to every row not scored
            lazy.row_step[index] = lazy.pending
            if lazy.pending >= self.sync_every:
                self.catch_up(param, None)


def _sgd_rows(
    param: Tensor, buf: Tensor | None, index: Tensor, values: Tensor, lr: float, momentum: float, weight_decay: float
) -> None:
    """torch's SGD on the rows `index` with their gradient rows `values`, in its order of operations (the same
    rounding as its unfused step): rows gathered, updated by tensor ops, written back."""
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
