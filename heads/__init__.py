"""Heads: embeddings + labels -> loss (margins, Partial FC, the differentiable collectives)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from heads.margins import MarginSoftmax
from heads.partial_fc import PartialFC

__all__ = ["MarginSoftmax", "PartialFC", "build_head", "list_heads", "register_head"]

HeadFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=HeadFactory)

_HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[F], F]:
    """Decorator registering a head class or factory under ``name`` (used by ``build_head``)."""

    def decorator(factory: F) -> F:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered (by {_HEADS[name]!r})")
        _HEADS[name] = factory
        return factory

    return decorator


def build_head(name: str, **kwargs: object) -> nn.Module:
    """Build the head registered as ``name`` with ``kwargs``."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; registered heads: {', '.join(list_heads()) or '(none)'}")
    return _HEADS[name](**kwargs)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return sorted(_HEADS)


register_head("partial_fc")(PartialFC)
