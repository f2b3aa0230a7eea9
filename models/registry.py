"""A name -> factory registry, the one mechanism behind ``register_backbone`` / ``build_backbone`` and
``register_head`` / ``build_head``: a new architecture is added with a decorator, never with an if/elif.

The backbone registry itself lives here too: each model file (``models/iresnet.py``, ...) imports
``register_backbone`` from this module, never from the package ``models``, so no model file imports the package
that imports it. ``models/__init__.py`` imports the model files, which registers them.

Every registered backbone factory accepts ``num_features`` (the embedding size), ``dropout`` (the embedding
dropout; a backbone without one raises ``BackboneOptionError`` for a non-zero value) and ``gradient_checkpointing``
(recompute blocks in backward when training), plus architecture-specific keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import nn

from models.errors import InputError

Factory = TypeVar("Factory", bound=Callable[..., Any])
Built = TypeVar("Built")


class UnknownNameError(KeyError, ValueError):
    """A name nothing is registered under (a KeyError for lookups, a ValueError for bad input)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[Built]):
    """Factories (classes or functions) returning a ``Built`` under unique names; ``kind`` names them in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Built]] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator registering a class or factory under ``name``."""

        def decorator(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._factories[name]!r})")
            self._factories[name] = factory
            return factory

        return decorator

    def build(self, name: str, **kwargs: Any) -> Built:
        """Call the factory registered as ``name`` with ``kwargs``; an unknown name lists the registered ones."""
        if name not in self._factories:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}")
        return self._factories[name](**kwargs)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)


# --------------------------------------------------------------------------------------------------------------
# Backbones


class BackboneOptionError(InputError, ValueError):
    """A backbone option the architecture cannot honour (e.g. ``network.dropout`` on a backbone without dropout)."""


BackboneFactory = TypeVar("BackboneFactory", bound=Callable[..., nn.Module])

BACKBONES: Registry[nn.Module] = Registry("backbone")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register a class or function returning an ``nn.Module`` under ``name``."""
    return BACKBONES.register(name)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its constructor (e.g. ``num_features``)."""
    return BACKBONES.build(name, **kwargs)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return BACKBONES.names()
