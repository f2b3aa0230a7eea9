"""Partial FC step time and peak memory against the number of classes, beside a plain full FC.

    python bench/head_scaling.py --out head-scaling.json                      # 1e4, 1e5, 1e6 classes
    python bench/head_scaling.py --classes 10000 100000 2000000 --threads 1
    python bench/head_scaling.py --classes 300000 --heads all --paired-heads 8 --paired-only --profile \
        --grad-to-none --fused --threads 1                                    # every head against a plain FC
    python bench/head_scaling.py --tiny                                       # seconds: what the test suite runs

The head alone: random embeddings (a leaf with gradient, as the backbone's output would be) and random labels go
through forward + backward + SGD step (momentum 0.9, weight decay 5e-4, as the recipes) + ``zero_grad``
(``set_to_none=False``; ``--grad-to-none`` for the trainer's ``set_to_none=True``, ``--fused`` for its
``optim.fused: true``). Heads:

* ``partial_fc``: ``heads.PartialFC`` (ArcFace margin, fp32 softmax) at each ``--sample-rates`` value and, below
  1, each ``--updates`` mode (``head.update``: dense, lazy, sparse; at rate 1 they are the same), stepped by the
  trainer's optimizer (``trainer.optim.build_optimizer``: torch's SGD, or ``trainer.row_sgd.RowSGD`` for lazy and
  sparse, with the full catch-up of lazy every ``--lazy-sync-every`` steps timed apart and amortized into the
  step time);
* ``full_fc``: ``nn.Linear(embedding_size, num_classes, bias=False)`` over L2-normalized embeddings +
  ``F.cross_entropy``: the plain softmax classifier.

``--heads`` runs other registered heads the same way (their settings' defaults; ``all``: every one).

Side by side, in this process (`run_group`: the heads' steps taken in turn, the order changing every round, median
and quartiles of the per-round ratios of wall-clock and of CPU time): ``--paired N`` gives Partial FC 1 / full FC
and lazy / dense, sparse / dense at each ``--paired-rates`` rate; ``--paired-heads N`` every ``--heads`` head at
sample rate 1 against a full FC of its table's rows (K x C for sub-center ArcFace) and against ArcFace of that many
classes, with each head's peak (what it holds between steps plus what a step needs above that, `StepMemory`) and,
with ``--profile``, where one step's time and bytes go (torch.profiler, `ByteCounter`).

Each configuration runs in its own process (``--in-process`` to share one), so its memory is measured from a clean
start. Peak memory is what the head adds to the process:

* CPU: resident memory (RSS). The kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``
  once the batch exists, and the peak is ``VmHWM`` after the steps minus ``VmRSS`` before the head was built.
  Pages count once touched, which is what a tensor costs once written (tracemalloc sees none of torch's memory).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the head was built.

Bytes moved (``--count-bytes``): one more step runs under a ``TorchDispatchMode`` that adds up, for every aten
op, the bytes of the tensors it reads and writes: its tensor inputs, its outputs and the inputs it mutates (views
and allocations move nothing; an indexing op counts the rows it selects or writes, not the whole table; a fused
optimizer's gradients are read, not written). Split into the head optimizer's share (the step, ``zero_grad``,
lazy's catch-up in forward and its amortized full sync) and the whole head step. It counts what kernels touch,
not what reaches DRAM (caches are not modelled): the figure that scales with the table.

Memory per class is compared with the minimum a trained class needs: its center plus SGD's momentum buffer,
``embedding_size * 4 bytes * 2``. A configuration whose estimated need exceeds 70 % of the available memory is
skipped, not attempted (the machine may be shared).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/head_scaling.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from heads import HeadConfig, list_heads  # noqa: E402
from heads import build_head as build_registered_head  # noqa: E402
from models import build_backbone  # noqa: E402
from trainer.config import OptimConfig  # noqa: E402
from trainer.optim import build_optimizer as trainer_optimizer  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402
from trainer.row_sgd import RowSGD  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=130)

DEFAULT_CLASSES = [10_000, 100_000, 1_000_000]
BYTES_FP32 = 4


class FullFC(nn.Module):
    """The plain softmax classifier: a linear layer over L2-normalized embeddings, cross-entropy over all classes."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_size, num_classes, bias=False)
        nn.init.normal_(self.linear.weight, 0.0, 0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.linear(F.normalize(embeddings)), labels)


def minimum_bytes_per_class(embedding_size: int) -> int:
    """A class's center plus its SGD momentum buffer, fp32."""
    return embedding_size * BYTES_FP32 * 2


