"""Heads: embeddings + labels -> loss (margins, Partial FC, the differentiable collectives).

The contract every head keeps is `heads.base.Head`; a head is built from the recipe's `head:` section
(`heads.config.HeadConfig`) by the factory registered under `head.name`:

    head = build_head(cfg.head, embedding_size=512, num_classes=93431, rank=rank, world_size=world_size)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from heads.adaface import AdaFacePartialFC
from heads.base import Head
from heads.config import HeadConfig
from heads.curricularface import CurricularFacePartialFC
from heads.elasticface import ElasticFacePartialFC
from heads.magface import MagFacePartialFC
from heads.margins import MarginSoftmax
from heads.partial_fc import PartialFC
from heads.subcenter import SubCenterPartialFC
from models.registry import Registry

__all__ = [
    "AdaFacePartialFC",
    "CurricularFacePartialFC",
    "ElasticFacePartialFC",
    "Head",
    "HeadConfig",
    "MagFacePartialFC",
    "MarginSoftmax",
    "PartialFC",
    "SubCenterPartialFC",
    "build_head",
    "list_heads",
    "register_head",
]

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


def _combined_margin(cfg: HeadConfig) -> MarginSoftmax:
    return MarginSoftmax(
        s=cfg.s,
        m1=cfg.m1,
        m2=cfg.m2,
        m3=cfg.m3,
        arcface_fallback=cfg.arcface_fallback,
        margin_grad=cfg.margin_grad,
        interclass_filtering_threshold=cfg.interclass_filtering_threshold,
    )


@register_head("partial_fc")
def build_partial_fc(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """The combined margin softmax (ArcFace, CosFace, m1/m2/m3) through Partial FC."""
    return PartialFC(
        embedding_size,
        num_classes,
        margin=_combined_margin(cfg),
        sample_rate=cfg.sample_rate,
        update=cfg.update,
        rank=rank,
        world_size=world_size,
    )


@register_head("subcenter_arcface")
def build_subcenter_arcface(
    cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int
) -> Head:
    """Sub-center ArcFace: `num_subcenters` centers per class, the combined margin (m1/m2/m3) on the closest."""
    return SubCenterPartialFC(
        embedding_size,
        num_classes,
        num_subcenters=cfg.num_subcenters,
        drop_epoch=cfg.subcenter_drop_epoch,
        margin=_combined_margin(cfg),
        sample_rate=cfg.sample_rate,
        update=cfg.update,
        rank=rank,
        world_size=world_size,
    )


@register_head("adaface")
def build_adaface(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """AdaFace: margin adapted to the feature norm (`adaface_*`)."""
    return AdaFacePartialFC(
        embedding_size,
        num_classes,
        s=cfg.s,
        m=cfg.adaface_m,
        h=cfg.adaface_h,
        t_alpha=cfg.adaface_t_alpha,
        sample_rate=cfg.sample_rate,
        update=cfg.update,
        rank=rank,
        world_size=world_size,
    )


@register_head("magface")
def build_magface(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """MagFace: magnitude-dependent margin plus the magnitude regularizer (`magface_*`)."""
    return MagFacePartialFC(
        embedding_size,
        num_classes,
        s=cfg.s,
        l_a=cfg.magface_l_a,
        u_a=cfg.magface_u_a,
        l_m=cfg.magface_l_m,
        u_m=cfg.magface_u_m,
        lambda_g=cfg.magface_lambda_g,
        easy_margin=cfg.magface_easy_margin,
        sample_rate=cfg.sample_rate,
        update=cfg.update,
        rank=rank,
        world_size=world_size,
    )


@register_head("curricularface")
def build_curricularface(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
    """CurricularFace: hard negatives reweighted by the running t (`curricular_*`)."""
    return CurricularFacePartialFC(
        embedding_size,
        num_classes,
        s=cfg.s,
        m=cfg.curricular_m,
        t_alpha=cfg.curricular_t_alpha,
        sample_rate=cfg.sample_rate,
        update=cfg.update,
        rank=rank,
        world_size=world_size,
    )


def _register_elasticface(name: str, kind: Literal["arc", "cos"], plus: bool) -> None:
    def build(cfg: HeadConfig, *, embedding_size: int, num_classes: int, rank: int, world_size: int) -> Head:
        return ElasticFacePartialFC(
            embedding_size,
            num_classes,
            kind=kind,
            plus=plus,
            s=cfg.s,
            m=cfg.elastic_m,
            std=cfg.elastic_std,
            plus_pairing=cfg.elastic_plus_pairing,
            sample_rate=cfg.sample_rate,
            update=cfg.update,
            rank=rank,
            world_size=world_size,
        )

    build.__doc__ = f"ElasticFace-{kind.capitalize()}{'+' if plus else ''}: per-sample margins from N(m, std)."
    register_head(name)(build)


_register_elasticface("elasticface_arc", "arc", plus=False)
_register_elasticface("elasticface_cos", "cos", plus=False)
_register_elasticface("elasticface_arc_plus", "arc", plus=True)
_register_elasticface("elasticface_cos_plus", "cos", plus=True)
