"""Every recipe key with its type, default and one-line meaning, read from the dataclass tree of `trainer.config`.

A key's meaning is declared with its field (`models.recipe.key`), its type and default come from the field itself;
this module walks the tree (`sections()`) and renders it twice: the key list of `trainer/main.py --help`
(`render_help()`) and the table of README.md's "Recipes" section (`render_markdown()`), so neither is written by
hand and neither can drift from the code.

    python -m trainer.keys                    # the key list of --help
    python -m trainer.keys --markdown         # the README table
    python -m trainer.keys --update-readme    # rewrite the table between the README's keys:begin/end markers
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from models.recipe import key_help
from trainer.config import REPO_ROOT, ExperimentConfig, section_class

README = REPO_ROOT / "README.md"
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


@dataclass(frozen=True)
class Key:
    """One recipe key: dotted name (`optim.lr`), type and default as a recipe writes them, one-line meaning."""

    name: str
    type: str
    default: str
    help: str


@dataclass(frozen=True)
class Section:
    """One section of the tree: dotted name ("" for the top level, `data.generated`), meaning, its own keys."""

    name: str
    help: str
    keys: tuple[Key, ...]


def sections(root: type = ExperimentConfig) -> list[Section]:
    """The tree, depth first in declaration order: a section's own keys, then its sub-sections. A section whose
    dataclass depends on what is registered is walked as the loader parses it (`trainer.config.section_class`)."""
    found: list[Section] = []

    def walk(cls: type, prefix: str, help: str) -> None:
        hints = typing.get_type_hints(cls)
        keys: list[Key] = []
        subsections: list[tuple[type, str, str]] = []
        for field in dataclasses.fields(cls):
            tp = hints[field.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                subsections.append((section_class(tp), f"{prefix}{field.name}", key_help(field)))
            else:
                keys.append(Key(f"{prefix}{field.name}", type_name(tp), yaml_value(_default(field)), key_help(field)))
        found.append(Section(prefix.rstrip("."), help, tuple(keys)))
        for sub, name, sub_help in subsections:
            walk(sub, f"{name}.", sub_help)

    walk(section_class(root), "", "")
    return found


def all_keys(root: type = ExperimentConfig) -> list[Key]:
    """Every key of the tree, in the order of `sections()`."""
    return [k for section in sections(root) for k in section.keys]


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None  # pragma: no cover - every recipe key has a default


def type_name(tp: Any) -> str:
    """A type hint as a recipe writer reads it: `float`, `list[str]`, `"sgd" | "adamw"`, `int | "epoch"`,
    `float | null`."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else yaml_value(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return str(getattr(tp, "__name__", tp))


def yaml_value(value: Any) -> str:
    """`value` as one line of YAML, as a recipe would write it: `0.1`, `true`, `''`, `[0.9, 0.999]`, `null`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("...\n").strip()


# --------------------------------------------------------------------------------------------------------------
# Rendering


def render_help(width: int | None = None) -> str:
    """The key list of `trainer/main.py --help`: one entry per key, grouped by section."""
    if width is None:
        width = max(60, min(120, shutil.get_terminal_size().columns - 2))
    lines = textwrap.wrap(
        "recipe keys, by section: each can be set on the command line as --section.key VALUE, the VALUE read as "
        "YAML (0.05, true, [10, 16], epoch), as in a recipe file",
        width,
    )
    for section in sections():
        lines.append("")
        lines.append(f"{section.name}: {section.help}" if section.name else "top level:")
        for k in section.keys:
            lines.append(f"  --{k.name} {k.type}   (default: {k.default})")
            lines.extend(textwrap.wrap(k.help, width, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The README's key table: a row per key (key | type | default | meaning), in the order of `sections()`."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in all_keys():
        rows.append(f"| `{k.name}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.help)} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    """What README text holds between its keys:begin and keys:end markers (without the marker lines)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers around its key table")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def update_readme(path: Path = README) -> bool:
    """Replace the table between the markers with `render_markdown()`; True when the file changed."""
    text = path.read_text()
    old = readme_table(text)
    if old == render_markdown():
        return False
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{render_markdown()}\n{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.keys", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--markdown", action="store_true", help="print the README's key table")
    what.add_argument("--update-readme", action="store_true", help="rewrite the key table in README.md")
    args = parser.parse_args(argv)
    if args.update_readme:
        print(f"{README}: {'updated' if update_readme() else 'already up to date'}")
    else:
        print(render_markdown() if args.markdown else render_help())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
