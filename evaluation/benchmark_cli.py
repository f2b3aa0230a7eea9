"""What the benchmark CLIs (`evaluation.rfw`, `evaluation.tinyface`, `evaluation.all_to_all`) share: how they take a
model and run it, and how they hand results back (a JSON file written whole or not at all, a table, the model's card).
Each CLI keeps its own data arguments and its own result rows."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.cli import atomic_output

logger = logging.getLogger(__name__)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_required: bool = True,
    flip: bool = True,
    workers: str = "decoding threads",
) -> None:
    """--model, --flip (default `flip`), --batch-size, --workers, --device."""
    parser.add_argument(
        "--model", type=Path, required=model_required, help="model.safetensors (or a run folder) or .onnx"
    )
    flip_help = "flip-sum embeddings" + (" (default: on)" if flip else "")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=flip, help=flip_help)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help=workers)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")


def add_result_arguments(parser: argparse.ArgumentParser) -> None:
    """--out (the results as JSON) and --card (add them to the model's card)."""
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--card", action="store_true", help="add the results to the model's card (evaluation.card)")


def check_result_paths(*paths: Path | None) -> None:
    """Refuse an output that cannot be written before the work, not after it (InputError, one line)."""
    from evaluation.embed import check_writable_folder

    for path in paths:
        if path is not None:
            check_writable_folder(path)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The results as indented JSON, written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("results: %s", path)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> None:
    """A rich table on stdout; the first `left` columns (names) left-aligned, the figures right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < left else "right")
    for row in rows:
        table.add_row(*map(str, row))
    Console().print(table)
