"""Heads: embeddings + labels -> loss (margins, Partial FC, the differentiable collectives)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from heads.margins import MarginSoftmax
from heads.partial_fc import PartialFC
from models.registry import Registry

__all__ = ["MarginSoftmax", "PartialFC", "build_head", "list_heads", "register_head"]

HeadFactory = TypeVar("HeadFactory", bound=Callable[..., nn.Module])

_HEADS: Registry[nn.Module] = Registry("head")


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator registering a head class or factory under ``name`` (used by ``build_head``)."""
    return _HEADS.register(name)


def build_head(name: str, **kwargs: object) -> nn.Module:
    """Build the head registered as ``name`` with ``kwargs``."""
    return _HEADS.build(name, **kwargs)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return _HEADS.names()


register_head("partial_fc")(PartialFC)
