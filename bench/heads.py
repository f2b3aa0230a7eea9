"""Every registered head trained the same way (backbone, data, steps, seed) through the real trainer CLI; verification
accuracy and step time per head, as JSON and as the table of docs/heads.md.

    python bench/heads.py --out heads.json --doc docs/heads.md     # all heads, r_lite, 60 steps of 64 (CPU: ~1 h)
    python bench/heads.py --heads partial_fc adaface --steps 200
    python bench/heads.py --tiny                                   # seconds per head, what the tests run

Each head is one `python -m trainer.main --config launch/recipes/default.yaml --head.name <head> ...` in its own
process (one CPU process, the default recipe's generated faces), with the default recipe's s = 32 for every head and
each head's other settings at its paper's defaults. Read back from the run's `train.log`: the verification accuracy
on the generated dataset's val.bin at the last step (the recipe's only target), the loss at the first and last
logged step, and the samples/s of the logged intervals after the first (the first holds start-up); the step time is
the global batch over the median of those. The heads share everything else, so differences are the heads' own, but
a few dozen steps on a small synthetic set say how a head starts, not where it ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/heads.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from heads import list_heads  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402

REPO = _HERE.parent
DEFAULT_RECIPE = REPO / "launch" / "recipes" / "default.yaml"
TINY_RECIPE = REPO / "tests" / "e2e" / "tiny.yaml"
TINY_HEADS = ["adaface"]  # one head with global state: each run is a full CLI start-up
STEP_LINE = re.compile(r"step (\d+)/(\d+) epoch \d+ loss ([\d.naninf]+) lr [\d.e-]+ ([\d.]+) samples/s")
ACCURACY_LINE = re.compile(r"\[(\S+)\]\[(\d+)\] Accuracy-Flip: ([\d.]+)\+-([\d.]+)")
console = Console() if sys.stdout.isatty() else Console(width=130)


def overrides(args: argparse.Namespace, head: str, output: Path) -> list[str]:
    values: dict[str, Any] = {
        "output": str(output),
        "head.name": head,
        "network.name": args.network,
        "schedule.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "train.log_every": args.log_every,
        "train.save_every": 0,
        "eval.every": 0,  # once, at the last step
        "schedule.warmup_epochs": 0.0,  # a few dozen steps: the default recipe's warm-up would take them all
    }
    return [item for key, value in values.items() for item in (f"--{key}", json.dumps(value))]


def parse_log(text: str) -> dict[str, Any]:
    steps = [(int(m[1]), float(m[3]), float(m[4])) for m in STEP_LINE.finditer(text)]
    accuracy = [(m[1], int(m[2]), float(m[3]), float(m[4])) for m in ACCURACY_LINE.finditer(text)]
    if not steps:
        raise RuntimeError("no step line in train.log")
    rates = [rate for _, _, rate in steps[1:]] or [steps[0][2]]
    out: dict[str, Any] = {
        "loss_first": steps[0][1],
        "loss_last": steps[-1][1],
        "samples_per_s": statistics.median(rates),
    }
    if accuracy:
        target, step, acc, std = accuracy[-1]
        out.update(val_target=target, val_step=step, val_accuracy=acc, val_std=std)
    return out


def run_head(args: argparse.Namespace, head: str, scratch: Path) -> dict[str, Any]:
    output = scratch / head
    command = [sys.executable, "-m", "trainer.main", "--config", str(args.recipe), *overrides(args, head, output)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    row: dict[str, Any] = {"head": head, "wall_s": time.perf_counter() - start, "returncode": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-600:]
        return row
    row.update(parse_log((output / "train.log").read_text()))
    row["step_s"] = args.batch_size / row["samples_per_s"]
    return row


def markdown(report: dict[str, Any]) -> str:
    """docs/heads.md: how to read the table, the table, and where it was measured."""
    info, settings = report["machine"], report["settings"]
    lines = [
        "# Heads side by side",
        "",
        "Every registered head trained the same way by `bench/heads.py`: the same backbone, generated faces, steps,",
        "batch and seed, through the real trainer CLI (`python -m trainer.main`, one CPU process). What differs is the",
        "head alone (its paper's settings, with the default recipe's s = 32 for all). Accuracy is the verification",
        "accuracy on the generated dataset's `val.bin` at the last step; step time is the global batch over the median",
        "samples/s of the logged intervals after the first.",
        "",
        f"**This is a short run** ({settings['steps']} steps of {settings['batch_size']}, about "
        f"{settings['steps'] * settings['batch_size'] / 6000:.2f} epoch of the 6,000 generated images, "
        f"`{settings['network']}`, on a shared 2-core CPU; fewer steps than the default recipe's 186, to keep the "
        "nine runs affordable there): it shows how each head starts and what it costs per step, not the accuracy "
        "it reaches. For that, run the head's recipe in `launch/recipes/` (its paper's data and schedule).",
        "",
        "| head | val accuracy | loss first -> last | step time (s) | samples/s | wall (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["heads"]:
        if row.get("returncode"):
            lines.append(f"| `{row['head']}` | failed (exit {row['returncode']}) | | | | |")
            continue
        accuracy = f"{row['val_accuracy']:.4f} +- {row['val_std']:.4f}" if "val_accuracy" in row else "-"
        lines.append(
            f"| `{row['head']}` | {accuracy} | {row['loss_first']:.3f} -> {row['loss_last']:.3f} | "
            f"{row['step_s']:.3f} | {row['samples_per_s']:.1f} | {row['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Machine: {info.get('cpu_model', '?')}, {info.get('cpu_count', '?')} CPUs, {info.get('platform', '?')} "
        f"(shared with other jobs: wall-clock figures carry that noise), torch {info.get('torch', '?')}.",
        f"Date: {report['date']}.",
        "",
        "Command:",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        "Each head ran as:",
        "",
        "```bash",
        f"python -m trainer.main --config {Path(settings['recipe']).relative_to(REPO)} --head.name <head> "
        + " ".join(shlex.quote(a) for a in overrides_template(settings)),
        "```",
        "",
        'How to choose a head: README.md, "Choosing a head and a backbone". Each head\'s settings, what it does',
        "and how it differs from its official code: its module in `heads/` (its settings class and its class's "
        "docstring).",
        "",
    ]
    return "\n".join(lines)


# docs/heads.md's hand-written sections (the per-head step cost measured by bench/head_scaling.py) start at this
# line: --doc rewrites the part above it and keeps them.
KEEP_FROM = "<!-- bench/heads.py --doc rewrites the part above this line and keeps the rest -->"


def write_doc(path: Path, report: dict[str, Any]) -> None:
    """Write `markdown(report)` to `path`, keeping the part of the existing file from `KEEP_FROM` on."""
    kept = ""
    if path.exists():
        text = path.read_text()
        at = text.find(KEEP_FROM)
        if at >= 0:
            kept = "\n" + text[at:]
    path.write_text(markdown(report) + kept)


def overrides_template(settings: dict[str, Any]) -> list[str]:
    namespace = argparse.Namespace(**settings)
    return overrides(namespace, "<head>", Path("<output>"))[4:]  # without --output and --head.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--heads", nargs="+", default=None, help="heads to train (default: every registered one)")
    parser.add_argument("--network", default="r_lite")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2048)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per head")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--doc", type=Path, default=None, help="write the markdown table here (docs/heads.md)")
    parser.add_argument("--tiny", action="store_true", help="tests/e2e/tiny.yaml, 2 steps, one head")
    args = parser.parse_args(argv)
    if args.tiny:
        args.recipe, args.steps, args.batch_size, args.log_every, args.network = TINY_RECIPE, 2, 16, 1, "r_lite"
        args.heads = args.heads or TINY_HEADS
    heads = args.heads or list_heads()
    unknown = sorted(set(heads) - set(list_heads()))
    if unknown:
        parser.error(f"unknown heads {unknown} (known: {', '.join(list_heads())})")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-heads-") as scratch:
        for head in heads:
            console.print(f"training {head} ...")
            rows.append(run_head(args, head, Path(scratch)))
    settings = {
        "recipe": str(Path(args.recipe).resolve()),
        "network": args.network,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "log_every": args.log_every,
    }
    report = {
        "machine": machine_info(),
        "command": "python bench/heads.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings,
        "heads": rows,
    }
    table = Table(title=f"heads: {args.network}, {args.steps} steps of {args.batch_size}")
    for column in ("head", "val accuracy", "loss first -> last", "step s", "samples/s"):
        table.add_column(column)
    for row in rows:
        if row["returncode"]:
            table.add_row(row["head"], f"failed: {row['error'][-80:]}", "", "", "")
            continue
        table.add_row(
            row["head"],
            f"{row.get('val_accuracy', float('nan')):.4f}",
            f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}",
            f"{row['step_s']:.3f}",
            f"{row['samples_per_s']:.1f}",
        )
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.doc:
        write_doc(args.doc, report)
    return 1 if any(row["returncode"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
