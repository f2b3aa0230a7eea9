"""Trainer samples/s with each speed switch of the recipe on and off (`speed.*`, `optim.fused`).

    python bench/speed.py --out speed.json                     # r_lite, batch 32: one process, then 2-process DDP
    python bench/speed.py --network r18 --batch-size 8 --no-ddp
    python bench/speed.py --tiny                               # seconds, what the tests run

One process (in this one): the default recipe's switches, and variants that change one of them:
``speed.channels_last``, ``speed.compile`` (inductor, ``speed.compile_mode``), both, ``optim.fused false``.
Two processes on gloo (``accelerate launch`` with ``accelerate_configs/cpu_ddp_2proc.yaml``, DDP): the default
(25 MiB buckets, no hook) and ``speed.ddp_bucket_cap_mb`` 1 and 100, ``speed.ddp_comm_hook`` fp16 and power_sgd
(rank 1, compressing after ``--power-sgd-warmup`` plain steps), ``speed.ddp_gradient_as_bucket_view``; the bf16 hook
is recorded as refused (gloo). Each part ends with a second copy of its default: what it shows against the first
copy is the measurement's own noise and bias (memory placement, the order of construction), not a switch.

Every variant is a real ``trainer.loop.Trainer`` built from recipe overrides, on generated faces (uint8 batches
normalized by ``TrainInput.to_device``, as in a training run). All variants are built first, then stepped in turn,
each step in another order (variant k goes first at step k), so that a machine shared with other jobs slows them
alike. A timed step is ``TrainInput.to_device`` + ``Trainer.train_step``: forward, Partial FC, backward (with DDP's
all-reduce), clipping, optimizer step, ``loss.item()``; fetching the batch is not timed. The first ``--warmup``
steps are not counted (for ``compile`` they hold the compilation: reported as warm-up seconds). Per variant: median
samples/s of the process (rank 0 for DDP; DDP keeps the ranks in step), and the median over steps of
default step time / variant step time with its quartiles: above 1 is faster than the default.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/speed.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from models import list_backbones  # noqa: E402
from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.distributed import build_accelerator  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=130)
REPO = _HERE.parent
DDP_CONFIG = REPO / "accelerate_configs" / "cpu_ddp_2proc.yaml"

# (name, recipe overrides), the first of each list being the baseline the others are compared with.
# --precision-pair: the one-process part compares Accelerate's mixed precision instead (the variant's precision by
# name; a recipe does not choose it), fp32 first.
PRECISION_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}),
    ("bf16 (autocast)", {}),
    ("fp32 again (noise check)", {}),
]
VARIANT_PRECISION = {"bf16 (autocast)": "bf16"}
SINGLE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("channels_last", {"speed.channels_last": True}),
    ("compile", {"speed.compile": True}),
    ("channels_last + compile", {"speed.channels_last": True, "speed.compile": True}),
    ("unfused optimizer", {"optim.fused": False}),
    ("default again (noise check)", {}),
]


def ddp_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The DDP part's (name, recipe overrides), its default first."""
    power_sgd = {"speed.ddp_comm_hook": "power_sgd", "speed.ddp_power_sgd_warmup_steps": args.power_sgd_warmup}
    return [
        ("default (25 MiB, no hook)", {}),
        ("buckets 1 MiB", {"speed.ddp_bucket_cap_mb": 1}),
        ("buckets 100 MiB", {"speed.ddp_bucket_cap_mb": 100}),
        ("fp16 hook", {"speed.ddp_comm_hook": "fp16"}),
        ("power_sgd hook", power_sgd),
        ("gradient as bucket view", {"speed.ddp_gradient_as_bucket_view": True}),
        ("bf16 hook", {"speed.ddp_comm_hook": "bf16"}),
        ("default again (noise check)", {}),
    ]


# --tiny: every path of this script (a variant of each part, a refusal) in seconds. Not `compile`: its first step
# alone takes 20-40 s here, and tests/e2e/test_speed.py trains a compiled run already.
TINY_SINGLE = ("default", "channels_last", "unfused optimizer")
TINY_DDP = ("default (25 MiB, no hook)", "fp16 hook", "bf16 hook")


def machine() -> dict[str, Any]:
    """`trainer.reporting.machine_info`, with what lscpu says of the CPU's layout and bf16 instructions."""
    info = machine_info()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor", "L3 cache"):
            if key in fields:
                info[key.lower().replace(" ", "_").replace("(s)", "s")] = fields[key].strip()
        flags = fields.get("Flags", "").split()
        info["bf16_instructions"] = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def overrides_for(args: argparse.Namespace, extra: dict[str, Any], output: Path) -> list[str]:
    """The command-line overrides of one variant: generated faces, no evaluation or checkpoint, then `extra`."""
    total_steps = args.warmup + args.steps
    base: dict[str, Any] = {
        "output": str(output),
        "network.name": args.network,
        "network.embedding_size": args.embedding_size,
        "data.source": "generated",
        "data.num_workers": 0,
        "data.generated.num_identities": args.identities,
        "data.generated.images_per_identity": args.images_per_identity,
        "data.generated.num_val_identities": 6,
        "data.generated.num_val_pairs": 40,
        "data.generated.seed": 1,
        "train.batch_size": args.batch_size,
        "train.save_every": 0,
        "eval.every": 0,
        "schedule.max_steps": total_steps,
        **extra,
    }
    return [item for key, value in base.items() for item in (f"--{key}", json.dumps(value))]