def estimated_bytes(config: dict[str, Any]) -> int:
    """A rough upper bound of what one configuration needs (fp32): centers and momentum; a center-sized gradient
    unless the gradient is the sampled rows (head.update lazy / sparse), one more when zero_grad keeps it
    (``set_to_none=False``) and one for the unfused weight-decay temporary; the sampled centers, their gradient and
    a temporary (3 x S x E, S the classes scored per step); ~12 (B x S) logit-sized temporaries."""
    classes, embedding = config["num_classes"], config["embedding_size"]
    sampled = max(1, int(classes * config["sample_rate"]))
    rows_only = config["head"] != "full_fc" and config["sample_rate"] < 1 and config.get("update") != "dense"
    copies = 2 + (0 if rows_only else 1) + (0 if config["grad_to_none"] else 1) + (0 if config["fused"] else 1)
    per_class = table_rows(config) // classes  # sub-centers: K rows per class
    table = copies * classes * per_class * embedding + 3 * sampled * per_class * embedding
    return (table + 12 * config["batch_size"] * sampled * per_class) * BYTES_FP32


def table_rows(config: dict[str, Any]) -> int:
    """Rows of the configuration's center table: classes, x K sub-centers for sub-center ArcFace, or the plain FC's
    ``rows`` (a plain FC as large as a sub-center table)."""
    if config["head"] == "full_fc":
        return int(config.get("rows") or config["num_classes"])
    return config["num_classes"] * int(config.get("num_subcenters", 3) if config["head"] == "subcenter_arcface" else 1)


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryProbe:
    """What the code between ``start()`` and ``stop()`` adds to the process: peak and what stays."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the head"
            return
        self.base = psutil.Process().memory_info().rss
        if _reset_peak_rss() and _proc_status_bytes("VmHWM") is not None:
            self.method = "VmHWM (reset through /proc/self/clear_refs) - VmRSS before the head"
        else:
            self.method = "sampled RSS after each step - RSS before the head (no VmHWM reset here: a lower bound)"
        self.sampled = self.base

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.sampled = max(self.sampled, psutil.Process().memory_info().rss)

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            now = torch.cuda.memory_allocated(self.device)
        else:
            now = psutil.Process().memory_info().rss
            peak = _proc_status_bytes("VmHWM") if self.method.startswith("VmHWM") else None
            peak = max(peak or 0, self.sampled, now)
        return {"peak_bytes": peak - self.base, "resident_after_bytes": now - self.base, "memory_method": self.method}


def build_head(config: dict[str, Any], device: torch.device) -> nn.Module:
    # Built on the device: 10M centers initialized on a CPU would take minutes, then a copy.
    with device:
        if config["head"] == "full_fc":
            return FullFC(config["embedding_size"], table_rows(config))
        # A registered head with its own settings' defaults (ArcFace, s = 64 for partial_fc), built as the trainer
        # builds it.
        section = HeadConfig.resolve_section()(
            name=config["head"],
            sample_rate=config["sample_rate"],
            update=config.get("update", "dense"),
            lazy_sync_every=config["lazy_sync_every"],
        )
        head = build_registered_head(
            section, embedding_size=config["embedding_size"], num_classes=config["num_classes"], rank=0, world_size=1
        )
        assert isinstance(head, nn.Module)
        return head


def build_optimizer(config: dict[str, Any], head: nn.Module) -> torch.optim.Optimizer:
    """The trainer's head optimizer (SGD, momentum 0.9, weight decay 5e-4); torch's SGD for the plain FC."""
    fused = True if config["fused"] else None  # None: torch's default (a for-loop on CPU, foreach on CUDA)
    if config["head"] == "full_fc":
        return torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)
    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer = trainer_optimizer(cfg, (head, 1.0), fused=bool(fused))  # the head carries lazy_sync_every
    if isinstance(optimizer, RowSGD):
        optimizer.use_row_kernels = config.get("row_kernels", True)
    return optimizer


class ByteCounter(TorchDispatchMode):
    """Bytes read and written by every aten op run inside it, added up under `phase` (see the module doc)."""

    SKIP = ("empty", "lift_fresh", "_record_function", "detach", "alias", "_local_scalar_dense", "is_coalesced", "_nnz")

    def __init__(self, large: int = 0) -> None:
        super().__init__()
        self.phase = "other"
        self.bytes: dict[str, int] = {}
        # With `large` > 0: per phase, how many new tensors of at least `large` elements ops return (N x C-sized).
        self.large = large
        self.large_outputs: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if func.namespace == "arcface_rows":  # trainer.row_sgd's row kernels: the rows they touch, counted before
            moved = self._row_kernel_bytes(name, args)
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + moved
            return func(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        returns_alias = [r.alias_info is not None and not r.alias_info.is_write for r in schema.returns]
        views = bool(returns_alias) and all(returns_alias)
        if (
            self.large
            and not views
            and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        ):
            outputs = out if isinstance(out, (list, tuple)) else [out]
            fresh = sum(1 for o in outputs if isinstance(o, torch.Tensor) and o.numel() >= self.large)
            self.large_outputs[self.phase] = self.large_outputs.get(self.phase, 0) + fresh
        if any(skip in name for skip in self.SKIP) or views:
            return out  # allocations and views: no data moved
        moved = self._moved(name, schema, args, kwargs or {}, out)
        self.bytes[self.phase] = self.bytes.get(self.phase, 0) + moved
        return out

    @staticmethod
    def _row_kernel_bytes(name: str, args: Any) -> int:
        """A row kernel reads and writes each row it touches once (trainer.row_sgd): the step reads weight, momentum
        and gradient rows and writes weight and momentum; the catch-up reads and writes weight and momentum of the
        rows not yet current (it skips the others after reading their step), and writes their step."""
        param = args[0]
        row_bytes = param[0].numel() * param.element_size() if param.shape[0] else 0
        if name.startswith("sgd_rows_"):
            index = args[2]
            return 5 * index.numel() * row_bytes + index.numel() * index.element_size()
        row_step, index, now = args[2], args[3], args[5]
        steps = row_step if index is None else row_step[index]
        stale = int((steps != now).sum())
        looked_up = (0 if index is None else index.numel()) + steps.numel()  # the index, the rows' steps
        return 4 * stale * row_bytes + looked_up * 8 + stale * 8

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_sparse:
                return ByteCounter._size(value._values()) + ByteCounter._size(value._indices())
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(ByteCounter._size(v) for v in value)
        return 0

    def _moved(self, name: str, schema: Any, args: Any, kwargs: dict[str, Any], out: Any) -> int:
        size = self._size
        if name.startswith("index_select") or name.startswith("index.Tensor"):
            return size(args[1:]) + 2 * size(out)  # the selected rows read, the result written, the index
        if name.startswith("index_copy") or name.startswith("index_put"):
            return 2 * size(args[2:])  # source and index read, as many bytes written into the table
        values = list(args) + list(kwargs.values())
        reads = size(values)
        writes = 0
        for argument, value in zip(schema.arguments, values, strict=False):  # kwargs beyond: none mutable
            if argument.alias_info is not None and argument.alias_info.is_write and argument.name != "grads":
                writes += size(value)
        if not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            writes += size(out)  # a new result (an in-place op's result is the mutated input, counted above)
        return reads + writes


def has_lazy_sync(optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> bool:
    """Whether this configuration's step leaves a full catch-up every lazy_sync_every steps (head.update lazy with
    sampling), which is timed or counted apart and amortized."""
    return isinstance(optimizer, RowSGD) and config.get("update") == "lazy" and config["sample_rate"] < 1


def head_step(
    config: dict[str, Any],
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    embeddings: Any,
    labels: Any,
    counter: ByteCounter | None = None,
) -> torch.Tensor:
    """One training step of the head alone (forward, backward, optimizer, gradients dropped as configured); returns
    the loss, detached. With a `counter` (entered by the caller), its phase is set around each part."""
    if counter is not None:
        counter.phase = "forward"
    loss = head(embeddings, labels)
    if counter is not None:
        counter.phase = "backward"
    loss.backward()
    if counter is not None:
        counter.phase = "optimizer"
    optimizer.step()
    optimizer.zero_grad(set_to_none=config["grad_to_none"])
    embeddings.grad = None
    return loss.detach()


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """Time ``config``'s head (warm-up + timed steps) and measure the memory it adds."""
    device = torch.device(config["device"])
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    generator = torch.Generator(device=device).manual_seed(0)
    batch, embedding, classes = config["batch_size"], config["embedding_size"], config["num_classes"]
    embeddings = torch.randn(batch, embedding, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
    # One step of a small copy first (forward, backward, optimizer): the kernels' code pages, thread pools, lazily
    # imported modules and allocator caches are then counted in the baseline, not in the head's memory.
    small = build_head({**config, "num_classes": min(classes, 1000)}, device)
    small_optimizer = build_optimizer(config, small)  # its first step loads what the optimizers use, too
    small(embeddings, labels.remainder(min(classes, 1000))).backward()
    small_optimizer.step()
    del small, small_optimizer
    embeddings.grad = None
    probe = MemoryProbe(device)
    probe.start()
    head = build_head(config, device)
    optimizer = build_optimizer(config, head)
    times = []
    for step in range(config["warmup"] + config["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = head_step(config, head, optimizer, embeddings, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= config["warmup"]:
            times.append(time.perf_counter() - start)
        probe.sample()
    sync_s = 0.0
    if has_lazy_sync(optimizer, config):
        # The full catch-up every lazy_sync_every steps: timed apart (a pass over the table), amortized below.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.sync_rows()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sync_s = time.perf_counter() - start
        probe.sample()
    memory = probe.stop()
    median = statistics.median(times) + sync_s / config["lazy_sync_every"]
    moved = count_bytes(config, head, optimizer, embeddings, labels) if config.get("count_bytes") else {}
    return {
        **config,
        "step_s_median": median,
        "step_s_min": min(times),
        "sync_s": sync_s,
        **moved,
        "samples_per_s": batch / median,
        "loss": float(loss.detach()),
        **memory,
        "peak_bytes_per_class": memory["peak_bytes"] / classes,
        "peak_vs_minimum": memory["peak_bytes"] / (classes * minimum_bytes_per_class(embedding)),
    }


def count_bytes(
    config: dict[str, Any], head: nn.Module, optimizer: torch.optim.Optimizer, embeddings: Any, labels: Any
) -> dict[str, float]:
    """One more step under `ByteCounter`: the head optimizer's bytes per step and the whole step's (module doc). The
    counted step follows an uncounted one, so that lazy has rows to catch up in forward, as at any step but the
    first after a full sync."""
    head_step(config, head, optimizer, embeddings, labels)
    counter = ByteCounter()
    sync = getattr(head, "_row_sync", None)
    if sync is not None:  # lazy's catch-up, called from forward: the optimizer's work

        def counted_sync(index: Any) -> None:
            counter.phase = "optimizer"
            sync(index)
            counter.phase = "forward"

        head.set_row_sync(counted_sync)  # type: ignore[operator]
    with counter:
        head_step(config, head, optimizer, embeddings, labels, counter)
        sync_bytes = 0.0
        if has_lazy_sync(optimizer, config):
            before = counter.bytes.get("optimizer", 0)
            optimizer.sync_rows()
            sync_bytes = (counter.bytes["optimizer"] - before) / config["lazy_sync_every"]
            counter.bytes["optimizer"] = before
    if sync is not None:
        head.set_row_sync(sync)  # type: ignore[operator]
    optimizer_bytes = counter.bytes.get("optimizer", 0) + sync_bytes
    return {
        "optimizer_bytes_per_step": optimizer_bytes,
        "step_bytes": sum(counter.bytes.values()) + sync_bytes,
    }


def paired_configurations(
    rates: Sequence[float], full_fc: bool = True, updates: Sequence[str] = ("lazy", "sparse")
) -> list[tuple[tuple[str, float, str], tuple[str, float, str]]]:
    """(head, rate, update) against (head, rate, update): Partial FC 1 / full FC (unless not `full_fc`), then each of
    `updates` (lazy, sparse) against dense at each sample rate in `rates`."""
    pairs = [(("partial_fc", 1.0, "dense"), ("full_fc", 1.0, "dense"))] if full_fc else []
    for rate in rates:
        for update in (u for u in updates if u != "dense"):
            pairs.append((("partial_fc", rate, update), ("partial_fc", rate, "dense")))
    return pairs


def run_paired(
    base: dict[str, Any],
    pairs: int,
    rates: Sequence[float] = (0.1,),
    full_fc: bool = True,
    updates: Sequence[str] = ("lazy", "sparse"),
) -> list[dict[str, Any]]:
    """Step-time ratios measured side by side for `paired_configurations(rates, full_fc, updates)`."""
    embeddings, labels = _batch(base)
    rows = []
    for first, second in paired_configurations(rates, full_fc, updates):
        configs = [{**base, "head": h, "sample_rate": r, "update": u} for h, r, u in (first, second)]
        rows.append(run_group(configs, pairs, embeddings, labels))
    return rows


def run_paired_heads(base: dict[str, Any], names: Sequence[str], pairs: int) -> list[dict[str, Any]]:
    """Every head in `names` at sample rate 1 against a plain full FC with as many rows as its table (K x C for
    sub-center ArcFace) and, but for ArcFace itself, against `partial_fc` (ArcFace) with as many classes as the
    table has rows, side by side (time and step peaks measured in this process: `run_group`)."""
    embeddings, labels = _batch(base)
    rows = []
    for name in names:
        head = {**base, "head": name, "sample_rate": 1.0, "update": "dense"}
        configs = [head, {**base, "head": "full_fc", "sample_rate": 1.0, "update": "dense", "rows": table_rows(head)}]
        if name != "partial_fc":
            configs.append(
                {**base, "head": "partial_fc", "sample_rate": 1.0, "update": "dense", "num_classes": table_rows(head)}
            )
        rows.append(run_group(configs, pairs, embeddings, labels))
    return rows


def _batch(base: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(base["device"])
    generator = torch.Generator(device=device).manual_seed(0)
    batch, embedding, classes = base["batch_size"], base["embedding_size"], base["num_classes"]
    embeddings = torch.randn(batch, embedding, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
    return embeddings, labels


class StepMemory:
    """What one step needs above what is resident before it (CPU: ``VmHWM`` reset through /proc/self/clear_refs, minus
    ``VmRSS`` before the step; CUDA: the allocator's peak above what is allocated): the step's temporaries,
    measured in a process that holds other heads too. None where the high-water mark cannot be reset."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def resident(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process().memory_info().rss

    def start(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_peak_rss():
            return False
        self.base = self.resident()
        return True

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return (_proc_status_bytes("VmHWM") or 0) - self.base


def held_bytes(head: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What a head holds between steps, counted from its tensors: parameters, buffers, gradients that zero_grad
    keeps and the optimizer's state (SGD's momentum)."""
    tensors = {id(t): t for t in [*head.parameters(), *head.buffers()]}
    tensors.update({id(p.grad): p.grad for p in head.parameters() if p.grad is not None})
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclasses.dataclass
class Stepper:
    """One head of a side-by-side group: its step (wall seconds, CPU seconds, the step's peak above what was
    resident, or None), what it needs between steps, and its measurements so far."""

    step: Callable[[], tuple[float, float, int | None]]
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    head: nn.Module
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    step_bytes: list[int] = dataclasses.field(default_factory=list)


def run_group(
    configs: list[dict[str, Any]], pairs: int, embeddings: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """Step-time ratios of ``configs[0]`` to each other configuration, side by side: all heads in this process, their
    steps taken in turn, each round in another order (A B, B A, ... ; A B C, C B A, B C A, ...: drift on a shared
    machine cancels), `pairs` rounds after one warm-up step each; median and quartiles of the per-round ratios, of
    wall-clock time and of the process's CPU time (`time.process_time`: with one torch thread, what the step
    computes, without the time other processes held the cores: on a machine with more runnable processes than
    cores, the steadier of the two).
    Lazy's full catch-up runs where it falls (every `lazy_sync_every` steps) and its share is added as in
    `run_one`. Memory, in this process: what each head holds between steps (`held_bytes`: centers, momentum,
    per-class buffers) plus the median over its steps of what a step needs above what is resident before it
    (`StepMemory`); its peak is the sum."""
    device = torch.device(configs[0]["device"])
    memory = StepMemory(device)
    steppers = []
    for config in configs:
        head = build_head(config, device)
        optimizer = build_optimizer(config, head)

        def step(
            head: nn.Module = head, optimizer: torch.optim.Optimizer = optimizer, config: dict[str, Any] = config
        ) -> tuple[float, float, int | None]:
            measured = memory.start()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            # Every head of a group scores the same labels: a larger table (sub-center's plain FC) holds them too.
            head_step(config, head, optimizer, embeddings, labels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            return seconds, cpu_seconds, memory.stop() if measured else None

        step()  # warm-up: the momentum buffers exist from here on
        config = {**config, "held_bytes": held_bytes(head, optimizer)}
        steppers.append(Stepper(step, optimizer, config, head))
    count = len(steppers)
    for i in range(pairs):
        order = list(range(count))
        order = order[i // 2 % count :] + order[: i // 2 % count]
        for which in order if i % 2 == 0 else reversed(order):
            stepper = steppers[which]
            seconds, cpu_seconds, step_bytes = stepper.step()
            stepper.wall.append(seconds)
            stepper.cpu.append(cpu_seconds)
            if step_bytes is not None:
                stepper.step_bytes.append(step_bytes)
    amortized, amortized_cpu = [0.0] * count, [0.0] * count
    for which, stepper in enumerate(steppers):  # lazy: the full catch-up's share, as run_one
        if has_lazy_sync(stepper.optimizer, stepper.config):
            start, start_cpu = time.perf_counter(), time.process_time()
            stepper.optimizer.sync_rows()  # type: ignore[attr-defined]
            stepper.config["sync_s"] = time.perf_counter() - start
            amortized[which] = stepper.config["sync_s"] / stepper.config["lazy_sync_every"]
            amortized_cpu[which] = (time.process_time() - start_cpu) / stepper.config["lazy_sync_every"]
    heads = []
    for which, stepper in enumerate(steppers):
        config = stepper.config
        label = _label(config)
        if config["num_classes"] != configs[0]["num_classes"]:
            label += f" ({config['num_classes']:,} classes)"
        entry = {"label": label, "rows": table_rows(config), "held_bytes": config["held_bytes"]}
        entry["step_s_median"] = statistics.median(stepper.wall) + amortized[which]
        entry["step_cpu_s_median"] = statistics.median(stepper.cpu) + amortized_cpu[which]
        if stepper.step_bytes:
            entry["step_bytes_median"] = int(statistics.median(stepper.step_bytes))
            entry["peak_bytes"] = config["held_bytes"] + entry["step_bytes_median"]
        if config.get("profile") and (which == 0 or configs[0]["head"] == "partial_fc"):  # the others' are ArcFace's
            entry["profile"] = profile_step(config, stepper.head, stepper.optimizer, embeddings, labels)
        heads.append(entry)
    first = steppers[0]
    row: dict[str, Any] = {
        "num_classes": configs[0]["num_classes"],
        "a": heads[0]["label"],
        "b": heads[1]["label"],
        "pairs": pairs,
        "a_sync_s": first.config.get("sync_s", 0.0),
        "lazy_sync_every": configs[0]["lazy_sync_every"],
        "heads": heads,
    }
    for which in range(1, count):
        key = "ratio" if which == 1 else f"ratio_{which}"
        for prefix, times, shares in (("", "wall", amortized), ("cpu_", "cpu", amortized_cpu)):
            ratios = [
                (a + shares[0]) / (b + shares[which])
                for a, b in zip(getattr(first, times), getattr(steppers[which], times), strict=True)
            ]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row.update(
                {
                    f"{prefix}{key}_median": statistics.median(ratios),
                    f"{prefix}{key}_q1": quartiles[0],
                    f"{prefix}{key}_q3": quartiles[2],
                }
            )
        if "peak_bytes" in heads[0] and "peak_bytes" in heads[which]:
            row[f"peak_{key}"] = heads[0]["peak_bytes"] / heads[which]["peak_bytes"]
        console.print(
            f"{heads[0]['label']} / {heads[which]['label']}, {row['num_classes']:,} classes: "
            f"{row[f'{key}_median']:.3f} [{row[f'{key}_q1']:.3f}, {row[f'{key}_q3']:.3f}] wall, "
            f"{row[f'cpu_{key}_median']:.3f} [{row[f'cpu_{key}_q1']:.3f}, {row[f'cpu_{key}_q3']:.3f}] CPU time "
            f"over {pairs} rounds" + (f"; peak {row[f'peak_{key}']:.3f}" if f"peak_{key}" in row else ""),
            markup=False,
        )
    del steppers
    return row


def profile_step(
    config: dict[str, Any], head: nn.Module, optimizer: torch.optim.Optimizer, embeddings: Any, labels: Any
) -> dict[str, Any]:
    """Where one step's time and bytes go: the operators with the most self CPU time in one step under
    torch.profiler (ms, calls), and the bytes of one more step under `ByteCounter` by phase (forward, backward,
    optimizer), with the N x C-sized tensors each phase creates (outputs of batch x table-rows elements or more)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        head_step(config, head, optimizer, embeddings, labels)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count, "share": e.self_cpu_time_total / total}
        for e in events[:10]
    ]
    counter = ByteCounter(large=config["batch_size"] * table_rows(config))
    with counter:
        head_step(config, head, optimizer, embeddings, labels, counter)
    return {"top_ops": top, "total_ms": total / 1e3, "bytes": counter.bytes, "large_tensors": counter.large_outputs}


def run_isolated(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``run_one`` in a fresh process: memory measured from a clean start, a failure (out of memory) contained."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(config)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**config, "error": f"exit {proc.returncode}: {reason}"}
    return json.loads(lines[-1])


def configurations(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    heads = [
        (name, rate, update)
        for name in args.heads
        for rate in args.sample_rates
        for update in (args.updates if rate < 1 else ["dense"])  # at rate 1 the modes are the same step
    ] + ([] if args.no_full_fc else [("full_fc", 1.0, "dense")])
    return [
        {
            "head": head,
            "sample_rate": rate,
            "update": update,
            "lazy_sync_every": args.lazy_sync_every,
            "count_bytes": args.count_bytes,
            "num_classes": classes,
            "embedding_size": args.embedding_size,
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "grad_to_none": args.grad_to_none,
            "fused": args.fused,
            "device": str(device),
            "threads": args.threads,
            "profile": args.profile,
            "row_kernels": not args.no_row_kernels,
        }
        for classes in args.classes
        for head, rate, update in heads
    ]


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=DEFAULT_CLASSES,
        help="numbers of classes (default: 1e4 1e5 1e6, what a 2-core, 24 GB CPU machine runs)",
    )
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1], help="Partial FC sample rates")
    parser.add_argument(
        "--updates",
        nargs="+",
        default=["dense", "lazy", "sparse"],
        choices=["dense", "lazy", "sparse"],
        help="head.update modes at sample rates below 1 (default: all three; --paired: those against dense)",
    )
    parser.add_argument(
        "--lazy-sync-every",
        type=int,
        default=100,
        help="lazy: steps between full catch-ups (head.lazy_sync_every, default 100)",
    )
    parser.add_argument(
        "--count-bytes",
        action="store_true",
        help="count the bytes the head optimizer and the whole step read and write (one more step)",
    )
    parser.add_argument(
        "--fit-network",
        help="also say how many classes fit on 80 and 141 GB GPUs beside this "
        "backbone (e.g. r50), from the measured bytes per class",
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        help="also measure step-time ratios side by side in this process, this many alternated "
        "pairs: Partial FC 1 / full FC, lazy / dense and sparse / dense at 0.1 (default: off)",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        default=["partial_fc"],
        metavar="NAME",
        help="registered heads to run (heads.list_heads(), or 'all'; default: partial_fc, ArcFace)",
    )
    parser.add_argument(
        "--paired-heads",
        type=int,
        default=0,
        help="also measure every --heads head at sample rate 1 against a plain FC of its table's rows "
        "side by side in this process, this many rounds, with each step's peak (default: off)",
    )
    parser.add_argument(
        "--paired-rates",
        type=float,
        nargs="+",
        default=[0.1],
        help="--paired: the sample rates of the lazy / dense and sparse / dense pairs (default 0.1)",
    )
    parser.add_argument(
        "--no-row-kernels",
        action="store_true",
        help="lazy and sparse: the tensor-op row updates instead of trainer.row_sgd's row kernels",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="--paired-heads: also one step of each head under torch.profiler and the byte counter",
    )
    parser.add_argument("--paired-only", action="store_true", help="only the --paired / --paired-heads measurements")
    parser.add_argument("--fit-batch", type=int, default=128, help="the backbone's batch for --fit-network")
    parser.add_argument("--no-full-fc", action="store_true", help="leave out the plain Linear + cross-entropy head")
    parser.add_argument("--batch-size", type=int, default=128, help="embeddings per step (default 128)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1, help="steps not counted (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument(
        "--grad-to-none",
        action="store_true",
        help="zero_grad(set_to_none=True) instead of the trainer's set_to_none=False",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="SGD(fused=True): no weight-decay temporary as large as the centers (default: torch's)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process (faster; memory figures then less exact)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration (default 600)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    if args.heads == ["all"]:
        args.heads = list_heads()
    unknown = sorted(set(args.heads) - set(list_heads()))
    if unknown:
        raise SystemExit(f"unknown head(s) {', '.join(unknown)}: choose among {', '.join(list_heads())}")
    if args.tiny:
        args.classes, args.batch_size, args.embedding_size = [1000, 4000], 16, 32
        args.warmup, args.steps, args.in_process = 1, 1, True
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for config in [] if args.paired_only else configurations(args, device):
        need, free = estimated_bytes(config), available_bytes(device)
        if need > 0.7 * free:
            why = f"skipped: needs ~{need / 2**30:.1f} GiB (estimate), {free / 2**30:.1f} GiB available, 70 % allowed"
            rows.append({**config, "skipped": why})
        elif args.in_process:
            rows.append(run_one(config))
        else:
            rows.append(run_isolated(config, args.timeout))
        _progress(rows[-1])
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(device),
        "command": " ".join(sys.argv),
        "isolated": not args.in_process,
        "minimum_bytes_per_class": minimum_bytes_per_class(args.embedding_size),
        "results": rows,
    }
    if args.paired:
        base = {**configurations(args, device)[0], "head": "partial_fc"}
        results["paired"] = []
        for classes in args.classes:
            results["paired"] += run_paired(
                {**base, "num_classes": classes}, args.paired, args.paired_rates, not args.no_full_fc, args.updates
            )
    if args.paired_heads:
        base = configurations(args, device)[0]
        results["paired_heads"] = []
        for classes in args.classes:
            results["paired_heads"] += run_paired_heads({**base, "num_classes": classes}, args.heads, args.paired_heads)
    if args.fit_network and any("peak_bytes_per_class" in row for row in rows):
        results["fit"] = classes_that_fit(results, args.fit_network, args.fit_batch)
    _print(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


GPU_MEMORY_GB = (80, 141)  # an 80 GB H100 / A100, a 141 GB H200
RESERVE_BYTES = 2 * 2**30  # CUDA context, cuDNN workspace, allocator slack: an allowance, not a measurement


def backbone_training_bytes(network: str, batch: int, embedding: int) -> dict[str, int]:
    """What training `network` at `batch` holds beside the head, estimated on the meta device (no memory, no
    time): the tensors autograd saves for backward under bf16 autocast, plus 12 B per parameter (fp32 weight,
    gradient, SGD momentum)."""
    with torch.device("meta"):
        model = build_backbone(network, num_features=embedding)
        images = torch.empty(batch, 3, 112, 112)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    parameters = sum(p.numel() for p in model.parameters())
    activations = sum(saved.values())
    return {"activations": activations, "parameters": parameters, "bytes": activations + 12 * parameters}


def classes_that_fit(results: dict[str, Any], network: str, batch: int) -> dict[str, Any]:
    """From each head's measured peak bytes per class at the largest number of classes it ran: how many classes fit
    on one GPU beside `network` training at `batch` (bf16) and a fixed reserve."""
    embedding = results["results"][0]["embedding_size"]
    backbone = backbone_training_bytes(network, batch, embedding)
    per_head: dict[str, dict[str, Any]] = {}
    for row in results["results"]:
        if row.get("peak_bytes_per_class", 0) > 0:  # (in-process tiny runs may measure nothing)
            label = _label(row)
            if label not in per_head or row["num_classes"] > per_head[label]["measured_at"]:
                per_head[label] = {"bytes_per_class": row["peak_bytes_per_class"], "measured_at": row["num_classes"]}
    for entry in per_head.values():
        for gb in GPU_MEMORY_GB:
            room = gb * 10**9 - backbone["bytes"] - RESERVE_BYTES
            entry[f"classes_on_{gb}gb"] = int(room / entry["bytes_per_class"])
    return {"network": network, "batch": batch, "backbone": backbone, "reserve_bytes": RESERVE_BYTES, "heads": per_head}


def _label(row: dict[str, Any]) -> str:
    if row["head"] == "full_fc":
        rows = table_rows(row)
        return "full FC" if rows == row["num_classes"] else f"full FC ({rows:,} rows)"
    update = f" {row.get('update', 'dense')}" if row["sample_rate"] < 1 else ""
    name = "Partial FC" if row["head"] == "partial_fc" else row["head"]
    return f"{name} {row['sample_rate']:g}{update}"


def _progress(row: dict[str, Any]) -> None:
    done = row.get("skipped") or row.get("error") or f"{row['step_s_median'] * 1e3:.1f} ms"
    console.print(f"{_label(row)}, {row['num_classes']} classes: {done}", markup=False)


def _print(results: dict[str, Any]) -> None:
    rows = results["results"]
    if not rows:
        return  # --paired-only: printed as measured
    first = rows[0]
    title = (
        f"head step (forward + backward + SGD), batch {first['batch_size']}, {first['embedding_size']}-d, "
        f"{first['device']}; minimum {results['minimum_bytes_per_class']} B/class (center + momentum)"
    )
    table = Table(title=title)
    columns = ["head", "classes", "step ms", "samples/s", "peak MiB", "B/class", "x minimum"]
    counted = any("optimizer_bytes_per_step" in row for row in rows)
    if counted:
        columns += ["optimizer MB/step", "step MB"]
    for column in columns:
        table.add_column(column, justify="left" if column == "head" else "right")
    for row in rows:
        if "step_s_median" not in row:
            why = row.get("skipped") or row.get("error")
            table.add_row(_label(row), f"{row['num_classes']:,}", why, *[""] * (len(columns) - 3))
            continue
        extra = []
        if counted:
            extra = [f"{row.get('optimizer_bytes_per_step', 0) / 1e6:.1f}", f"{row.get('step_bytes', 0) / 1e6:.1f}"]
        table.add_row(
            _label(row),
            f"{row['num_classes']:,}",
            f"{row['step_s_median'] * 1e3:.1f}",
            f"{row['samples_per_s']:.0f}",
            f"{row['peak_bytes'] / 2**20:.0f}",
            f"{row['peak_bytes_per_class']:.0f}",
            f"{row['peak_vs_minimum']:.2f}",
            *extra,
        )
    console.print(table)
    fit = results.get("fit")
    if fit:
        backbone = fit["backbone"]
        table = Table(
            title=f"classes that fit beside {fit['network']} at batch {fit['batch']} (bf16: "
            f"{backbone['bytes'] / 2**30:.1f} GiB estimated) and a {fit['reserve_bytes'] / 2**30:.0f} GiB reserve"
        )
        for column in ("head", "B/class (measured at)", *(f"{gb} GB GPU" for gb in GPU_MEMORY_GB)):
            table.add_column(column, justify="left" if column == "head" else "right")
        for label, entry in fit["heads"].items():
            table.add_row(
                label,
                f"{entry['bytes_per_class']:.0f} ({entry['measured_at']:,})",
                *(f"{entry[f'classes_on_{gb}gb'] / 1e6:.1f}M" for gb in GPU_MEMORY_GB),
            )
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
