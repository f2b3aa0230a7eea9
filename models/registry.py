"""A name -> factory registry, the one mechanism behind ``register_backbone`` / ``build_backbone`` and
``register_head`` / ``build_head``: a new architecture is added with a decorator, never with an if/elif."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
