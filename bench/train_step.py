"""Training-step throughput per backbone and precision, and the trainer's overhead over a bare step.

    python bench/train_step.py --networks r_lite r18 --out train-step.json
    python bench/train_step.py --networks r18 --precision bf16 --batch-size 8 --profile
    python bench/train_step.py --tiny                    # seconds: what the test suite runs

Three timings of the same work, interleaved step by step so that a busy machine slows them alike:

* ``bare``: backbone forward (under ``torch.autocast`` for bf16) + Partial FC + ``loss.backward()`` + the same
  gradient clipping (``nn.utils.clip_grad_norm_``) + a plain ``torch.optim.SGD`` step at the trainer's lr +
  ``zero_grad()``: no Accelerate, no schedule object, no logging. Same math, so both runs follow one trajectory.
* ``step``: ``trainer.loop.Trainer.train_step`` of a real Trainer (``data.source: synthetic``, one process,
  an Accelerator): accumulate context, lr schedule, Accelerate autocast and backward, ``loss.item()``, gradient
  clipping, the prepared optimizer's step and ``zero_grad(set_to_none=False)``.
* ``loop``: one iteration of ``Trainer.train()``: the step plus the synthetic DataLoader (0 workers),
  ``to_device``, bad-data count, progress bar and logging; evaluation and checkpoints are off while timed (the
  final checkpoint is written after the last timed step).

The bare step runs beside each trainer step (after it on even steps, before it on odd ones), on the same batch,
with modules of the same architecture and weights (a copy of the trainer's backbone and head). The first
``--warmup`` steps are not counted. Overhead is the median over steps of ``trainer time / bare time - 1``, with its
quartiles. ``--profile`` adds a torch.profiler breakdown: the operators the trainer step calls more often than the
bare step (its extra work), with their time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/train_step.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any, Literal  # noqa: E402

import accelerate  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from models import build_backbone, count_flops, list_backbones  # noqa: E402
from trainer import reporting  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=130)

Precision = Literal["fp32", "bf16"]
TARGET_OVERHEAD = 0.05


def machine() -> dict[str, Any]:
    return {**reporting.machine_info(), "torch_threads": torch.get_num_threads(), "accelerate": accelerate.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``fn`` returns, its wall-clock seconds), the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


class BareStep:
    """Forward + backward + clipping + SGD of a copy of the trainer's modules, in plain torch: the same math as the
    trainer's step (same lr, same clipping), so that both follow the same trajectory. Without clipping the bare
    copy diverges within a step (PReLU slopes in the thousands at lr 0.1) and its kernels stop costing the same."""

    def __init__(self, trainer: Trainer, precision: Precision) -> None:
        cfg = trainer.cfg
        # A fresh backbone with the trainer's weights: the prepared one has Accelerate's autocast patched onto it.
        self.backbone = build_backbone(
            cfg.network.name, num_features=cfg.network.embedding_size, dropout=cfg.network.dropout
        ).to(trainer.accelerator.device)
        self.backbone.load_state_dict(trainer.accelerator.unwrap_model(trainer.backbone).state_dict())
        self.backbone.train()
        self.head = copy.deepcopy(trainer.head)
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            [{"params": trainable}, {"params": list(self.head.parameters())}],
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        self.clip_grad_norm = cfg.train.clip_grad_norm
        self.device_type = trainer.accelerator.device.type
        self.autocast = precision == "bf16"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            embeddings = self.backbone(images)
        loss = self.head(embeddings, labels)
        loss.backward()
        if self.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_trainer(args: argparse.Namespace, network: str, precision: Precision, output: Path) -> Trainer:
    """A real Trainer on synthetic data, in this process, with its own Accelerator."""
    total_steps = args.warmup + args.steps
    overrides = {
        "output": str(output),
        "network.name": network,
        "network.embedding_size": args.embedding_size,
        "head.sample_rate": args.sample_rate,
        "data.source": "synthetic",
        "data.num_classes": args.num_classes,
        "data.num_images": args.batch_size * total_steps,  # one epoch
        "data.num_workers": 0,
        "train.batch_size": args.batch_size,
        "train.log_every": args.log_every,
        "train.save_every": 0,
        "eval.every": 0,
        "schedule.max_steps": total_steps,
    }
    if args.clip_grad_norm is not None:
        overrides["train.clip_grad_norm"] = args.clip_grad_norm
    cfg = load_config(None, [item for key, value in overrides.items() for item in (f"--{key}", str(value))])
    output.mkdir(parents=True, exist_ok=True)  # trainer/main.py makes it (and locks it) before the Trainer writes
    # Accelerate keeps one global state per process: forget the previous configuration's precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    return Trainer(cfg, accelerator)


def _overhead(trainer_s: Sequence[float], bare_s: Sequence[float]) -> dict[str, float]:
    """Trainer time / bare time - 1: the median over paired steps (the headline: one slow step, when another job
    took the core, moves it little), its quartiles (the noise), the ratio of the two medians, and the median paired
    difference in seconds."""
    ratios = [a / b - 1 for a, b in zip(trainer_s, bare_s, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "median": statistics.median(ratios),
        "median_s": statistics.median(a - b for a, b in zip(trainer_s, bare_s, strict=True)),
        "q1": quartiles[0],
        "q3": quartiles[2],
        "of_medians": statistics.median(trainer_s) / statistics.median(bare_s) - 1,
    }


def _summary(times: Sequence[float], batch_size: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "step_s_median": median,
        "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times),
        "samples_per_s": batch_size / median,
    }


class InterleavedTimer:
    """Stands in for ``trainer.train_step`` inside ``Trainer.train()``: times each trainer step, the loop around it,
    and a bare step on the same batch.

    The bare step runs after the trainer's on even steps and before it on odd ones, so that neither always finds
    the caches as the data loader (or the other step) left them.
    """

    def __init__(self, trainer: Trainer, bare: BareStep) -> None:
        self.trainer, self.bare = trainer, bare
        self.train_step = trainer.train_step  # the bound method
        self.device = trainer.accelerator.device
        self.step_s: list[float] = []
        self.loop_s: list[float] = []  # the rest of the loop since the previous call returned, plus the step
        self.bare_s: list[float] = []
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_exit: float | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, bad: torch.Tensor | None = None) -> float | None:
        entered = time.perf_counter()
        trainer = self.trainer
        lr = trainer.schedule.lr(trainer.state.step) * trainer.guard.lr_scale  # what this trainer step will use
        bare_first = len(self.step_s) % 2 == 1
        if bare_first:
            self.bare_s.append(_timed(self.device, lambda: self.bare(images, labels, lr))[1])
        loss, seconds = _timed(self.device, lambda: self.train_step(images, labels, bad))
        self.step_s.append(seconds)
        self.loop_s.append(float("nan") if self.last_exit is None else entered - self.last_exit + seconds)
        if not bare_first:
            self.bare_s.append(_timed(self.device, lambda: self.bare(images, labels, lr))[1])
        if self.first_batch is None:
            self.first_batch = (images, labels)
        self.last_exit = time.perf_counter()
        return loss


def measure(args: argparse.Namespace, network: str, precision: Precision) -> dict[str, Any]:
    """Run ``Trainer.train()`` for warm-up + timed steps, a bare step beside each trainer step."""
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as scratch:
        trainer = build_trainer(args, network, precision, Path(scratch) / "run")
        bare = BareStep(trainer, precision)
        timer = InterleavedTimer(trainer, bare)
        trainer.train_step = timer  # type: ignore[method-assign]  # the loop calls self.train_step
        quiet = reporting.console.quiet
        reporting.console.quiet = True  # the trainer's progress bar and summary would mix with this table
        try:
            trainer.train()  # warm-up + timed steps; the final checkpoint is written after the last timed step
        finally:
            reporting.console.quiet = quiet
            trainer.train_step = timer.train_step  # type: ignore[method-assign]

    skip = args.warmup
    step, bare_s = timer.step_s[skip:], timer.bare_s[skip:]
    loop = timer.loop_s[max(skip, 1) :]  # the first call has no previous one to measure the loop from
    result: dict[str, Any] = {
        "network": network,
        "precision": precision,
        "effective_precision": trainer.precision,
        "device": str(timer.device),
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "embedding_size": args.embedding_size,
        "sample_rate": args.sample_rate,
        "clip_grad_norm": trainer.cfg.train.clip_grad_norm,
        "warmup_steps": args.warmup,
        "timed_steps": len(step),
        "forward_macs_per_sample": count_flops(bare.backbone),
        "bare": _summary(bare_s, args.batch_size),
        "trainer_step": _summary(step, args.batch_size),
        "trainer_loop": _summary(loop, args.batch_size),
        "overhead": {"step": _overhead(step, bare_s), "loop": _overhead(loop, bare_s[len(bare_s) - len(loop) :])},
    }
    result["within_target"] = result["overhead"]["step"]["median"] <= TARGET_OVERHEAD
    if args.profile and timer.first_batch is not None:
        images, labels = timer.first_batch
        result["profile"] = profile(trainer, bare, images, labels, args.profile_steps, args.profile_top)
    return result


def _ops_per_step(fn: Callable[[], Any], steps: int) -> dict[str, tuple[float, float]]:
    """(calls, self CPU seconds) per step of every operator ``fn`` runs, over ``steps`` calls under torch.profiler."""
    fn()  # not profiled: allocator and oneDNN primitive caches settle
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return {event.key: (event.count / steps, event.self_cpu_time_total / 1e6 / steps) for event in prof.key_averages()}


def profile(
    trainer: Trainer, bare: BareStep, images: torch.Tensor, labels: torch.Tensor, steps: int, top: int
) -> dict[str, Any]:
    """Where the trainer step's extra time goes, by torch.profiler on both steps.

    Operators called more often per step by the trainer than by the bare step are the trainer's extra work
    (clipping's norms, ``zero_grad(set_to_none=False)``'s fills, gradient accumulation into kept ``.grad`` tensors,
    ``.item()``): listed with their time. Operators called as often in both do the same work; their time difference
    is noise on a shared machine and is summed in one row. What the operators leave unexplained of the wall-clock
    difference is Python (Accelerate's and the trainer's) and time outside operators. The trainer's step counter
    moves on; nothing else about the run matters here.
    """
    device = trainer.accelerator.device

    def full() -> None:
        trainer.train_step(images, labels)

    def plain() -> None:
        bare(images, labels, trainer.current_lr)

    full_ops, bare_ops = _ops_per_step(full, steps), _ops_per_step(plain, steps)
    walls: dict[Callable[[], None], list[float]] = {full: [], plain: []}
    for index in range(steps):  # interleaved, alternating which goes first
        for fn in (full, plain) if index % 2 == 0 else (plain, full):
            walls[fn].append(_timed(device, fn)[1])
    full_wall, bare_wall = statistics.median(walls[full]), statistics.median(walls[plain])
    extra, same = [], []
    for op in set(full_ops) | set(bare_ops):
        (full_calls, full_s), (bare_calls, bare_s) = full_ops.get(op, (0.0, 0.0)), bare_ops.get(op, (0.0, 0.0))
        row = {
            "op": op,
            "calls_trainer": full_calls,
            "calls_bare": bare_calls,
            "trainer_s": full_s,
            "bare_s": bare_s,
            "diff_s": full_s - bare_s,
        }
        (extra if full_calls != bare_calls else same).append(row)
    extra.sort(key=lambda row: -abs(row["diff_s"]))
    same.sort(key=lambda row: -abs(row["diff_s"]))
    same_work = sum(row["diff_s"] for row in same)
    explained = same_work + sum(row["diff_s"] for row in extra)
    return {
        "steps": steps,
        "trainer_step_s": full_wall,
        "bare_step_s": bare_wall,
        "ops_self_s_per_step": {
            "trainer": sum(value[1] for value in full_ops.values()),
            "bare": sum(value[1] for value in bare_ops.values()),
        },
        "extra_ops": extra[:top],
        "extra_ops_s": sum(row["diff_s"] for row in extra),
        "same_ops_difference_s": same_work,
        "same_ops_largest": same[:5],
        "python_and_untracked_s": (full_wall - bare_wall) - explained,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        default=["r_lite", "r18"],
        choices=list_backbones(),
        metavar="NAME",
        help=f"backbones from the registry (default: r_lite r18; known: {', '.join(list_backbones())})",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="fp32 and/or bf16 (torch.autocast; Accelerate's mixed_precision for the trainer)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="per step (default 16: a 2-core CPU)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate")
    parser.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        help="gradient clipping, trainer and bare step alike (default: the recipe's, 5.0; 0 = off)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps not counted (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (default 8)")
    parser.add_argument("--log-every", type=int, default=50, help="the trainer's train.log_every (default 50)")
    parser.add_argument("--profile", action="store_true", help="per-operator breakdown of trainer minus bare step")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=15, help="operators listed (default 15)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.networks, args.precision = ["r_lite"], ["fp32", "bf16"]
        args.batch_size, args.num_classes, args.embedding_size = 2, 50, 64
        args.warmup, args.steps, args.profile_steps, args.threads = 1, 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("trainer").setLevel(logging.WARNING)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "target_overhead": TARGET_OVERHEAD,
        "results": [measure(args, network, precision) for network in args.networks for precision in args.precision],
    }
    _print(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


def _fmt_overhead(overhead: dict[str, float]) -> str:
    return f"{overhead['median']:+.1%} [{overhead['q1']:+.1%}, {overhead['q3']:+.1%}]"


def _print(results: dict[str, Any]) -> None:
    first = results["results"][0]
    title = (
        f"training step, batch {first['batch_size']}, {first['num_classes']} classes, "
        f"{first['embedding_size']}-d, median of {first['timed_steps']} steps (samples/s)"
    )
    table = Table(title=title)
    columns = ("network", "precision", "bare", "trainer step", "trainer loop", "step overhead [q1, q3]", "loop")
    for column in columns:
        table.add_column(column, justify="left" if column in ("network", "precision") else "right")
    for row in results["results"]:
        table.add_row(
            row["network"],
            row["effective_precision"],
            f"{row['bare']['samples_per_s']:.1f}",
            f"{row['trainer_step']['samples_per_s']:.1f}",
            f"{row['trainer_loop']['samples_per_s']:.1f}",
            _fmt_overhead(row["overhead"]["step"]),
            _fmt_overhead(row["overhead"]["loop"]),
        )
    console.print(table)
    for row in results["results"]:
        if "profile" not in row:
            continue
        prof = row["profile"]
        title = f"{row['network']} {row['effective_precision']}: trainer step minus bare step, per step"
        table = Table(title=title)
        for column in ("operator (calls differ)", "calls trainer / bare", "trainer ms", "bare ms", "difference ms"):
            table.add_column(column, justify="left" if column.startswith("operator") else "right")

        def ms(seconds: float, sign: str = "") -> str:
            return f"{seconds * 1e3:{sign}.2f}"

        for item in prof["extra_ops"]:
            calls = f"{item['calls_trainer']:g} / {item['calls_bare']:g}"
            table.add_row(item["op"], calls, ms(item["trainer_s"]), ms(item["bare_s"]), ms(item["diff_s"], "+"))
        table.add_row("operators called as often (noise)", "", "", "", ms(prof["same_ops_difference_s"], "+"))
        table.add_row("python + untracked", "", "", "", ms(prof["python_and_untracked_s"], "+"))
        trainer_s, bare_s = prof["trainer_step_s"], prof["bare_step_s"]
        table.add_row("wall clock (median)", "", ms(trainer_s), ms(bare_s), ms(trainer_s - bare_s, "+"))
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
