"""Plot head-scaling results: throughput and peak memory against the number of classes, one line per head.

    python bench/plot.py docs/benchmarks/head_scaling.json            # -> docs/benchmarks/head_scaling.png
    python bench/plot.py a.json b.json --png both.png --out plot.json # several runs of bench/head_scaling.py, merged
    python bench/plot.py --tiny --out plot.json                       # seconds: built-in figures, for the tests

Left: samples/s of the head step (forward + backward + SGD) on log-log axes. Right: peak memory the head adds, with
the minimum a trained class needs (center + SGD momentum, ``embedding_size * 4 bytes * 2`` per class) as a dashed
line. Configurations that were skipped or failed are left out of the lines and listed in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console

console = Console() if sys.stdout.isatty() else Console(width=130)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO / "docs" / "benchmarks" / "head_scaling.json"
DEFAULT_PNG = REPO / "docs" / "benchmarks" / "head_scaling.png"


def tiny_results() -> dict[str, Any]:
    """Made-up figures in head_scaling's format (two heads, two sizes): exercises the plot, measures nothing."""
    rows = []
    for classes in (1000, 10_000):
        for head, rate, seconds, per_class in (("partial_fc", 0.1, 1e-3, 600.0), ("full_fc", 1.0, 2e-3, 500.0)):
            rows.append(
                {
                    "head": head,
                    "sample_rate": rate,
                    "num_classes": classes,
                    "batch_size": 16,
                    "embedding_size": 32,
                    "device": "cpu",
                    "step_s_median": seconds * classes / 1000,
                    "samples_per_s": 16 / (seconds * classes / 1000),
                    "peak_bytes": int(per_class * classes),
                }
            )
    rows.append(
        {
            "head": "partial_fc",
            "sample_rate": 1.0,
            "num_classes": 10_000,
            "batch_size": 16,
            "embedding_size": 32,
            "device": "cpu",
            "skipped": "made-up",
        }
    )
    return {"date": "tiny", "machine": {"cpu_model": "none (--tiny)"}, "minimum_bytes_per_class": 256, "results": rows}


def label(row: dict[str, Any]) -> str:
    if row["head"] == "full_fc":
        return "full FC (Linear + CE)"
    update = f", {row['update']}" if row.get("update") and row["sample_rate"] < 1 else ""  # head.update
    return f"Partial FC, sample rate {row['sample_rate']:g}{update}"


def series(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Measured rows grouped by head (sorted by classes; a later run replaces an earlier one's point), and the rest."""
    lines: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for run in runs:
        for row in run["results"]:
            if "samples_per_s" in row and row.get("peak_bytes") is not None:
                lines.setdefault(label(row), {})[row["num_classes"]] = row
            else:
                missing.append(row)
    return {name: [points[c] for c in sorted(points)] for name, points in lines.items()}, missing


def plot(runs: Sequence[dict[str, Any]], png: Path) -> dict[str, Any]:
    lines, missing = series(runs)
    if not lines:
        raise SystemExit("bench/plot.py: no measured configuration in the input")
    settings = {(p["batch_size"], p["embedding_size"], p["device"]) for points in lines.values() for p in points}
    if len(settings) > 1:
        raise SystemExit(f"bench/plot.py: the inputs differ in (batch, embedding size, device): {sorted(settings)}")
    first = next(iter(lines.values()))[0]
    minimum = runs[0]["minimum_bytes_per_class"]
    figure = Figure(figsize=(11, 4.4), dpi=120)
    speed, memory = figure.subplots(1, 2)
    for name, points in lines.items():
        classes = [p["num_classes"] for p in points]
        speed.plot(classes, [p["samples_per_s"] for p in points], marker="o", lw=1.4, label=name)
        memory.plot(classes, [p["peak_bytes"] / 2**30 for p in points], marker="o", lw=1.4, label=name)
    every = sorted({p["num_classes"] for points in lines.values() for p in points})
    memory.plot(every, [c * minimum / 2**30 for c in every], "k--", lw=1, label=f"minimum ({minimum} B/class)")
    for axes in (speed, memory):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("number of classes")
        axes.grid(which="both", linestyle="--", linewidth=0.4)
        axes.legend(fontsize=8)
    speed.set_ylabel("samples/s (head step)")
    speed.set_title("throughput")
    memory.set_ylabel("peak memory added (GiB)")
    memory.set_title("memory")
    machine = runs[0]["machine"].get("gpu") or runs[0]["machine"].get("cpu_model", "?")
    threads = f", {first['threads']} thread(s)" if first.get("threads") and first["device"] == "cpu" else ""
    figure.suptitle(
        f"Partial FC vs full FC: batch {first['batch_size']}, {first['embedding_size']}-d, {first['device']} "
        f"({machine}{threads}), {runs[0]['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    return {
        "png": str(png),
        "series": {
            name: [
                {"num_classes": p["num_classes"], "samples_per_s": p["samples_per_s"], "peak_bytes": p["peak_bytes"]}
                for p in points
            ]
            for name, points in lines.items()
        },
        "left_out": [
            {"head": label(row), "num_classes": row["num_classes"], "why": row.get("skipped") or row.get("error")}
            for row in missing
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="*", type=Path, help=f"head_scaling JSON files (default: {DEFAULT_INPUT})")
    parser.add_argument("--png", type=Path, help=f"the plot (default: {DEFAULT_PNG}; with --tiny, beside --out)")
    parser.add_argument("--tiny", action="store_true", help="plot built-in made-up figures (seconds), for the tests")
    parser.add_argument("--out", type=Path, help="write what was plotted as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        runs = [tiny_results()]
        png = args.png or (args.out.with_suffix(".png") if args.out else Path("head_scaling_tiny.png"))
    else:
        runs = [json.loads(path.read_text()) for path in args.inputs or [DEFAULT_INPUT]]
        png = args.png or DEFAULT_PNG
    summary = plot(runs, png)
    summary.update(
        {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv),
            "inputs": [str(path) for path in args.inputs],
        }
    )
    console.print(f"wrote {png}: {', '.join(summary['series'])}", markup=False)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
