"""Heads: embeddings + labels -> loss (margins, Partial FC, the differentiable collectives).

The contract every head keeps is `heads.base.Head`; a head is built from the recipe's `head:` section
(`heads.config.HeadConfig`) by the factory registered under `head.name`:

    head = build_head(cfg.head, embedding_size=512, num_classes=93431, rank=rank, world_size=world_size)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from heads.base import Head
from heads.config import HeadConfig
from heads.margins import MarginSoftmax
from heads.partial_fc import PartialFC
from models.registry import Registry

__all__ = ["Head", "HeadConfig", "MarginSoftmax", "PartialFC", "build_head", "list_heads", "register_head"]

# A factory: (cfg, *, embedding_size, num_classes, rank, world_size) -> Head.
HeadFactory = TypeVar("HeadFactory", bound=Callable[..., Head])

_HEADS: Registry[Head] = Registry("head")


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator registering a head factory under ``name``; it is called as
    ``factory(cfg, embedding_size=, num_classes=, rank=, world_size=)`` and returns a `Head`."""
    return _HEADS.register(name)


def build_head(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """Build the head named by ``cfg.name`` for this rank's shard of ``num_classes`` classes."""
    return _HEADS.build(
        cfg.name, cfg=cfg, embedding_size=embedding_size, num_classes=num_classes, rank=rank, world_size=world_size
    )


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return _HEADS.names()


@register_head("partial_fc")
def build_partial_fc(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """The combined margin softmax (ArcFace, CosFace, m1/m2/m3) through Partial FC."""
    margin = MarginSoftmax(s=cfg.s, m1=cfg.m1, m2=cfg.m2, m3=cfg.m3)
    return PartialFC(
        embedding_size,
        num_classes,
        margin=margin,
        sample_rate=cfg.sample_rate,
        rank=rank,
        world_size=world_size,
    )
