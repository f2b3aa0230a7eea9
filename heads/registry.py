"""The head registry: each head module registers its class with its settings, `build_head` builds one from the recipe.

    @dataclass
    class AdaFaceSettings(ScaleSettings):
        adaface_m: float = key(0.4, help="AdaFace's margin")
        def __post_init__(self) -> None: ...          # "adaface_m must ..."

    @register_head("adaface", settings=AdaFaceSettings)
    class AdaFacePartialFC(PartialFC):
        def __init__(self, options: PartialFCOptions, settings: AdaFaceSettings) -> None: ...

Head modules import `register_head` from here, never from the package `heads`, whose `__init__` imports them (which
registers them). The settings' fields become keys of the recipe's `head:` section (`heads.config.HeadConfig`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from heads.base import Head, PartialFCOptions, freeze_sample_rate
from heads.config import HEAD_SETTINGS, HeadConfig, check_settings
from models.registry import Registry

# A head class (or factory) called as `factory(options=PartialFCOptions, settings=<its settings>)`.
HeadFactory = TypeVar("HeadFactory", bound=Callable[..., Head])


class HeadRegistry(Registry[Head]):
    """`models.registry.Registry` plus each head's settings dataclass; `unregister` is for tests."""

    def __init__(self) -> None:
        super().__init__("head")
        self.settings = HEAD_SETTINGS  # the section (heads.config) composes the recipe keys from it

    def register_with(self, name: str, settings: type[Any]) -> Callable[[HeadFactory], HeadFactory]:
        def decorator(factory: HeadFactory) -> HeadFactory:
            if name not in self._factories:  # (a second registration is refused by `register`, naming the first)
                check_settings(name, settings, self.settings)
            self.register(name)(factory)
            self.settings[name] = settings
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        del self._factories[name], self.settings[name]


HEADS = HeadRegistry()


def register_head(name: str, *, settings: type[Any]) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator registering a head class under ``name`` with its settings dataclass (its recipe keys, each with a
    default and validated in `__post_init__`); a key another head declares too must be declared alike."""
    return HEADS.register_with(name, settings)


def unregister_head(name: str) -> None:
    """Forget head ``name`` (tests that register a head of their own)."""
    HEADS.unregister(name)


def head_settings(name: str) -> type[Any] | None:
    """The settings dataclass head ``name`` was registered with (None for an unknown name)."""
    return HEADS.settings.get(name)


def build_head(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """Build the head named by ``cfg.name`` for this rank's shard of ``num_classes`` classes, with its settings
    taken from ``cfg``."""
    options = PartialFCOptions(
        embedding_size,
        num_classes,
        rank=rank,
        world_size=world_size,
        sample_rate=freeze_sample_rate(cfg.sample_rate),
        update=cfg.update,
        lazy_sync_every=cfg.lazy_sync_every,
    )
    settings = HEADS.settings.get(cfg.name)
    return HEADS.build(cfg.name, options=options, settings=None if settings is None else cfg.settings(settings))


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return HEADS.names()
