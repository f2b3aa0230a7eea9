"""Backbones: a name -> constructor registry. ``build_backbone("r50", num_features=512, dropout=0.0)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from models.registry import Registry

__all__ = ["IResNet", "build_backbone", "count_flops", "list_backbones", "register_backbone"]

BackboneFactory = TypeVar("BackboneFactory", bound=Callable[..., nn.Module])

_BACKBONES: Registry[nn.Module] = Registry("backbone")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register a class or function returning an ``nn.Module`` under ``name``."""
    return _BACKBONES.register(name)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its constructor (e.g. ``num_features``)."""
    return _BACKBONES.build(name, **kwargs)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return _BACKBONES.names()


# Imported last: the module registers its backbones with the decorator above, so the registry must exist first.
from models.iresnet import IResNet, count_flops  # noqa: E402
