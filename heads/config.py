"""The recipe's `head:` section: the keys every head shares, plus each registered head's own settings.

`HeadConfig` declares the shared keys (`name`, and how Partial FC samples and moves the centers). Each head module
declares a settings dataclass of its own keys (`heads.adaface.AdaFaceSettings`: `s`, `adaface_m`, ...) and registers
it with the head (`@register_head("adaface", settings=AdaFaceSettings)`). The section a recipe is parsed into,
`HeadConfig.resolve_section()`, is `HeadConfig` plus the fields of every registered head's settings, so a recipe may
set any head's keys whichever head it chooses (the reference recipes keep one head's settings next to another's),
and every head's settings are validated at load: a bad `adaface_m` is refused even when `name` is `partial_fc`.
`heads.build_head` takes the chosen head's settings out of it (`HeadConfig.settings`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from heads.base import HeadUpdate, check_sampling
from models.recipe import is_structural, key, key_help

Settings = TypeVar("Settings")


@dataclass
class HeadConfig:
    """Which head (`heads.list_heads()`) and what every head shares: Partial FC's sampling and how the centers move.

    Validated at load: a `ValueError` "<key> must ..." that the config loader reports as "head.<key> must ...".
    docs/heads.md compares the heads; each head's own keys are its settings class, in its module.
    """

    name: str = key("partial_fc", help="the head: a name from heads.list_heads()")
    sample_rate: float | list[list[float]] = key(
        1.0,
        help="fraction of this rank's class centers scored each step (every positive, plus random negatives); or "
        "[epoch, rate] points, the rate from each epoch on, e.g. [[0, 0.1], [18, 1.0]]",
    )
    # README, "Partial FC at millions of classes": `dense` is insightface's Partial FC v2 (every center decays and
    # follows its momentum every step: a table-sized gradient and pass); `lazy` the same result with SGD, each step
    # touching only the sampled rows (the others caught up in closed form when next sampled, and all of them every
    # `lazy_sync_every` steps, at a checkpoint and at the end); `sparse` is Partial FC v1 (only the sampled centers
    # and their momentum move). AdamW: `dense` only.
    update: HeadUpdate = key(
        "lazy",
        help="how the centers move when sample_rate < 1: dense (Partial FC v2), lazy (dense with SGD, "
        "sampled rows only), sparse (Partial FC v1)",
    )
    lazy_sync_every: int = key(100, help="update lazy: optimizer steps between catching every center up")

    # The settings dataclasses whose fields the section holds besides the shared keys: set on the class that
    # `resolve_section` composes, empty here.
    head_settings: ClassVar[tuple[type[Any], ...]] = ()

    def __post_init__(self) -> None:
        check_sampling(self.sample_rate, self.update, self.lazy_sync_every)
        for settings in self.head_settings:
            self.settings(settings)  # each validates itself: "<key> must ..."

    def settings(self, cls: type[Settings]) -> Settings:
        """The settings dataclass ``cls`` filled from this section (its defaults for keys the section lacks: a head
        registered after the section class was composed)."""
        names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        return cls(**{name: getattr(self, name) for name in names if hasattr(self, name)})

    @classmethod
    def resolve_section(cls) -> type[HeadConfig]:
        """The dataclass the recipe's `head:` section is parsed into: these keys plus every registered head's."""
        return compose_section(registered_settings())


# Each registered head's settings class, by head name: filled by `heads.registry.register_head` (which imports this
# module; this module never imports it back).
HEAD_SETTINGS: dict[str, type[Any]] = {}


def registered_settings() -> tuple[type[Any], ...]:
    """The distinct settings classes of the registered heads, in registration order."""
    return tuple(dict.fromkeys(HEAD_SETTINGS.values()))


def declaration(cls: type[Any]) -> dict[str, tuple[Any, ...]]:
    """Each field of settings dataclass ``cls`` as (type, default, default factory, meaning, structural): what two
    heads sharing a key must declare alike, since the section holds it once."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (hints[f.name], f.default, f.default_factory, key_help(f), is_structural(f))
        for f in dataclasses.fields(cls)
    }


def check_settings(head: str, cls: type[Any], registered: dict[str, type[Any]]) -> None:
    """Refuse (ValueError) a settings class that cannot join the `head:` section: not a dataclass, a key without a
    default (a recipe that does not choose this head must still load), a name `HeadConfig` uses (a shared key or a
    method), or a key another head (``registered``: name -> settings) declares otherwise."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"head {head!r}: settings must be a dataclass, got {cls!r}")
    mine = declaration(cls)
    for name, (_, default, factory, *_) in mine.items():
        if hasattr(HeadConfig, name):
            raise ValueError(f"head {head!r}: settings key {name!r} is taken by the section's own keys (HeadConfig)")
        if default is dataclasses.MISSING and factory is dataclasses.MISSING:
            raise ValueError(f"head {head!r}: settings key {name!r} needs a default")
    for other, other_cls in registered.items():
        theirs = declaration(other_cls)
        for name in sorted(mine.keys() & theirs.keys()):
            if mine[name] != theirs[name]:
                raise ValueError(
                    f"head {head!r}: settings key {name!r} is declared as {_describe(mine[name])} by {cls.__name__}, "
                    f"but as {_describe(theirs[name])} by {other_cls.__name__} (head {other!r}); a key the heads "
                    "share must be declared alike (type, default and meaning)"
                )


def _describe(declared: tuple[Any, ...]) -> str:
    tp, default, factory, meaning, structural = declared
    value = f"default {default!r}" if factory is dataclasses.MISSING else f"default_factory {factory!r}"
    return f"({tp}, {value}, {meaning!r}{', structural' if structural else ''})"


@functools.cache
def compose_section(settings: tuple[type[Any], ...]) -> type[HeadConfig]:
    """`HeadConfig` plus the fields of ``settings`` (distinct settings classes, in registration order), each field
    once; cached, so the same registered heads give the same class."""
    fields: dict[str, tuple[str, Any, Any]] = {}
    for cls in settings:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in fields:
                copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
                fields[f.name] = (f.name, hints[f.name], copy)
    section = dataclasses.make_dataclass(
        "HeadConfig", list(fields.values()), bases=(HeadConfig,), namespace={"head_settings": settings}
    )
    section.__module__ = __name__
    composed = ", ".join(cls.__name__ for cls in settings)
    section.__doc__ = f"{HeadConfig.__doc__}\n    With the settings of: {composed}."
    return section