def batches(trainer: Trainer) -> Iterator[Any]:
    """The trainer's own loader, epoch after epoch (as `Trainer.train` walks it)."""
    epoch = 0
    while True:
        yield from trainer.input.batches(epoch)
        epoch += 1


def build(
    args: argparse.Namespace,
    variants: list[tuple[str, dict[str, Any]]],
    scratch: Path,
    precisions: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One Trainer per variant (its own Accelerator, built from the recipe as trainer/main.py does); a variant that
    the launch refuses is kept as a row with the refusal. `precisions`: a variant's own mixed precision by name
    (one process only), as `accelerate launch --mixed_precision` would give it; the others get the launch's."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    built = []
    for name, extra in variants:
        row: dict[str, Any] = {"variant": name, "overrides": extra}
        cfg = load_config(None, overrides_for(args, extra, scratch / f"run{len(built)}"))
        if precisions is not None:
            # Accelerate keeps one process-wide state, which a second precision would be refused by: each trainer
            # gets a fresh one, kept with it and put back before each of its steps (`measure`).
            os.environ["ACCELERATE_MIXED_PRECISION"] = precisions.get(name, launched)
            AcceleratorState._reset_state()
        accelerator = build_accelerator(cfg.output, speed=cfg.speed)
        try:
            row["trainer"] = Trainer(cfg, accelerator)
            row["accelerate_state"] = dict(AcceleratorState._shared_state)
        except ConfigError as exc:
            row["status"] = f"refused: {exc}"
        built.append(row)
    os.environ["ACCELERATE_MIXED_PRECISION"] = launched
    return built


def measure(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step every built trainer in turn, `--warmup` + `--steps` times; then the figures per variant (the first row,
    the baseline, must have been built)."""
    active = [index for index, row in enumerate(rows) if "trainer" in row]
    if not active or active[0] != 0:
        raise SystemExit(f"the baseline variant could not be built: {rows[0].get('status')}")
    sources = {index: batches(rows[index]["trainer"]) for index in active}
    seconds: dict[int, list[float]] = {index: [] for index in active}
    cpu_seconds: dict[int, list[float]] = {index: [] for index in active}
    for step in range(args.warmup + args.steps):
        first = step % len(active)
        for index in active[first:] + active[:first]:
            trainer = rows[index]["trainer"]
            batch = next(sources[index])
            # This trainer's Accelerate state (its precision): the same for every variant unless --precision-pair.
            AcceleratorState._shared_state.clear()
            AcceleratorState._shared_state.update(rows[index]["accelerate_state"])
            start, start_cpu = time.perf_counter(), time.process_time()
            images, labels, _ = trainer.input.to_device(batch, trainer.stepper.input_dtype(), trainer.memory_format)
            trainer.train_step(images, labels)  # ends in loss.item(): the step is done when it returns
            seconds[index].append(time.perf_counter() - start)
            cpu_seconds[index].append(time.process_time() - start_cpu)
    baseline = seconds[0][args.warmup :]
    baseline_cpu = cpu_seconds[0][args.warmup :]
    for index in active:
        trainer = rows[index].pop("trainer")
        rows[index].pop("accelerate_state")
        times = seconds[index][args.warmup :]
        speedups = [base / own for base, own in zip(baseline, times, strict=True)]
        quartiles = statistics.quantiles(speedups, n=4) if len(speedups) > 1 else [speedups[0]] * 3
        # The process's CPU time (one process: its torch threads and, with no loader workers, its input): without
        # the time other processes held the cores, which wall-clock time counts on a busy machine.
        cpu_times = cpu_seconds[index][args.warmup :]
        cpu_speedups = [base / own for base, own in zip(baseline_cpu, cpu_times, strict=True)]
        cpu_quartiles = statistics.quantiles(cpu_speedups, n=4) if len(cpu_speedups) > 1 else [cpu_speedups[0]] * 3
        rows[index].update(
            status="ok",
            processes=trainer.world_size,
            precision=trainer.precision,
            samples_per_s=args.batch_size * trainer.world_size / statistics.median(times),
            step_s_median=statistics.median(times),
            step_s=times,
            warmup_s=sum(seconds[index][: args.warmup]),
            speedup={"median": statistics.median(speedups), "q1": quartiles[0], "q3": quartiles[2]},
            step_cpu_s=cpu_times,
            cpu_speedup={
                "median": statistics.median(cpu_speedups),
                "q1": cpu_quartiles[0],
                "q3": cpu_quartiles[2],
            },
        )
    return rows


def run_single(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.precision == "bf16" else "no"
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        return measure(args, build(args, select(SINGLE_VARIANTS, args.single), Path(scratch)))


def run_precision_pair(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One process: the default recipe in fp32 and in bf16 (Accelerate's autocast), and fp32 again, side by side."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        return measure(args, build(args, PRECISION_VARIANTS, Path(scratch), VARIANT_PRECISION))


def run_ddp_worker(args: argparse.Namespace) -> int:
    """Inside `accelerate launch`: every rank builds and steps the same variants in the same order (DDP's
    collectives pair up across ranks); rank 0 writes the rows."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-speed-ddp-") as scratch:
        rows = build(args, select(ddp_variants(args), args.ddp), Path(scratch))
        results = measure(args, rows)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.ddp_worker).write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo may abort the process at exit
    return 0


