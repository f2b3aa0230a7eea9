"""What every section of the recipe shares: a key's one-line meaning, kept with the key itself.

Each section is a dataclass owned by the package that builds its part (`models.config.NetworkConfig`,
`heads.config.HeadConfig`, `data.config.DataConfig`, the trainer's own). A field is declared with `key()`, which
records its meaning in the field's metadata; `trainer/main.py --help` and the README's key table are generated
from it (type and default come from the field itself), so the three can never disagree.

    @dataclass
    class NetworkConfig:
        name: str = key("r50", "backbone: a name from models.list_backbones()")
        betas: list[float] = key(factory=lambda: [0.9, 0.999], help="AdamW's (beta1, beta2)")

A key that shapes what a checkpoint stores (`structural=True`: a head's sub-center count shapes its class-center
table) is compared on resume: a checkpoint made with another value is refused, naming the key and both values.

A section whose keys depend on what is registered (the `head:` section gathers each head's own settings) defines
the classmethod `resolve_section()`, returning the dataclass to parse into; the config loader calls it at load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["HELP", "STRUCTURAL", "is_structural", "key", "key_help"]

HELP = "help"  # the metadata entry holding a key's one-line meaning
STRUCTURAL = "structural"  # the metadata entry marking a key that shapes what a checkpoint stores


def key(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    structural: bool = False,
) -> Any:
    """A recipe key: `default` (or `factory` for a list or section) and its one-line meaning; `structural`: its
    value shapes what a checkpoint stores, so a resume with another value is refused (`trainer.state.RunIdentity`)."""
    if not help:
        raise ValueError("a recipe key needs its one-line meaning (help=...)")
    metadata: dict[str, Any] = {HELP: help}
    if structural:
        metadata[STRUCTURAL] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def key_help(field: dataclasses.Field[Any]) -> str:
    """The one-line meaning of a field declared with `key()` ("" for one that was not)."""
    return str(field.metadata.get(HELP, ""))


def is_structural(field: dataclasses.Field[Any]) -> bool:
    """Whether a field declared with `key()` shapes what a checkpoint stores (`structural=True`)."""
    return bool(field.metadata.get(STRUCTURAL, False))
