"""Backbones: a name -> constructor registry. ``build_backbone("r50", num_features=512, dropout=0.0)``.

Every registered factory accepts ``num_features`` (the embedding size), ``dropout`` (the embedding dropout; a
backbone without one raises ``BackboneOptionError`` for a non-zero value) and ``gradient_checkpointing``
(recompute blocks in backward when training), plus architecture-specific keywords. The families: IResNet
(``models/iresnet.py``), MobileFaceNet (``models/mobilefacenet.py``), ViT (``models/vit.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from models.errors import InputError
from models.registry import Registry

__all__ = [
    "BackboneOptionError",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
    "build_backbone",
    "count_flops",
    "list_backbones",
    "register_backbone",
]

BackboneFactory = TypeVar("BackboneFactory", bound=Callable[..., nn.Module])

_BACKBONES: Registry[nn.Module] = Registry("backbone")


class BackboneOptionError(InputError, ValueError):
    """A backbone option the architecture cannot honour (e.g. ``network.dropout`` on a backbone without dropout)."""


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register a class or function returning an ``nn.Module`` under ``name``."""
    return _BACKBONES.register(name)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its constructor (e.g. ``num_features``)."""
    return _BACKBONES.build(name, **kwargs)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return _BACKBONES.names()


# Imported last: the modules register their backbones with the decorator above, so the registry must exist first.
from models.flops import count_flops  # noqa: E402
from models.iresnet import IResNet  # noqa: E402
from models.mobilefacenet import MobileFaceNet  # noqa: E402
from models.vit import VisionTransformer  # noqa: E402
