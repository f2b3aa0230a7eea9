"""One GPU, a few minutes: backbone training throughput, model FLOP utilization and memory, and Partial FC at
millions of classes. What `bench/gpu.sh` runs.

    bash bench/gpu.sh                                     # the whole set, under 6 minutes, one JSON
    python bench/gpu_bench.py --networks r50 --precisions bf16 --out gpu.json
    python bench/gpu_bench.py --tiny                      # CPU, seconds: what the test suite runs

Backbones (``--networks``, default r50 r100) x ``--precisions`` (bf16, fp16) x channels_last off/on x
``torch.compile`` off/on, both applied by ``trainer.backbone.apply_speed``, the trainer's code path for the recipe's
``speed.channels_last`` and ``speed.compile`` (NHWC weights and inputs; compiled in place, mode default). A step is
what the trainer computes: backbone forward under ``torch.autocast``, Partial FC (fp32, ``--head-classes`` classes,
sample rate 1), backward (fp16 through a ``GradScaler``), gradient clipping at 5, SGD (momentum 0.9, weight decay
5e-4; torch's default foreach implementation), ``zero_grad``. Synthetic
112x112 images already on the GPU: no data loading. Per configuration: ``--warmup`` untimed steps (cuDNN autotuning,
compilation), then ``--steps`` steps timed between two synchronizations.

Model FLOP utilization (MFU) = samples/s x FLOPs per sample / the GPU's peak. FLOPs per sample are counted once:
``models.count_flops`` gives the forward multiply-accumulates (convs, linear layers, attention) for one 112x112 image
(r50: 6.31 G, r100: 12.09 G); x 2 FLOPs per multiply-accumulate; x 3 for forward + backward (the backward computes
the gradients of the inputs and of the weights, each as costly as the forward). BatchNorm, PReLU, the head and the
optimizer are not counted (they run, so MFU is slightly conservative). The peak is the dense bf16/fp16 tensor-core
rate of the device, from ``PEAK_TFLOPS`` by device name, or ``--peak-tflops``.

Partial FC (``--pfc-classes``, default 1M, 10M and 20M, sample rate ``--pfc-sample-rate`` 0.1, batch
``--pfc-batch`` embeddings of 512-d) alone, as the trainer steps it (``optim.fused: true``: ``SGD(fused=True)`` +
``zero_grad(set_to_none=True)``), for each ``head.update`` mode (``--pfc-updates``: lazy, dense, sparse): step
time (lazy's full catch-up amortized over ``--pfc-lazy-sync-every`` steps) and peak memory, also as a multiple of
the minimum (centers + momentum). Dense keeps three center-sized fp32 tensors at the peak (centers, momentum, the
gradient); lazy and sparse two and the sampled rows. Out of memory is a result, not a failure.

Order and time bound (``--budget-s``): eager backbones, then Partial FC, then the compiled backbones by priority
(bf16 and channels_last first) while the time lasts; a configuration that would not fit the time left is skipped
and says so. The JSON is rewritten after every configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/gpu_bench.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from heads import PartialFC, PartialFCOptions  # noqa: E402
from models import build_backbone, count_flops  # noqa: E402
from trainer.backbone import apply_speed  # noqa: E402
from trainer.config import OptimConfig, SpeedConfig  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402
from trainer.row_sgd import RowSGD  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=140)

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets. The first name that
# occurs in torch.cuda.get_device_name() wins, so the specific ones come first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]
FLOPS_PER_MAC = 2
FORWARD_AND_BACKWARD = 3


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((value for name, value in PEAK_TFLOPS if name in device_name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_base(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, base: int | None) -> dict[str, int | None]:
    if device.type != "cuda" or base is None:
        return {"peak_bytes": None, "peak_reserved_bytes": None}
    return {
        "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def _time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Warm-up (timed as a whole: compilation, autotuning), then ``steps`` steps between two synchronizations: the
    host queues steps ahead of the GPU as in training, so the mean step is what a run sustains."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"warmup_s": warmup_s, "step_s": (time.perf_counter() - start) / steps}


# ------------------------------------------------------------------------------------------------------------------
# Backbones


def backbone_config(
    args: argparse.Namespace, network: str, precision: str, channels_last: bool, compiled: bool
) -> dict[str, Any]:
    return {
        "network": network,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "batch_size": args.batch_size,
    }


def run_backbone(config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Throughput, MFU and peak memory of one (network, precision, channels_last, compile) training step."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[config["precision"]]
    base = _memory_base(device)
    backbone = build_backbone(config["network"], num_features=args.embedding_size).to(device)
    macs = count_flops(backbone)
    # The trainer's own code path for the recipe's `speed.channels_last` and `speed.compile` (in place).
    speed = SpeedConfig(channels_last=config["channels_last"], compile=config["compile"])
    memory_format = apply_speed(backbone, speed, compile_backend=args.compile_backend)
    with device:
        head = PartialFC(PartialFCOptions(args.embedding_size, args.head_classes))
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        [{"params": trainable}, {"params": list(head.parameters())}], lr=0.1, momentum=0.9, weight_decay=5e-4
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    generator = torch.Generator(device=device).manual_seed(0)
    images = (torch.rand(args.batch_size, 3, 112, 112, device=device, generator=generator) * 2 - 1).contiguous(
        memory_format=memory_format
    )
    labels = torch.randint(0, args.head_classes, (args.batch_size,), device=device, generator=generator)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            embeddings = backbone(images)
        loss = head(embeddings, labels)  # fp32 inside, autocast off
        if scaler is None:
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, 5.0)
            scaler.step(optimizer)  # a host sync: the inf/NaN check
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    timing = _time_steps(step, device, args.warmup, args.steps)
    samples_per_s = args.batch_size / timing["step_s"]
    flops_per_sample = macs * FLOPS_PER_MAC * FORWARD_AND_BACKWARD
    peak = peak_tflops(args.device_name, args.peak_tflops)
    result = {
        **config,
        **timing,
        "samples_per_s": samples_per_s,
        "forward_macs_per_sample": macs,
        "train_flops_per_sample": flops_per_sample,
        "achieved_tflops": samples_per_s * flops_per_sample / 1e12,
        "mfu": samples_per_s * flops_per_sample / (peak * 1e12) if peak else None,
        **_peak_since(device, base),
    }
    return result


# ------------------------------------------------------------------------------------------------------------------
# Partial FC


def run_partial_fc(config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Step time and peak memory of Partial FC alone, stepped by the trainer's optimizer (`optim.fused: true`,
    `zero_grad(set_to_none=True)`) with `head.update` = config["update"]; lazy's full catch-up (every
    `--pfc-lazy-sync-every` steps) is timed apart and amortized into the step. Out of memory is a result."""
    classes, embedding = config["num_classes"], args.embedding_size
    center_bytes = classes * embedding * 4
    result: dict[str, Any] = {**config, "center_bytes": center_bytes}
    base = _memory_base(device)
    try:
        with device:  # 10M centers initialized on the GPU: seconds, where the CPU would take minutes
            options = PartialFCOptions(
                embedding,
                classes,
                sample_rate=config["sample_rate"],
                update=config["update"],
                lazy_sync_every=args.pfc_lazy_sync_every,
            )
            head = PartialFC(options)
        cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
        optimizer = build_optimizer(cfg, (head, 1.0), fused=True)
        generator = torch.Generator(device=device).manual_seed(0)
        embeddings = torch.randn(config["batch_size"], embedding, device=device, generator=generator)
        embeddings.requires_grad_()
        labels = torch.randint(0, classes, (config["batch_size"],), device=device, generator=generator)

        def step() -> None:
            head(embeddings, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            embeddings.grad = None

        result.update(_time_steps(step, device, args.pfc_warmup, args.pfc_steps))
        if isinstance(optimizer, RowSGD) and config["update"] == "lazy":
            _sync(device)
            start = time.perf_counter()
            optimizer.sync_rows()
            _sync(device)
            result["sync_s"] = time.perf_counter() - start
            result["step_s"] += result["sync_s"] / args.pfc_lazy_sync_every
        result["samples_per_s"] = config["batch_size"] / result["step_s"]
        result["status"] = "ok"
    except torch.OutOfMemoryError:
        result["status"] = "out of memory"
    result.update(_peak_since(device, base))
    if result["peak_bytes"] is not None:
        result["peak_center_copies"] = result["peak_bytes"] / center_bytes
        result["peak_vs_minimum"] = result["peak_bytes"] / (2 * center_bytes)  # centers + momentum
    return result


# ------------------------------------------------------------------------------------------------------------------
# The run


class Budget:
    """Wall-clock bound of the whole run; each configuration asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(eager backbones, Partial FC, compiled backbones by priority)."""
    eager = [
        backbone_config(args, network, precision, channels_last, compiled=False)
        for network in args.networks
        for precision in args.precisions
        for channels_last in (False, True)
    ]
    compiled = [
        backbone_config(args, network, precision, channels_last, compiled=True)
        for precision in args.precisions
        for channels_last in (True, False)
        for network in args.networks
    ]
    pfc = [
        {
            "num_classes": classes,
            "sample_rate": args.pfc_sample_rate,
            "batch_size": args.pfc_batch,
            "update": update,
            "optimizer": f"trainer's: SGD(fused=True), set_to_none=True, head.update {update}",
        }
        for classes in args.pfc_classes
        for update in args.pfc_updates
    ]
    return eager, pfc, compiled


def run(args: argparse.Namespace, device: torch.device, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            **machine_info(device),
            "device": args.device_name,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        },
        "command": " ".join(sys.argv),
        "peak_tflops": peak_tflops(args.device_name, args.peak_tflops),
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "device_name")},
        "backbones": [],
        "partial_fc": [],
    }
    eager, pfc, compiled = plan(args)
    step_seconds: dict[str, float] = {}  # eager step time per network, to guess what a configuration costs
    compile_seconds_per_block: list[float] = []  # compilation grows with the unrolled graph: per residual block

    def attempt(
        section: str, config: dict[str, Any], needs_s: float, runner: Callable[[], dict[str, Any]], within: Budget
    ) -> None:
        if within.left() < needs_s:
            row = {**config, "status": f"skipped: needs ~{needs_s:.0f} s, {max(within.left(), 0):.0f} s left"}
        else:
            try:
                row = runner()
            except Exception as exc:  # noqa: BLE001 - one configuration's failure is a result, the rest still runs
                row = {**config, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            if config.get("compile"):
                torch._dynamo.reset()  # drops the compiled graphs and what they hold
            _free(device)  # the runner's tensors are gone with its frame
        row.setdefault("status", "ok")
        results[section].append(row)
        write(results)
        _progress(section, row)

    steps = args.warmup + args.steps
    for config in eager:
        guess = step_seconds.get(config["network"], 0.1) * steps + 2
        attempt("backbones", config, guess, lambda c=config: run_backbone(c, args, device), budget)
        row = results["backbones"][-1]
        if "step_s" in row:
            step_seconds[row["network"]] = max(step_seconds.get(row["network"], 0.0), row["step_s"])
    for config in pfc:
        attempt("partial_fc", config, args.pfc_guess_s, lambda c=config: run_partial_fc(c, args, device), budget)
    compile_budget = Budget(min(args.compile_budget_s, budget.left()))
    for config in compiled:
        # Compilation is most of it: the slowest compile so far per block x this network's blocks, else a guess.
        network, blocks = config["network"], _blocks(config["network"])
        compile_guess = max(compile_seconds_per_block) * blocks if compile_seconds_per_block else args.compile_guess_s
        guess = compile_guess + step_seconds.get(network, 0.1) * steps
        attempt("backbones", config, guess, lambda c=config: run_backbone(c, args, device), compile_budget)
        row = results["backbones"][-1]
        if "warmup_s" in row:
            compile_seconds_per_block.append(row["warmup_s"] / blocks)
    return results


def _blocks(network: str) -> int:
    """Residual blocks of a registered backbone (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return sum(getattr(build_backbone(network), "layers", (1,)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", nargs="+", default=["r50", "r100"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, insightface's)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--head-classes", type=int, default=10_000, help="Partial FC classes in the backbone step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per backbone configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backbone configuration")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--compile-guess-s",
        type=float,
        default=60,
        help="time assumed for the first compilation, to decide whether it fits (default 60); later "
        "ones are guessed from the slowest so far, per residual block",
    )
    parser.add_argument("--pfc-classes", type=int, nargs="+", default=[1_000_000, 10_000_000, 20_000_000])
    parser.add_argument(
        "--pfc-updates",
        nargs="+",
        default=["lazy", "dense", "sparse"],
        choices=["dense", "lazy", "sparse"],
        help="head.update modes (default: all three)",
    )
    parser.add_argument("--pfc-lazy-sync-every", type=int, default=100, help="head.lazy_sync_every (default 100)")
    parser.add_argument("--pfc-sample-rate", type=float, default=0.1)
    parser.add_argument("--pfc-batch", type=int, default=128, help="embeddings per Partial FC step (default 128)")
    parser.add_argument("--pfc-warmup", type=int, default=2)
    parser.add_argument("--pfc-steps", type=int, default=5)
    parser.add_argument("--pfc-guess-s", type=float, default=20, help="time assumed for one Partial FC configuration")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16/fp16 peak (default: by name)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=310,
        help="no configuration starts that would end after this many seconds (default 310)",
    )
    parser.add_argument(
        "--compile-budget-s",
        type=float,
        default=float("inf"),
        help="the same for the compiled backbones, from when they start (default: what is left)",
    )
    parser.add_argument("--device", help="default: cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU, seconds: a tiny network and head, for the tests")
    parser.add_argument("--out", default="bench-gpu.json", help="the JSON, rewritten after every configuration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.networks, args.batch_size, args.embedding_size, args.head_classes = ["r_lite"], 2, 64, 100
        args.warmup, args.steps, args.pfc_warmup, args.pfc_steps = 1, 1, 1, 1
        args.pfc_classes, args.pfc_batch = [1000, 10_000], 8
        # aot_eager traces forward and backward as inductor would, without compiling kernels. The compile budget
        # lets the first compiled configuration start and skips the others: both paths run.
        args.device, args.compile_backend, args.compile_guess_s = args.device or "cpu", "aot_eager", 0
        args.compile_budget_s = 1
        torch.set_num_threads(1)
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("no CUDA device: run this on a GPU machine (or --tiny / --device cpu for a CPU check)")
        return 2
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions (insightface does)

    def write(results: dict[str, Any]) -> None:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    results = run(args, device, write)
    _print(results)
    console.print(f"wrote {args.out}")
    return 0


def _progress(section: str, row: dict[str, Any]) -> None:
    if section == "backbones":
        what = f"{row['network']} {row['precision']} channels_last={row['channels_last']} compile={row['compile']}"
        done = f"{row['samples_per_s']:.0f} samples/s" if "samples_per_s" in row else row["status"]
    else:
        what = f"Partial FC {row['num_classes']:,} classes, {row['optimizer']}"
        done = f"{row['step_s'] * 1e3:.1f} ms" if row["status"] == "ok" else row["status"]
    console.print(f"{what}: {done}", markup=False)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _print(results: dict[str, Any]) -> None:
    peak = results["peak_tflops"]
    table = Table(title=f"backbone training step on {results['machine']['device']} (peak {peak or '?'} TFLOP/s)")
    for column in (
        "network",
        "precision",
        "channels_last",
        "compile",
        "samples/s",
        "TFLOP/s",
        "MFU",
        "peak GiB",
        "warm-up s",
    ):
        table.add_column(column, justify="left" if column in ("network", "precision") else "right")
    for row in results["backbones"]:
        on_off = ("on" if row["channels_last"] else "off", "on" if row["compile"] else "off")
        flags = (row["network"], row["precision"], *on_off)
        if "samples_per_s" not in row:
            table.add_row(*flags, row["status"], "", "", "", "")
            continue
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        table.add_row(
            *flags,
            f"{row['samples_per_s']:.0f}",
            f"{row['achieved_tflops']:.1f}",
            mfu,
            _gib(row["peak_bytes"]),
            f"{row['warmup_s']:.1f}",
        )
    console.print(table)
    table = Table(title="Partial FC alone (sample rate, batch as in settings)")
    for column in ("classes", "optimizer", "status", "step ms", "peak GiB", "x centers"):
        table.add_column(column, justify="left" if column in ("optimizer", "status") else "right")
    for row in results["partial_fc"]:
        copies = row.get("peak_center_copies")
        table.add_row(
            f"{row['num_classes']:,}",
            row["optimizer"],
            row["status"],
            f"{row['step_s'] * 1e3:.1f}" if "step_s" in row else "",
            _gib(row.get("peak_bytes")),
            "-" if copies is None else f"{copies:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