def run_ddp(args: argparse.Namespace, argv: Sequence[str]) -> list[dict[str, Any]]:
    """Two processes through `accelerate launch`, one intra-op thread each by default; this script as the worker."""
    with tempfile.TemporaryDirectory(prefix="bench-speed-ddp-") as scratch:
        out = Path(scratch) / "ddp.json"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
            "--main_process_port", str(port), "--mixed_precision", "bf16" if args.precision == "bf16" else "no",
            str(Path(__file__).resolve()), *argv, "--ddp-worker", str(out),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.ddp_timeout)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"the 2-process DDP run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return list(json.loads(out.read_text()))


def select(variants: list[tuple[str, dict[str, Any]]], names: Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The named variants (all when `names` is None), baseline first."""
    return [variants[0]] + [variant for variant in variants[1:] if names is None or variant[0] in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--network", default="r_lite", choices=list_backbones(), help="backbone (default r_lite)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="Accelerate's mixed precision for both parts (default fp32)",
    )
    parser.add_argument("--identities", type=int, default=200, help="generated faces: identities (= classes)")
    parser.add_argument("--images-per-identity", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps not counted (compilation included; default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument(
        "--power-sgd-warmup",
        type=int,
        default=2,
        help="speed.ddp_power_sgd_warmup_steps (default 2: compressing from the third step on)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per process (default 1: 2 DDP processes on 2 cores)",
    )
    parser.add_argument(
        "--precision-pair",
        action="store_true",
        help="one process: fp32 against bf16 autocast side by side (instead of the speed switches; no DDP part)",
    )
    parser.add_argument("--no-single", action="store_true", help="skip the one-process variants")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process DDP variants")
    parser.add_argument("--ddp-timeout", type=float, default=900, help="seconds for the DDP launch (default 900)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="seconds: r_lite 32-d, batch 16, 1+1 steps, fewer variants (what the tests run)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)  # set by run_ddp: this process is one DDP rank
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.single = args.ddp = None  # every variant
    if args.tiny:
        # tests/e2e/tiny.yaml's network, batch and faces (96 images, generated in about a second).
        args.network, args.embedding_size, args.batch_size = "r_lite", 32, 16
        args.identities, args.images_per_identity = 12, 8
        args.warmup, args.steps, args.threads = 1, 1, 1
        args.single, args.ddp = TINY_SINGLE, TINY_DDP
    logging.getLogger("trainer").setLevel(logging.WARNING)
    if args.ddp_worker:
        return run_ddp_worker(args)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "settings": {
            key: value for key, value in vars(args).items() if key not in ("out", "ddp_worker", "single", "ddp")
        },
        "load_average_before": os.getloadavg(),
        "single": [] if args.no_single or args.precision_pair else run_single(args),
        "ddp": [] if args.no_ddp or args.precision_pair else run_ddp(args, argv),
        **({"precision": run_precision_pair(args)} if args.precision_pair else {}),
        "load_average_after": os.getloadavg(),
    }
    _print(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


def _print(results: dict[str, Any]) -> None:
    settings = results["settings"]
    precision = "fp32 vs bf16" if settings["precision_pair"] else settings["precision"]
    title = (
        f"trainer samples/s: {settings['network']}, batch {settings['batch_size']} per process, "
        f"{precision}, median of {settings['steps']} steps after {settings['warmup']}"
    )
    table = Table(title=title)
    columns = ("processes", "variant", "samples/s", "vs default [q1, q3]", "CPU time vs def.", "warm-up s", "status")
    for column in columns:
        table.add_column(column, justify="left" if column in ("processes", "variant", "status") else "right")
    for part, label in (("single", "1"), ("ddp", "2, DDP gloo"), ("precision", "1")):
        for row in results.get(part, []):
            if row["status"] != "ok":
                table.add_row(label, row["variant"], "", "", "", "", row["status"])
                continue
            speedup, cpu = row["speedup"], row["cpu_speedup"]
            table.add_row(
                label,
                row["variant"],
                f"{row['samples_per_s']:.1f}",
                f"{speedup['median']:.3f} [{speedup['q1']:.3f}, {speedup['q3']:.3f}]",
                f"{cpu['median']:.3f} [{cpu['q1']:.3f}, {cpu['q3']:.3f}]",
                f"{row['warmup_s']:.1f}",
                "ok",
            )
    console.print(table)
    before, after = results["load_average_before"], results["load_average_after"]
    console.print(f"load average (1 min) before / after: {before[0]:.2f} / {after[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
